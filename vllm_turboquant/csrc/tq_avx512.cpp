// The kernels compiled for one ISA (avx512; setup.py builds this file with
// -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma -mf16c).
#if defined(__GNUC__) && !defined(__clang__)  // before the intrinsics headers: their `__Y = __Y` idiom
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // (GCC 12, with -Wall) warns where it is inlined
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "tq_internal.h"

namespace tq {
namespace avx512 {
#include "common.inc"
#include "simd_avx512.h"
#include "kernels.inc"
}  // namespace avx512

const Kernels kernels_avx512 = avx512::kKernels;
}  // namespace tq
