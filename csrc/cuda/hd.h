// Shared by the .cu kernels and the host build (csrc/bind_cuda_index.cpp): portable types and the HD macro.
// NVRTC compiles without the C++ standard library, so fixed-width types are spelled out there.
#pragma once

#ifdef __CUDACC__
#define HD __host__ __device__ __forceinline__
#else
#define HD inline
#endif

#ifdef __CUDACC_RTC__
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <cstdint>
#endif

namespace step3vl {

struct Range64 {
  int64_t begin;
  int64_t end;  // exclusive; begin >= end means empty
};

HD int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace step3vl
