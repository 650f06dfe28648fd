// Which CPU code paths this build has. The SIMD kernels are x86 (AVX-512, AMX) and chosen at run time by
// has_avx512() / has_amx(); elsewhere (or with -DSTEP3VL_FORCE_PORTABLE, which CI compiles to keep the fallback
// building) only the portable loops exist and the engine keeps its PyTorch path.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(STEP3VL_FORCE_PORTABLE)
#define STEP3VL_X86 1
#include <immintrin.h>
// Plain loops compiled once per ISA and picked at load time.
#define STEP3VL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define STEP3VL_X86 0
#define STEP3VL_CLONES
#endif
