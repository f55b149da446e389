// Block-sparse attention CPU kernel (float32).
//
// This header has NO dependency on ONNX Runtime: it takes raw pointers, sizes
// and a "parallel for" callback, so a test harness can drive it directly.
// The ORT custom-op glue lives in register.cc.
//
// Semantics (op onnxprune.BlockSparseAttention, versions 1 and 2): for batch
// b, query head h, query i and key j, with the query's absolute position
// a = i + off (off = Sk - Sq when queries_at_end, else 0)
//   s_ij = scale * <Q_i, K_j> + bias_ij
// where bias_ij = -inf if block (a / bs, j / bs) of head h is not kept, if
// key j is padding, if causal masking excludes it (j > a), or if a bool
// attn_mask (indexed by i) is false; a float attn_mask is added.
// Y_i = softmax_j(s_ij) V_j, and a row whose scores are all -inf gives Y_i = 0.
// Block (qb, kb) is kept: inside the layout's [Mq, Mk] region when the layout
// says so; outside it when the head's layout_rule keeps it (bsa_rule_keeps),
// or always when there is no rule (dense continuation, every version-1 node).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace onnxprune {

// Helpers defined in this header have internal linkage (static): a weak copy
// exported by one instruction set's TU could otherwise be called by another's.
// BSA_SHARED_FN ones also run in the CUDA kernels.
#if defined(__CUDACC__)
#define BSA_SHARED_FN static inline __host__ __device__
#else
#define BSA_SHARED_FN static inline
#endif

// Element type codes; identical to ONNX TensorProto / ONNXTensorElementDataType.
enum ElemType : int32_t {
  kElemUndefined = 0,
  kElemFloat = 1,
  kElemUint8 = 2,
  kElemInt64 = 7,
  kElemBool = 9,
  kElemFloat16 = 10,
  kElemBFloat16 = 16,
};

// Description of the op's inputs and attributes, as seen by the caller
// (shapes and element types), used for validation.
struct BsaInputDesc {
  std::vector<int64_t> q_shape, k_shape, v_shape, layout_shape;
  int32_t q_type = kElemFloat, k_type = kElemFloat, v_type = kElemFloat, layout_type = kElemUint8;

  bool has_attn_mask = false;
  std::vector<int64_t> attn_mask_shape;
  int32_t attn_mask_type = kElemUndefined;  // kElemBool or kElemFloat

  bool has_key_padding_mask = false;
  std::vector<int64_t> key_padding_mask_shape;
  int32_t key_padding_mask_type = kElemUndefined;  // kElemBool or kElemInt64

  // layout_rule (input 6): int64 [Hl, 4], read on the host (also by the CUDA
  // op, which takes it in CPU memory) so that its values can be validated.
  bool has_layout_rule = false;
  std::vector<int64_t> layout_rule_shape;
  int32_t layout_rule_type = kElemUndefined;
  const int64_t* layout_rule = nullptr;

  int64_t block_size = 0;
  bool has_scale = false;
  float scale = 0.0f;
  int64_t is_causal = 0;
  int64_t queries_at_end = 0;

  // The CUDA kernel also takes float16 and bfloat16 (Q, K, V and a float
  // attn_mask then share Q's type); the CPU kernel takes float32 only.
  bool allow_half = false;

  // Statistics form (onnxprune.BlockSparseAttentionStatistics, CPU only): its granularity
  // attribute, and the optional query_valid input (input 7, bool or int64 [B, Sq'], used when
  // Sq' == Sq).
  bool statistics = false;
  int64_t granularity = 0;
  bool has_query_valid = false;
  std::vector<int64_t> query_valid_shape;
  int32_t query_valid_type = kElemUndefined;
};

// Columns of a layout_rule row, per head.
enum BsaRuleColumn : int {
  kRuleSinkBlocks = 0,     // key blocks kb < sink_blocks are kept
  kRuleWindowBefore = 1,   // kb >= qb - window_before (-1: unbounded)
  kRuleWindowAfter = 2,    // kb <= qb + window_after (-1: unbounded)
  kRuleGlobalQueries = 3,  // query blocks qb < global_query_blocks keep every key block
  kRuleColumns = 4,
};

// Whether the rule row `rule` (kRuleColumns validated values; int64 on the
// CPU, clamped int32 in the CUDA kernel's parameters) keeps block (qb, kb), a
// block outside the layout's explicit region. Written with differences of
// block indices so that large window values cannot overflow.
template <typename T>
BSA_SHARED_FN bool bsa_rule_keeps(const T* rule, int64_t qb, int64_t kb) {
  if (kb < rule[kRuleSinkBlocks] || qb < rule[kRuleGlobalQueries]) return true;
  const int64_t before = rule[kRuleWindowBefore], after = rule[kRuleWindowAfter];
  return (before < 0 || qb - kb <= before) && (after < 0 || kb - qb <= after);
}

// The first key block >= kb of block row qb that the rule keeps (kb itself when
// it is kept), or -1 when it keeps none: a kernel walks a long row's few kept
// blocks (sink, window) without testing every pruned one.
template <typename T>
BSA_SHARED_FN int64_t bsa_rule_next_kept(const T* rule, int64_t qb, int64_t kb) {
  if (bsa_rule_keeps(rule, qb, kb)) return kb;
  // kb is past the sink blocks, qb is no global row and kb lies outside the window:
  // the window itself is all that can follow.
  const int64_t before = rule[kRuleWindowBefore];
  if (before >= 0 && kb < qb - before) return qb - before;
  return -1;
}

enum class MaskKind { kNone, kBool, kFloat };
enum class PaddingKind { kNone, kBool, kInt64 };

// Everything the kernel needs. Filled (except for the data pointers) by
// bsa_validate.
struct BsaParams {
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0, Dv = 0;
  int64_t Hl = 0, Mq = 0, Mk = 0;  // layout [Hl, Mq, Mk]
  int64_t block_size = 0;
  int32_t value_type = kElemFloat;  // element type of Q, K, V, Y (and a float attn_mask)
  float scale = 1.0f;
  bool is_causal = false;
  // Absolute position of query 0: Sk - Sq with queries_at_end, else 0. Layout
  // rows, the rule and causal masking use absolute positions i + q_offset.
  int64_t q_offset = 0;

  MaskKind mask_kind = MaskKind::kNone;
  // Element strides of the attn_mask over the broadcast shape [B, Hq, Sq, Sk]
  // (0 for broadcast dimensions).
  int64_t mask_strides[4] = {0, 0, 0, 0};

  PaddingKind padding_kind = PaddingKind::kNone;

  // Data pointers (set by the caller after validation). They are typed for
  // the CPU kernel; the CUDA kernel reads them as value_type elements.
  const float* q = nullptr;       // [B, Hq, Sq, D]
  const float* k = nullptr;       // [B, Hkv, Sk, D]
  const float* v = nullptr;       // [B, Hkv, Sk, Dv]
  const uint8_t* layout = nullptr;  // [Hl, Mq, Mk]
  // [Hl, kRuleColumns] in host memory, validated; null: every block outside
  // the explicit region is kept. Set by bsa_validate.
  const int64_t* layout_rule = nullptr;
  const void* attn_mask = nullptr;  // bool (1 byte) or float
  const void* key_padding_mask = nullptr;  // bool (1 byte) or int64, [B, Sk]
  float* y = nullptr;             // [B, Hq, Sq, Dv]

  // Statistics form only (granularity > 0): see bsa_statistics_cpu.
  int64_t granularity = 0;
  PaddingKind query_valid_kind = PaddingKind::kNone;  // kNone: every query counts
  const void* query_valid = nullptr;                  // [B, Sq]
  // Rows the tasks write: one per `pool_chunk` queries, `pool_rows_per_head` per (b, h),
  // ⌈Sk/g⌉ doubles each (set by bsa_statistics_cpu).
  int64_t pool_chunk = 0, pool_rows_per_head = 0;
  double* pool_rows = nullptr;

  // Output shape [B, Hq, Sq, Dv].
  std::vector<int64_t> output_shape() const { return {B, Hq, Sq, Dv}; }
};

// Checks shapes, element types and attributes; on success fills `out`
// (sizes, mask strides, scale default) and returns an empty string, otherwise
// returns an error message naming the offending sizes.
std::string bsa_validate(const BsaInputDesc& desc, BsaParams* out);

// Task callback: fn(data, task_index).
using BsaTaskFn = void (*)(void* data, size_t index);
// Parallel-for callback: must call fn(data, i) exactly once for each i in
// [0, total), possibly concurrently, and return after all calls finished.
// Returns false if the parallel-for itself failed.
using BsaParallelFor = bool (*)(void* pf_ctx, size_t total, BsaTaskFn fn, void* data);

// Query rows per CPU task: a block of up to 64 rows, half a block at 128, so that a task's
// working set stays near L1 and two threads get enough tasks.
static constexpr int64_t bsa_query_tile(int64_t block_size) { return block_size < 64 ? block_size : 64; }

// Query tiles are aligned to absolute positions (multiples of bsa_query_tile), so a tile
// never straddles two layout block rows; with an offset the first and last tiles are partial.
// First absolute tile and number of tiles that intersect [q_offset, q_offset + Sq).
static inline int64_t bsa_first_query_tile(const BsaParams& p) {
  return p.q_offset / bsa_query_tile(p.block_size);
}
static inline int64_t bsa_num_query_tiles(const BsaParams& p) {
  if (p.Sq <= 0) return 0;
  const int64_t qtile = bsa_query_tile(p.block_size);
  return (p.q_offset + p.Sq - 1) / qtile - p.q_offset / qtile + 1;
}

// Number of independent tasks the kernel splits the work into: one per (batch, query head,
// query tile of bsa_query_tile(block_size) rows).
size_t bsa_num_tasks(const BsaParams& p);

// Whether layout head hl keeps block (qb, kb): the layout says so inside its [Mq, Mk] region;
// outside it the head's rule does, or every block is kept when there is no rule.
static inline bool bsa_block_kept(const BsaParams& p, int64_t hl, int64_t qb, int64_t kb) {
  if (qb < p.Mq && kb < p.Mk) return p.layout[(hl * p.Mq + qb) * p.Mk + kb] != 0;
  return p.layout_rule == nullptr || bsa_rule_keeps(p.layout_rule + hl * kRuleColumns, qb, kb);
}

// ---- Decode fast path (CPU) ----
// With few queries (a decode step, a short chunk) a task per (batch, query head, query tile)
// would read each K/V block once per query head of a KV group, and a batch of 1 gives only Hq
// tasks. Up to kBsaDecodeMaxQueries queries, a task is instead one (batch b, KV head hk, chunk
// of the group's kept key blocks): its rows are the G = Hq / Hkv query heads × Sq queries
// (row r = g * Sq + i: query head hk * G + g, query i), so each kept K/V block is read once per
// KV head. A block is kept for the group when some row's head keeps it; the rows whose head
// does not keep it are masked. With few (b, hk) pairs the kept blocks are split into chunks
// (split-K): each chunk keeps its partial (max, sum, unnormalised output) and the last chunk of
// a pair to finish merges them, in chunk order, by log-sum-exp. The split depends on the
// shapes, the layout and the machine's core count, never on the run's thread count, so the
// result does not either.
static constexpr int64_t kBsaDecodeMaxQueries = 16;

struct BsaDecodePlan {
  int64_t group = 0;   // G = Hq / Hkv
  int64_t rows = 0;    // G * Sq
  int64_t chunks = 1;  // per (b, hk); tasks = B * Hkv * chunks, task = (b * Hkv + hk) * chunks + chunk
  // Key blocks kept for KV head hk: kept[kept_begin[hk] .. kept_begin[hk + 1]), ascending,
  // without the blocks causal masking excludes for every row.
  const int64_t* kept_begin = nullptr;  // [Hkv + 1]
  const int32_t* kept = nullptr;
  // With chunks > 1: per (b, hk, chunk) rows × Dv unnormalised outputs, then rows maxima and
  // rows sums; and per (b, hk) the number of chunks finished (zeroed by the caller).
  float* partial = nullptr;
  int32_t* finished = nullptr;
};

// Whether bsa_compute_cpu takes the decode path for these parameters.
static inline bool bsa_uses_decode_path(const BsaParams& p) {
  return p.granularity == 0 && p.Sq >= 1 && p.Sq <= kBsaDecodeMaxQueries;
}

// Runs the kernel. `pf` may be null (serial execution). Returns an empty
// string on success, an error message otherwise (e.g. out of memory).
std::string bsa_compute_cpu(const BsaParams& p, BsaParallelFor pf, void* pf_ctx);

// The statistics form: Y as bsa_compute_cpu, and pooled [B, Hq, ⌈Sq/g⌉, ⌈Sk/g⌉] (double),
// the attention probabilities summed over each g × g cell of (valid query, key) pairs. Each
// task owns its rows; where g does not divide the query tile, tasks write pieces of a cell
// row that are summed afterwards in a fixed order, so the sums never depend on the thread
// count. Granularity, query_valid and the block size are validated by bsa_validate.
std::string bsa_statistics_cpu(BsaParams p, double* pooled, BsaParallelFor pf, void* pf_ctx);

// Output shape of the pooled statistics.
std::vector<int64_t> bsa_pooled_shape(const BsaParams& p);

// Instruction set bsa_compute_cpu uses on this CPU: "avx512", "avx2" or
// "baseline" (capped by the environment variable ONNXPRUNE_CPU_ISA).
const char* bsa_cpu_isa();

}  // namespace onnxprune
