// Block-sparse attention on the CPU: input validation (shared with the CUDA
// path) and the run-time choice of the kernel's instruction set. The kernel
// itself is bsa_cpu_kernel.inc, compiled once per instruction set.
#include "block_sparse_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <sstream>
#include <thread>
#include <vector>

namespace onnxprune {

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

const char* type_name(int32_t t) {
  switch (t) {
    case 0: return "undefined";
    case 1: return "float32";
    case 2: return "uint8";
    case 3: return "int8";
    case 4: return "uint16";
    case 5: return "int16";
    case 6: return "int32";
    case 7: return "int64";
    case 8: return "string";
    case 9: return "bool";
    case 10: return "float16";
    case 11: return "float64";
    case 12: return "uint32";
    case 13: return "uint64";
    case 16: return "bfloat16";
    default: return "other";
  }
}

std::string type_str(int32_t t) {
  std::ostringstream os;
  os << type_name(t) << " (element type " << t << ")";
  return os.str();
}

// layout_rule: int64 [Hl, 4] with sink and global >= 0 and windows >= -1. Returns a message
// (without the op's prefix) or an empty string.
std::string validate_rule(const BsaInputDesc& d, int64_t hl) {
  std::ostringstream err;
  if (d.layout_rule_type != kElemInt64) {
    err << "layout_rule must be int64, got " << type_str(d.layout_rule_type);
    return err.str();
  }
  const auto& rs = d.layout_rule_shape;
  if (rs.size() != 2 || rs[0] != hl || rs[1] != kRuleColumns) {
    err << "layout_rule shape " << shape_str(rs) << " must be [Hl, 4] = [" << hl
        << ", 4] (Hl from the layout; per head: sink_blocks, window_before, window_after, "
           "global_query_blocks)";
    return err.str();
  }
  if (hl > 0 && d.layout_rule == nullptr) return "layout_rule has no data";
  static const char* const names[kRuleColumns] = {"sink_blocks", "window_before", "window_after",
                                                  "global_query_blocks"};
  for (int64_t h = 0; h < hl; ++h) {
    for (int c = 0; c < kRuleColumns; ++c) {
      const int64_t value = d.layout_rule[h * kRuleColumns + c];
      const bool window = c == kRuleWindowBefore || c == kRuleWindowAfter;
      if (value < (window ? -1 : 0)) {
        err << "layout_rule head " << h << ": " << names[c] << "=" << value << " must be >= "
            << (window ? "-1 (-1: unbounded)" : "0");
        return err.str();
      }
    }
  }
  return std::string();
}

}  // namespace

int64_t gcd64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

// The statistics form's granularity and query_valid input; sets the pooling fields of `p`.
// Returns a message (without the op's prefix) or an empty string.
std::string validate_statistics(const BsaInputDesc& d, BsaParams* p) {
  std::ostringstream err;
  if (d.granularity < 1) {
    err << "granularity must be >= 1, got " << d.granularity << " (0: missing)";
    return err.str();
  }
  p->granularity = d.granularity;
  // Rows of pooled pieces never straddle two query tiles: a chunk divides both g and the tile,
  // and the queries' offset.
  const int64_t qtile = bsa_query_tile(p->block_size);
  p->pool_chunk = gcd64(gcd64(d.granularity, qtile), p->q_offset == 0 ? qtile : p->q_offset);
  if (d.has_query_valid) {
    const auto& vs = d.query_valid_shape;
    if (d.query_valid_type != kElemBool && d.query_valid_type != kElemInt64) {
      err << "query_valid must be bool or int64, got " << type_str(d.query_valid_type);
      return err.str();
    }
    if (vs.size() != 2 || vs[0] != p->B) {
      err << "query_valid shape " << shape_str(vs) << " must be [B, S] with B=" << p->B;
      return err.str();
    }
    // A mask of another length belongs to other positions (cross-attention): every query counts.
    if (vs[1] == p->Sq) p->query_valid_kind = d.query_valid_type == kElemBool ? PaddingKind::kBool : PaddingKind::kInt64;
  }
  return std::string();
}

std::string bsa_validate(const BsaInputDesc& d, BsaParams* out) {
  std::ostringstream err;
  const char* prefix = "BlockSparseAttention: ";

  // Attributes.
  if (d.block_size != 16 && d.block_size != 32 && d.block_size != 64 && d.block_size != 128) {
    err << prefix << "unsupported block_size " << d.block_size << " (supported: 16, 32, 64, 128)";
    return err.str();
  }
  if (d.is_causal != 0 && d.is_causal != 1) {
    err << prefix << "is_causal must be 0 or 1, got " << d.is_causal;
    return err.str();
  }
  if (d.queries_at_end != 0 && d.queries_at_end != 1) {
    err << prefix << "queries_at_end must be 0 or 1, got " << d.queries_at_end;
    return err.str();
  }

  // Element types.
  int32_t value_type = kElemFloat;
  if (!d.allow_half) {
    struct TypeCheck {
      const char* name;
      int32_t got;
      int32_t want;
    };
    const TypeCheck checks[] = {{"Q", d.q_type, kElemFloat},
                                {"K", d.k_type, kElemFloat},
                                {"V", d.v_type, kElemFloat},
                                {"layout", d.layout_type, kElemUint8}};
    for (const auto& c : checks) {
      if (c.got != c.want) {
        err << prefix << "input " << c.name << " must be " << type_name(c.want) << ", got "
            << type_str(c.got);
        return err.str();
      }
    }
    if (d.has_attn_mask && d.attn_mask_type != kElemBool && d.attn_mask_type != kElemFloat) {
      err << prefix << "attn_mask must be bool or float32, got " << type_str(d.attn_mask_type);
      return err.str();
    }
  } else {
    value_type = d.q_type;
    if (value_type != kElemFloat && value_type != kElemFloat16 && value_type != kElemBFloat16) {
      err << prefix << "input Q must be float32, float16 or bfloat16, got " << type_str(d.q_type);
      return err.str();
    }
    const struct {
      const char* name;
      int32_t got;
    } same[] = {{"K", d.k_type}, {"V", d.v_type}};
    for (const auto& c : same) {
      if (c.got != value_type) {
        err << prefix << "input " << c.name << " must be " << type_name(value_type)
            << " (the type of Q), got " << type_str(c.got);
        return err.str();
      }
    }
    if (d.layout_type != kElemUint8) {
      err << prefix << "input layout must be uint8, got " << type_str(d.layout_type);
      return err.str();
    }
    if (d.has_attn_mask && d.attn_mask_type != kElemBool && d.attn_mask_type != value_type) {
      err << prefix << "attn_mask must be bool or " << type_name(value_type)
          << " (the type of Q), got " << type_str(d.attn_mask_type);
      return err.str();
    }
  }
  if (d.has_key_padding_mask && d.key_padding_mask_type != kElemBool &&
      d.key_padding_mask_type != kElemInt64) {
    err << prefix << "key_padding_mask must be bool or int64, got "
        << type_str(d.key_padding_mask_type);
    return err.str();
  }

  // Ranks.
  struct RankCheck {
    const char* name;
    const std::vector<int64_t>* shape;
    size_t rank;
    const char* form;
  };
  const RankCheck ranks[] = {{"Q", &d.q_shape, 4, "[B, Hq, Sq, D]"},
                             {"K", &d.k_shape, 4, "[B, Hkv, Sk, D]"},
                             {"V", &d.v_shape, 4, "[B, Hkv, Sk, Dv]"},
                             {"layout", &d.layout_shape, 3, "[Hl, Mq, Mk]"}};
  for (const auto& r : ranks) {
    if (r.shape->size() != r.rank) {
      err << prefix << "input " << r.name << " must have rank " << r.rank << " " << r.form
          << ", got shape " << shape_str(*r.shape);
      return err.str();
    }
    for (int64_t x : *r.shape) {
      if (x < 0) {
        err << prefix << "input " << r.name << " has a negative dimension: " << shape_str(*r.shape);
        return err.str();
      }
    }
  }

  const auto& qs = d.q_shape;
  const auto& ks = d.k_shape;
  const auto& vs = d.v_shape;
  const auto& ls = d.layout_shape;
  BsaParams p;
  p.B = qs[0];
  p.Hq = qs[1];
  p.Sq = qs[2];
  p.D = qs[3];
  p.Hkv = ks[1];
  p.Sk = ks[2];
  p.Dv = vs[3];
  p.Hl = ls[0];
  p.Mq = ls[1];
  p.Mk = ls[2];
  p.block_size = d.block_size;
  p.is_causal = d.is_causal != 0;
  p.value_type = value_type;

  if (ks[0] != p.B) {
    err << prefix << "batch size mismatch: Q " << shape_str(qs) << " has B=" << p.B << " but K "
        << shape_str(ks) << " has B=" << ks[0];
    return err.str();
  }
  if (ks[3] != p.D) {
    err << prefix << "head size mismatch: Q " << shape_str(qs) << " has D=" << p.D << " but K "
        << shape_str(ks) << " has D=" << ks[3];
    return err.str();
  }
  if (p.Hkv == 0 ? p.Hq != 0 : p.Hq % p.Hkv != 0) {
    err << prefix << "number of query heads Hq=" << p.Hq
        << " must be a multiple of the number of key/value heads Hkv=" << p.Hkv << " (Q "
        << shape_str(qs) << ", K " << shape_str(ks) << ")";
    return err.str();
  }
  if (vs[0] != p.B || vs[1] != p.Hkv || vs[2] != p.Sk) {
    err << prefix << "V shape " << shape_str(vs) << " does not match K shape " << shape_str(ks)
        << " (expected [" << p.B << ", " << p.Hkv << ", " << p.Sk << ", Dv])";
    return err.str();
  }
  if (p.Hl != 1 && p.Hl != p.Hq) {
    err << prefix << "layout " << shape_str(ls) << " has Hl=" << p.Hl << " heads; expected 1 or Hq="
        << p.Hq;
    return err.str();
  }
  // Lengths beyond the layout's explicit region are fine: the rule (or, without one, every
  // block) continues it.
  if (d.queries_at_end) {
    if (p.Sq > p.Sk) {
      err << prefix << "with queries_at_end=1 the queries are the last Sq of the Sk key positions, "
          << "but Sq=" << p.Sq << " > Sk=" << p.Sk << " (Q " << shape_str(qs) << ", K "
          << shape_str(ks) << ")";
      return err.str();
    }
    p.q_offset = p.Sk - p.Sq;
  }
  if (d.has_layout_rule) {
    std::string rule_err = validate_rule(d, p.Hl);
    if (!rule_err.empty()) return prefix + rule_err;
    p.layout_rule = d.layout_rule;
  }

  // attn_mask: numpy broadcasting (right-aligned) to [B, Hq, Sq, Sk].
  if (d.has_attn_mask) {
    const auto& ms = d.attn_mask_shape;
    const int64_t target[4] = {p.B, p.Hq, p.Sq, p.Sk};
    bool ok = ms.size() <= 4;
    if (ok) {
      const size_t off = 4 - ms.size();
      int64_t stride = 1;
      for (int a = 3; a >= 0; --a) {
        if (a < static_cast<int>(off)) {
          p.mask_strides[a] = 0;
          continue;
        }
        const int64_t dim = ms[a - off];
        if (dim == target[a]) {
          p.mask_strides[a] = dim == 1 ? 0 : stride;
        } else if (dim == 1) {
          p.mask_strides[a] = 0;
        } else {
          ok = false;
          break;
        }
        stride *= dim;
      }
    }
    if (!ok) {
      err << prefix << "attn_mask shape " << shape_str(ms)
          << " is not broadcastable to [B, Hq, Sq, Sk] = "
          << shape_str({p.B, p.Hq, p.Sq, p.Sk});
      return err.str();
    }
    p.mask_kind = d.attn_mask_type == kElemBool ? MaskKind::kBool : MaskKind::kFloat;
  }

  if (d.has_key_padding_mask) {
    const auto& ps = d.key_padding_mask_shape;
    if (ps.size() != 2 || ps[0] != p.B || ps[1] != p.Sk) {
      err << prefix << "key_padding_mask shape " << shape_str(ps) << " must be [B, Sk] = "
          << shape_str({p.B, p.Sk});
      return err.str();
    }
    p.padding_kind = d.key_padding_mask_type == kElemBool ? PaddingKind::kBool : PaddingKind::kInt64;
  }

  if (d.statistics) {
    std::string stats_err = validate_statistics(d, &p);
    if (!stats_err.empty()) return prefix + stats_err;
  }

  if (d.has_scale) {
    p.scale = d.scale;
  } else {
    p.scale = p.D > 0 ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.D))) : 1.0f;
  }

  *out = p;
  return std::string();
}

size_t bsa_num_tasks(const BsaParams& p) {
  if (p.block_size <= 0) return 0;
  return static_cast<size_t>(p.B * p.Hq * bsa_num_query_tiles(p));
}

// Kernel bodies, one per instruction set (bsa_cpu_kernel.inc).
#define BSA_DECLARE_KERNEL(isa)                                                     \
  namespace isa {                                                                   \
  bool run_task(const BsaParams& p, size_t task);                                   \
  bool run_decode_task(const BsaParams& p, const BsaDecodePlan& plan, size_t task); \
  }
BSA_DECLARE_KERNEL(cpu_baseline)
#if defined(ONNXPRUNE_HAVE_X86_ISAS)
BSA_DECLARE_KERNEL(cpu_avx2)
BSA_DECLARE_KERNEL(cpu_avx512)
#endif
#undef BSA_DECLARE_KERNEL

namespace {

// Each returns false when the task could not get its working memory.
using RunTaskFn = bool (*)(const BsaParams& p, size_t task);
using RunDecodeFn = bool (*)(const BsaParams& p, const BsaDecodePlan& plan, size_t task);

struct IsaChoice {
  RunTaskFn fn;
  RunDecodeFn decode;
  const char* name;
};

#if defined(ONNXPRUNE_HAVE_X86_ISAS)
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi2");
}
#endif

// The best instruction set this CPU supports (libgcc's cpuid check also
// verifies that the OS saves the vector registers), capped by the environment
// variable ONNXPRUNE_CPU_ISA (avx512 | avx2 | baseline) so that tests and
// benchmarks can run every variant on one machine. Read on every call: a
// getenv per op invocation is negligible and lets a process switch.
IsaChoice choose_isa() {
  const char* cap = std::getenv("ONNXPRUNE_CPU_ISA");
  const std::string want = cap ? cap : "";
#if defined(ONNXPRUNE_HAVE_X86_ISAS)
  if (want != "avx2" && want != "baseline" && cpu_has_avx512())
    return {&cpu_avx512::run_task, &cpu_avx512::run_decode_task, "avx512"};
  if (want != "baseline" && cpu_has_avx2()) return {&cpu_avx2::run_task, &cpu_avx2::run_decode_task, "avx2"};
#endif
  return {&cpu_baseline::run_task, &cpu_baseline::run_decode_task, "baseline"};
}

struct TaskShared {
  RunTaskFn run;
  RunDecodeFn decode;
  const BsaParams* p;
  const BsaDecodePlan* plan;  // null: the tile path
  std::atomic<bool> failed{false};
};

void task_entry(void* data, size_t index) {
  auto* shared = static_cast<TaskShared*>(data);
  const bool ok = shared->plan != nullptr ? shared->decode(*shared->p, *shared->plan, index)
                                          : shared->run(*shared->p, index);
  if (!ok) shared->failed.store(true, std::memory_order_relaxed);
}

// The decode path's plan: per KV head the key blocks some row of its group keeps, and the
// number of chunks they are split into. Owns the memory the plan points to.
struct DecodePlanStorage {
  BsaDecodePlan plan;
  std::vector<int64_t> kept_begin;
  std::vector<int32_t> kept;
  std::vector<float> partial;
  std::vector<int32_t> finished;
};

// Fewest keys a chunk gets, so that writing and merging its partial result (rows × Dv floats)
// stays small next to reading its K/V.
constexpr int64_t kDecodeMinChunkKeys = 256;
// Chunks per (b, hk) aim at this many tasks per core, for balance among the pool's threads.
constexpr int64_t kDecodeTasksPerCore = 4;

int64_t machine_cores() {
  static const int64_t cores =
      std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  return cores;
}

void build_decode_plan(const BsaParams& p, DecodePlanStorage* s) {
  const int64_t bs = p.block_size, G = p.Hq / p.Hkv, nkb = (p.Sk + bs - 1) / bs;
  const int64_t first_pos = p.q_offset, last_pos = p.q_offset + p.Sq - 1;
  std::vector<uint8_t> mark(static_cast<size_t>(nkb));
  s->kept_begin.assign(1, 0);
  for (int64_t hk = 0; hk < p.Hkv; ++hk) {
    std::fill(mark.begin(), mark.end(), 0);
    for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      const int64_t hl = p.Hl == 1 ? 0 : h;
      for (int64_t qb = first_pos / bs; qb <= last_pos / bs; ++qb) {
        // Causal masking leaves no key of a block past the row's last position.
        const int64_t row_last = std::min(last_pos, qb * bs + bs - 1);
        const int64_t kb_end = p.is_causal ? std::min(nkb, row_last / bs + 1) : nkb;
        const int64_t explicit_end = qb < p.Mq ? std::min(p.Mk, kb_end) : 0;
        for (int64_t kb = 0; kb < explicit_end; ++kb) mark[kb] |= bsa_block_kept(p, hl, qb, kb);
        const int64_t* rule = p.layout_rule != nullptr ? p.layout_rule + hl * kRuleColumns : nullptr;
        for (int64_t kb = explicit_end; kb < kb_end; ++kb) {
          if (rule != nullptr) kb = bsa_rule_next_kept(rule, qb, kb);  // over the rule's pruned blocks
          if (kb < 0 || kb >= kb_end) break;
          mark[kb] = 1;
        }
      }
    }
    for (int64_t kb = 0; kb < nkb; ++kb)
      if (mark[kb]) s->kept.push_back(static_cast<int32_t>(kb));
    s->kept_begin.push_back(static_cast<int64_t>(s->kept.size()));
  }
  int64_t most_kept = 0;
  for (int64_t hk = 0; hk < p.Hkv; ++hk)
    most_kept = std::max(most_kept, s->kept_begin[hk + 1] - s->kept_begin[hk]);
  const int64_t pairs = p.B * p.Hkv, min_chunk_blocks = std::max<int64_t>(1, kDecodeMinChunkKeys / bs);
  const int64_t wanted = (kDecodeTasksPerCore * machine_cores() + pairs - 1) / pairs;
  const int64_t chunks = std::max<int64_t>(1, std::min(wanted, most_kept / min_chunk_blocks));

  BsaDecodePlan& plan = s->plan;
  plan.group = G;
  plan.rows = G * p.Sq;
  plan.chunks = chunks;
  plan.kept_begin = s->kept_begin.data();
  plan.kept = s->kept.data();
  if (chunks > 1) {
    s->partial.resize(static_cast<size_t>(pairs * chunks * plan.rows * (p.Dv + 2)));
    s->finished.assign(static_cast<size_t>(pairs), 0);
    plan.partial = s->partial.data();
    plan.finished = s->finished.data();
  }
}

}  // namespace

const char* bsa_cpu_isa() { return choose_isa().name; }

}  // namespace onnxprune

// Plain C entry point so tests and benchmarks can ask which kernel variant
// runs (ctypes on the loaded library).
extern "C" __attribute__((visibility("default"))) const char* OnnxpruneCpuIsa(void) {
  return onnxprune::bsa_cpu_isa();
}

namespace onnxprune {

std::string bsa_compute_cpu(const BsaParams& p, BsaParallelFor pf, void* pf_ctx) {
  const size_t tile_tasks = bsa_num_tasks(p);
  // The statistics form runs with Dv = 0 too: its probabilities are an output of their own.
  if (tile_tasks == 0 || (p.Dv == 0 && p.granularity == 0)) return std::string();
  if (p.Sk == 0) {  // no keys at all: every row is fully masked
    std::fill(p.y, p.y + p.B * p.Hq * p.Sq * p.Dv, 0.0f);
    return std::string();
  }
  const IsaChoice isa = choose_isa();
  TaskShared shared;
  shared.run = isa.fn;
  shared.decode = isa.decode;
  shared.p = &p;
  shared.plan = nullptr;
  DecodePlanStorage decode;
  size_t total = tile_tasks;
  if (bsa_uses_decode_path(p)) {
    build_decode_plan(p, &decode);
    shared.plan = &decode.plan;
    total = static_cast<size_t>(p.B * p.Hkv * decode.plan.chunks);
  }
  if (pf == nullptr || total == 1) {
    for (size_t i = 0; i < total; ++i) task_entry(&shared, i);
  } else if (!pf(pf_ctx, total, &task_entry, &shared)) {
    return "BlockSparseAttention: parallel execution failed";
  }
  if (shared.failed.load()) return "BlockSparseAttention: out of memory for the kernel's per-thread working buffers";
  return std::string();
}

}  // namespace onnxprune

namespace onnxprune {

std::vector<int64_t> bsa_pooled_shape(const BsaParams& p) {
  const int64_t g = p.granularity > 0 ? p.granularity : 1;
  return {p.B, p.Hq, (p.Sq + g - 1) / g, (p.Sk + g - 1) / g};
}

std::string bsa_statistics_cpu(BsaParams p, double* pooled, BsaParallelFor pf, void* pf_ctx) {
  const std::vector<int64_t> shape = bsa_pooled_shape(p);
  const int64_t g = p.granularity, mqg = shape[2], mkg = shape[3];
  const size_t pooled_size = static_cast<size_t>(p.B * p.Hq * mqg * mkg);
  if (bsa_num_tasks(p) == 0 || p.Sk == 0) {  // no query or no key: nothing attended
    std::fill(pooled, pooled + pooled_size, 0.0);
    std::fill(p.y, p.y + p.B * p.Hq * p.Sq * p.Dv, 0.0f);
    return std::string();
  }
  // Where chunks are whole cells (g divides the tile) the tasks write `pooled` itself;
  // otherwise pieces of ⌈g / chunk⌉ rows, summed below in query order.
  std::vector<double> pieces;
  p.pool_rows_per_head = (p.Sq + p.pool_chunk - 1) / p.pool_chunk;
  if (p.pool_chunk == g) {
    p.pool_rows = pooled;
  } else {
    pieces.assign(static_cast<size_t>(p.B * p.Hq * p.pool_rows_per_head * mkg), 0.0);
    p.pool_rows = pieces.data();
  }
  const std::string err = bsa_compute_cpu(p, pf, pf_ctx);
  if (!err.empty() || p.pool_rows == pooled) return err;
  std::fill(pooled, pooled + pooled_size, 0.0);
  for (int64_t bh = 0; bh < p.B * p.Hq; ++bh) {
    for (int64_t ch = 0; ch < p.pool_rows_per_head; ++ch) {
      const double* src = pieces.data() + (bh * p.pool_rows_per_head + ch) * mkg;
      double* dst = pooled + (bh * mqg + ch * p.pool_chunk / g) * mkg;
      for (int64_t j = 0; j < mkg; ++j) dst[j] += src[j];
    }
  }
  return std::string();
}

}  // namespace onnxprune
