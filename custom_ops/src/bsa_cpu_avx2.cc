// The CPU kernel compiled for one instruction set (see CMakeLists.txt for its
// flags and block_sparse_attention_cpu.cc for the run-time choice).
#define BSA_ISA_NAMESPACE cpu_avx2
#define BSA_VEC_WIDTH 8
#include "bsa_cpu_kernel.inc"
