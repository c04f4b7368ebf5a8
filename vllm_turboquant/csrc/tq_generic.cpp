// The kernels compiled for one ISA (generic: portable C++, built with the target's baseline flags;
// the only kernels on aarch64 and other non-x86 targets).
#include <math.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "tq_internal.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on its own intrinsics headers
#endif

namespace tq {
namespace generic {
#include "common.inc"
#include "simd_generic.h"
#include "kernels.inc"
}  // namespace generic

const Kernels kernels_generic = generic::kKernels;
}  // namespace tq
