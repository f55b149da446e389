// Block-sparse attention CPU kernel (float32).
//
// This header has NO dependency on ONNX Runtime: it takes raw pointers, sizes
// and a "parallel for" callback, so a test harness can drive it directly.
// The ORT custom-op glue lives in register.cc.
//
// Semantics (op onnxprune.BlockSparseAttention, version 1): for batch b,
// query head h, query i and key j
//   s_ij = scale * <Q_i, K_j> + bias_ij
// where bias_ij = -inf if the layout block [h or 0, i / bs, j / bs] is zero,
// if key j is padding, if causal masking excludes it (j > i), or if a bool
// attn_mask is false; a float attn_mask is added. Y_i = softmax_j(s_ij) V_j,
// and a row whose scores are all -inf gives Y_i = 0.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace onnxprune {

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

  int64_t block_size = 0;
  bool has_scale = false;
  float scale = 0.0f;
  int64_t is_causal = 0;

  // The CUDA kernel also takes float16 and bfloat16 (Q, K, V and a float
  // attn_mask then share Q's type); the CPU kernel takes float32 only.
  bool allow_half = false;
};

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
  const void* attn_mask = nullptr;  // bool (1 byte) or float
  const void* key_padding_mask = nullptr;  // bool (1 byte) or int64, [B, Sk]
  float* y = nullptr;             // [B, Hq, Sq, Dv]

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
// working set stays near L1 and two threads get enough tasks. (constexpr: evaluated at compile
// time in the per-ISA kernels, so it never becomes a shared weak symbol.)
constexpr int64_t bsa_query_tile(int64_t block_size) { return block_size < 64 ? block_size : 64; }

// Number of independent tasks the kernel splits the work into: one per (batch, query head,
// query tile of bsa_query_tile(block_size) rows).
size_t bsa_num_tasks(const BsaParams& p);

// Runs the kernel. `pf` may be null (serial execution). Returns an empty
// string on success, an error message otherwise (e.g. out of memory).
std::string bsa_compute_cpu(const BsaParams& p, BsaParallelFor pf, void* pf_ctx);

// Instruction set bsa_compute_cpu uses on this CPU: "avx512", "avx2" or
// "baseline" (capped by the environment variable ONNXPRUNE_CPU_ISA).
const char* bsa_cpu_isa();

}  // namespace onnxprune
