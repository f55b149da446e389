// The CPU kernel compiled for one instruction set (see CMakeLists.txt for its
// flags and block_sparse_attention_cpu.cc for the run-time choice).
#define BSA_ISA_NAMESPACE cpu_avx512
#define BSA_VEC_WIDTH 16
#include "bsa_cpu_kernel.inc"
