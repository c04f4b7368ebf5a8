// The kernels compiled for one ISA (avx2; setup.py builds this file with
// -mavx2 -mfma -mf16c).
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
namespace avx2 {
#include "common.inc"
#include "simd_avx2.h"
#include "kernels.inc"
}  // namespace avx2

const Kernels kernels_avx2 = avx2::kKernels;
}  // namespace tq
