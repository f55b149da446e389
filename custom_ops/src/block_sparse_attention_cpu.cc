// Block-sparse attention, CPU float32 kernel (flash-attention style, online
// softmax over the kept key blocks). See block_sparse_attention.h.
#include "block_sparse_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <sstream>

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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

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
  if (p.Sq > p.Mq * p.block_size) {
    err << prefix << "Sq=" << p.Sq << " exceeds the layout's query blocks: Mq=" << p.Mq
        << " * block_size=" << p.block_size << " = " << p.Mq * p.block_size << " (layout "
        << shape_str(ls) << ")";
    return err.str();
  }
  if (p.Sk > p.Mk * p.block_size) {
    err << prefix << "Sk=" << p.Sk << " exceeds the layout's key blocks: Mk=" << p.Mk
        << " * block_size=" << p.block_size << " = " << p.Mk * p.block_size << " (layout "
        << shape_str(ls) << ")";
    return err.str();
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
  return static_cast<size_t>(p.B * p.Hq * ceil_div(p.Sq, p.block_size));
}

namespace {

struct TaskShared {
  const BsaParams* p;
  std::atomic<bool> failed{false};
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------
// Vectorisable float exp.
//
// exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n*ln2 (Cody-Waite split of
// ln2 into hi + lo so r is exact to ~1 ulp), exp(r) on |r| <= ln2/2 by the
// Cephes degree-6 polynomial 1 + r + r^2 * P5(r) (relative error ~1e-7), and
// 2^n assembled in the exponent bits. Branch-free (selects only), so loops
// calling it are auto-vectorised. Inputs below kExpLo (including -inf) give
// exactly 0 (std::exp would give a denormal in [-103.3, -87.3]: at most
// 1.2e-38, below the float32 resolution of any softmax sum, which is >= 1);
// inputs above kExpHi saturate to exp(kExpHi) (never reached here: the kernel
// only takes exp of values <= 0); NaN propagates.
constexpr float kExpLo = -87.3f;  // n >= -126: 2^n stays a normal number
constexpr float kExpHi = 88.3f;   // n <= 127

inline __attribute__((always_inline)) float fast_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 8 significant bits: n*kLn2Hi exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: float add rounds to integer
  float xc = x < kExpLo ? kExpLo : x;  // NaN compares false: kept
  xc = xc > kExpHi ? kExpHi : xc;
  const float t = xc * kLog2e + kRound;  // low mantissa bits hold round(xc*log2e)
  const float n = t - kRound;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r) * r + r + 1.0f;
  uint32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  // tb - bits(kRound) = n (integer, |n| <= 127); 2^n = (n + 127) << 23.
  const uint32_t sb = (tb - 0x4B400000u + 127u) << 23;
  float s;
  std::memcpy(&s, &sb, sizeof(s));
  const float res = y * s;
  return x < kExpLo ? 0.0f : res;
}

// Only used inside always_inline helpers, so the vector ABI never matters.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float Vec16 __attribute__((vector_size(64)));
inline __attribute__((always_inline)) Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline __attribute__((always_inline)) void store16(float* p, Vec16 v) {
  std::memcpy(p, &v, sizeof(v));
}

// One task: batch b, query head h, query block qb. BS is the block size (a
// compile-time constant so the column loops have fixed trip counts); a partial
// last key block is padded to BS columns (K^T columns zero, bias -inf, which
// gives probability exactly 0).
template <int BS>
inline __attribute__((always_inline)) void task_body(const BsaParams& p, size_t task) {
  constexpr int64_t bs = BS;
  const int64_t D = p.D, Dv = p.Dv, Sq = p.Sq, Sk = p.Sk;
  const int64_t nqb = ceil_div(Sq, bs);
  const int64_t nkb = ceil_div(Sk, bs);
  const int64_t t = static_cast<int64_t>(task);
  const int64_t qb = t % nqb;
  const int64_t h = (t / nqb) % p.Hq;
  const int64_t b = t / (nqb * p.Hq);
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int64_t i0 = qb * bs;
  const int64_t rows = std::min(bs, Sq - i0);
  const int64_t last_row = i0 + rows - 1;

  // Per-thread scratch: packed K^T block [D, bs], score tile [bs, bs],
  // accumulator [bs, Dv], running max / sum [bs], key bias [bs].
  // Running sums are kept as kLanes partial sums per row (lsum [bs, kLanes]).
  constexpr int kLanes = BS < 16 ? BS : 16;
  thread_local std::vector<float> scratch;
  const size_t need =
      static_cast<size_t>(D * bs + bs * bs + bs * Dv + 3 * bs + bs * kLanes);
  if (scratch.size() < need) scratch.resize(need);
  float* kt = scratch.data();
  float* st = kt + D * bs;
  float* acc = st + bs * bs;
  float* mrow = acc + bs * Dv;
  float* lrow = mrow + bs;
  float* kbias = lrow + bs;
  float* lsum = kbias + bs;

  std::fill(acc, acc + rows * Dv, 0.0f);
  std::fill(mrow, mrow + rows, kNegInf);
  std::fill(lsum, lsum + rows * kLanes, 0.0f);

  const float* qblk = p.q + ((b * p.Hq + h) * Sq + i0) * D;
  const float* kbase = p.k + (b * p.Hkv + hk) * Sk * D;
  const float* vbase = p.v + (b * p.Hkv + hk) * Sk * Dv;
  const uint8_t* lay = p.layout + ((p.Hl == 1 ? 0 : h) * p.Mq + qb) * p.Mk;
  const float scale = p.scale;

  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t j0 = kb * bs;
    if (p.is_causal && j0 > last_row) break;  // this and all later blocks fully masked
    if (!lay[kb]) continue;
    const int64_t cols = std::min(bs, Sk - j0);

    // Key padding -> per-column bias (0 or -inf); padded columns -inf.
    bool any_key = false;
    if (p.padding_kind == PaddingKind::kNone) {
      std::fill(kbias, kbias + cols, 0.0f);
      any_key = true;
    } else if (p.padding_kind == PaddingKind::kBool) {
      const uint8_t* pm = static_cast<const uint8_t*>(p.key_padding_mask) + b * Sk + j0;
      for (int64_t c = 0; c < cols; ++c) {
        kbias[c] = pm[c] ? 0.0f : kNegInf;
        any_key |= pm[c] != 0;
      }
    } else {
      const int64_t* pm = static_cast<const int64_t*>(p.key_padding_mask) + b * Sk + j0;
      for (int64_t c = 0; c < cols; ++c) {
        kbias[c] = pm[c] ? 0.0f : kNegInf;
        any_key |= pm[c] != 0;
      }
    }
    if (!any_key) continue;
    std::fill(kbias + cols, kbias + bs, kNegInf);

    // Pack K block transposed: kt[d * bs + c] = K[j0 + c, d] (zero-padded).
    const float* kblk = kbase + j0 * D;
    if (cols < bs)
      for (int64_t d = 0; d < D; ++d) std::fill(kt + d * bs + cols, kt + d * bs + bs, 0.0f);
    for (int64_t c = 0; c < cols; ++c) {
      const float* krow = kblk + c * D;
      for (int64_t d = 0; d < D; ++d) kt[d * bs + c] = krow[d];
    }

    // Score tile: st[r, c] = scale * <Q[i0 + r], K[j0 + c]> + kbias[c].
    // Vectorised over c with 16-float generic vectors (lowered to the clone's
    // ISA: 4 x SSE, 2 x AVX or 1 x AVX-512 register each); BS / 16 register
    // accumulators per row, so there is no reduction over d.
    constexpr int kNV = BS / 16;
    for (int64_t r = 0; r < rows; ++r) {
      Vec16 sv[kNV];
      for (int j = 0; j < kNV; ++j) sv[j] = Vec16{} ;
      const float* qrow = qblk + r * D;
      for (int64_t d = 0; d < D; ++d) {
        const float qv = qrow[d];
        const float* ktrow = kt + d * bs;
        for (int j = 0; j < kNV; ++j) sv[j] += qv * load16(ktrow + 16 * j);
      }
      float* srow = st + r * bs;
      for (int j = 0; j < kNV; ++j)
        store16(srow + 16 * j, sv[j] * scale + load16(kbias + 16 * j));
    }

    // Causal masking inside the tile (key j > query i).
    if (p.is_causal && j0 + cols - 1 > i0) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t first_masked = std::max<int64_t>(i0 + r + 1 - j0, 0);
        float* srow = st + r * bs;
        for (int64_t c = first_masked; c < cols; ++c) srow[c] = kNegInf;
      }
    }

    // attn_mask.
    if (p.mask_kind != MaskKind::kNone) {
      const int64_t* ms = p.mask_strides;
      for (int64_t r = 0; r < rows; ++r) {
        float* srow = st + r * bs;
        const int64_t off = b * ms[0] + h * ms[1] + (i0 + r) * ms[2] + j0 * ms[3];
        const int64_t sj = ms[3];
        if (p.mask_kind == MaskKind::kBool) {
          const uint8_t* mrowp = static_cast<const uint8_t*>(p.attn_mask) + off;
          for (int64_t c = 0; c < cols; ++c)
            if (!mrowp[c * sj]) srow[c] = kNegInf;
        } else {
          const float* mrowp = static_cast<const float*>(p.attn_mask) + off;
          for (int64_t c = 0; c < cols; ++c) srow[c] += mrowp[c * sj];
        }
      }
    }

    // Online softmax update.
    const float* vblk = vbase + j0 * Dv;
    for (int64_t r = 0; r < rows; ++r) {
      float* srow = st + r * bs;
      // Row max: lane-wise, then a log2 tree (vectorises; no serial chain).
      float lm[kLanes];
      for (int l = 0; l < kLanes; ++l) lm[l] = srow[l];
      for (int64_t c = kLanes; c < bs; c += kLanes)
        for (int l = 0; l < kLanes; ++l) lm[l] = lm[l] < srow[c + l] ? srow[c + l] : lm[l];
      for (int w = kLanes / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) lm[l] = lm[l] < lm[l + w] ? lm[l + w] : lm[l];
      const float bmax = lm[0];
      if (!(bmax > kNegInf)) continue;  // nothing to attend to in this block
      const float m_old = mrow[r];
      const float m_new = std::max(m_old, bmax);  // finite (or +inf from the mask)
      // m_old == -inf -> alpha = 0 (accumulator is still zero anyway).
      const float alpha = m_old == kNegInf ? 0.0f : fast_exp(m_old - m_new);
      // -inf scores give exactly 0 (fast_exp(-inf) == 0).
      for (int64_t c = 0; c < bs; ++c) srow[c] = fast_exp(srow[c] - m_new);
      // Running sum kept per lane (reduced once at the end).
      float* lr = lsum + r * kLanes;
      for (int l = 0; l < kLanes; ++l) lr[l] *= alpha;
      for (int64_t c = 0; c < bs; c += kLanes)
        for (int l = 0; l < kLanes; ++l) lr[l] += srow[c + l];
      mrow[r] = m_new;
      // acc[r, :] = alpha * acc[r, :] + sum_c P[r, c] V[c, :], in register
      // blocks of kDv columns (no store/reload of acc per key).
      float* arow = acc + r * Dv;
      constexpr int64_t kDv = 32;
      int64_t d0 = 0;
      for (; d0 + kDv <= Dv; d0 += kDv) {
        float a[kDv];
        for (int64_t d = 0; d < kDv; ++d) a[d] = arow[d0 + d] * alpha;
        for (int64_t c = 0; c < cols; ++c) {
          const float pc = srow[c];
          if (pc == 0.0f) continue;  // masked key: V row not touched
          const float* vrow = vblk + c * Dv + d0;
          for (int64_t d = 0; d < kDv; ++d) a[d] += pc * vrow[d];
        }
        for (int64_t d = 0; d < kDv; ++d) arow[d0 + d] = a[d];
      }
      if (d0 < Dv) {
        for (int64_t d = d0; d < Dv; ++d) arow[d] *= alpha;
        for (int64_t c = 0; c < cols; ++c) {
          const float pc = srow[c];
          if (pc == 0.0f) continue;
          const float* vrow = vblk + c * Dv;
          for (int64_t d = d0; d < Dv; ++d) arow[d] += pc * vrow[d];
        }
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    float* lr = lsum + r * kLanes;
    for (int w = kLanes / 2; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) lr[l] += lr[l + w];
    lrow[r] = lr[0];
  }

  // Normalise; rows that never saw a finite score are exactly zero.
  float* yblk = p.y + ((b * p.Hq + h) * Sq + i0) * Dv;
  for (int64_t r = 0; r < rows; ++r) {
    float* yrow = yblk + r * Dv;
    const float* arow = acc + r * Dv;
    if (mrow[r] == kNegInf || !(lrow[r] > 0.0f)) {
      std::fill(yrow, yrow + Dv, 0.0f);
    } else {
      const float inv = 1.0f / lrow[r];
      for (int64_t d = 0; d < Dv; ++d) yrow[d] = arow[d] * inv;
    }
  }
}

// Runtime ISA dispatch: GCC/Clang function multiversioning compiles run_task
// (with task_body and fast_exp inlined into it) once per listed target and
// picks one at load time through an ifunc resolver (cpuid). The library itself
// stays baseline x86-64; no -march flags are needed.
#if defined(__x86_64__) && defined(__ELF__) && !defined(ONNXPRUNE_NO_MULTIVERSION) && \
    (defined(__clang__) ? __clang_major__ >= 14 : (defined(__GNUC__) && __GNUC__ >= 8))
#define BSA_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BSA_TARGET_CLONES
#endif

BSA_TARGET_CLONES
void run_task(const BsaParams& p, size_t task) {
  switch (p.block_size) {
    case 16: task_body<16>(p, task); break;
    case 32: task_body<32>(p, task); break;
    case 64: task_body<64>(p, task); break;
    default: task_body<128>(p, task); break;  // validated: 16, 32, 64 or 128
  }
}

void task_entry(void* data, size_t index) {
  auto* shared = static_cast<TaskShared*>(data);
  try {
    run_task(*shared->p, index);
  } catch (...) {
    shared->failed.store(true, std::memory_order_relaxed);
  }
}

}  // namespace

std::string bsa_compute_cpu(const BsaParams& p, BsaParallelFor pf, void* pf_ctx) {
  const size_t total = bsa_num_tasks(p);
  if (total == 0 || p.Dv == 0) return std::string();
  if (p.Sk == 0) {  // no keys at all: every row is fully masked
    std::fill(p.y, p.y + p.B * p.Hq * p.Sq * p.Dv, 0.0f);
    return std::string();
  }
  TaskShared shared;
  shared.p = &p;
  if (pf == nullptr || total == 1) {
    for (size_t i = 0; i < total; ++i) task_entry(&shared, i);
  } else if (!pf(pf_ctx, total, &task_entry, &shared)) {
    return "BlockSparseAttention: parallel execution failed";
  }
  if (shared.failed.load()) return "BlockSparseAttention: kernel failed (out of memory?)";
  return std::string();
}

}  // namespace onnxprune
