// Block-sparse attention, CUDA kernels (float16 / bfloat16 on tensor cores,
// float32 and unusual head sizes on a simpler CUDA-core path).
//
// No ONNX Runtime and no CUDA headers here: register.cc (plain C++) calls
// bsa_compute_cuda with the stream ORT hands it, and tools/tests call the
// extern "C" entry point onnxprune_bsa_cuda_run through ctypes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "block_sparse_attention.h"

#if defined(_WIN32)
#define ONNXPRUNE_CUDA_EXPORT __declspec(dllexport)
#else
#define ONNXPRUNE_CUDA_EXPORT __attribute__((visibility("default")))
#endif

namespace onnxprune {

// Launches the kernel for validated params `p` (device pointers, elements of
// p.value_type) on `stream` (a cudaStream_t). Never synchronises. Returns an
// empty string on success, otherwise a message (a launch or CUDA error).
std::string bsa_compute_cuda(const BsaParams& p, void* stream);

}  // namespace onnxprune

extern "C" {

// Return codes of onnxprune_bsa_cuda_run.
enum {
  ONNXPRUNE_BSA_OK = 0,
  ONNXPRUNE_BSA_INVALID_ARGUMENT = 1,  // shapes / types / attributes (same messages as the ORT op)
  ONNXPRUNE_BSA_CUDA_ERROR = 2,
};

// Plain C entry point: runs onnxprune.BlockSparseAttention on device pointers.
// Shapes: q_shape[4] = [B, Hq, Sq, D], k_shape[4], v_shape[4], layout_shape[3]
// (layout is uint8), attn_mask_shape[attn_mask_rank] (attn_mask may be null;
// its type is 9 = bool or the value type), key_padding_mask_shape[2]
// (may be null; type 9 = bool or 7 = int64), layout_rule int64
// layout_rule_shape[layout_rule_rank] (may be null; HOST memory, unlike the
// other tensors: it is validated and passed by value). value_type: 1 float32,
// 10 float16, 16 bfloat16 (ONNX element type codes). All tensors contiguous.
// The work is queued on `stream` (cudaStream_t, null = default stream) and the
// call returns without synchronising. On failure a message is copied into
// err[err_len] (when err is not null).
ONNXPRUNE_CUDA_EXPORT int onnxprune_bsa_cuda_run(
    int32_t value_type, const void* q, const int64_t* q_shape, const void* k,
    const int64_t* k_shape, const void* v, const int64_t* v_shape, const void* layout,
    const int64_t* layout_shape, const void* attn_mask, int32_t attn_mask_type,
    const int64_t* attn_mask_shape, int32_t attn_mask_rank, const void* key_padding_mask,
    int32_t key_padding_mask_type, const int64_t* key_padding_mask_shape,
    const int64_t* layout_rule, const int64_t* layout_rule_shape, int32_t layout_rule_rank, void* y,
    int64_t block_size, int32_t has_scale, float scale, int64_t is_causal, int64_t queries_at_end,
    void* stream, char* err, size_t err_len);

}  // extern "C"
