// 16-lane float / uint32 vectors in portable C++ (any CPU; the compiler vectorises what it can).
// Same functions and lane-wise arithmetic as simd_avx512.h: fmaf is a fused multiply-add, as
// vfmadd is, and nothing is contracted or reassociated (-ffp-contract=off, no -ffast-math).

struct F16 { float v[16]; };
struct U16 { uint32_t v[16]; };
typedef uint32_t Mask;

#define TQ_LANES(expr) for (int i = 0; i < 16; ++i) { expr; }
// register budget: see simd_avx512.h
constexpr int kDotRows = 4, kAccRows = 4, kAccVecs = 4, kFusedRows = 4;

static inline F16 f_load(const float* p) { F16 r; TQ_LANES(r.v[i] = p[i]) return r; }
static inline void f_store(float* p, F16 a) { TQ_LANES(p[i] = a.v[i]) }
static inline F16 f_set1(float x) { F16 r; TQ_LANES(r.v[i] = x) return r; }
static inline F16 f_zero() { return f_set1(0.0f); }
static inline F16 f_add(F16 a, F16 b) { F16 r; TQ_LANES(r.v[i] = a.v[i] + b.v[i]) return r; }
static inline F16 f_sub(F16 a, F16 b) { F16 r; TQ_LANES(r.v[i] = a.v[i] - b.v[i]) return r; }
static inline F16 f_mul(F16 a, F16 b) { F16 r; TQ_LANES(r.v[i] = a.v[i] * b.v[i]) return r; }
static inline F16 f_div(F16 a, F16 b) { F16 r; TQ_LANES(r.v[i] = a.v[i] / b.v[i]) return r; }
static inline F16 f_fma(F16 a, F16 b, F16 c) { F16 r; TQ_LANES(r.v[i] = std::fma(a.v[i], b.v[i], c.v[i])) return r; }
// vmaxps semantics: the second operand when either is NaN or both are zeros
static inline F16 f_max(F16 a, F16 b) { F16 r; TQ_LANES(r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]) return r; }
static inline F16 f_select(Mask m, F16 a, F16 b) { F16 r; TQ_LANES(r.v[i] = (m >> i) & 1 ? a.v[i] : b.v[i]) return r; }
static inline Mask f_lt(F16 a, F16 b) { Mask m = 0; TQ_LANES(m |= (Mask)(a.v[i] < b.v[i]) << i) return m; }
static inline F16 f_round(F16 a) { F16 r; TQ_LANES(r.v[i] = std::nearbyint(a.v[i])) return r; }
static inline U16 f_to_int(F16 a) { U16 r; TQ_LANES(r.v[i] = (uint32_t)(int32_t)a.v[i]) return r; }
static inline F16 f_from_bits(U16 a) { F16 r; memcpy(r.v, a.v, sizeof r.v); return r; }
static inline F16 f_scale2(F16 y, F16 n) {
  F16 r; TQ_LANES(r.v[i] = y.v[i] * bits_float((uint32_t)((int32_t)n.v[i] + 127) << 23)) return r;
}
static inline F16 f_lut(F16 table, U16 idx) { F16 r; TQ_LANES(r.v[i] = table.v[idx.v[i] & 15]) return r; }

static inline float f_hsum(F16 a) {
  float s8[8], s4[4];
  for (int i = 0; i < 8; ++i) s8[i] = a.v[i] + a.v[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  const float s0 = s4[0] + s4[2], s1 = s4[1] + s4[3];
  return s0 + s1;
}
static inline float f_hmax(F16 a) {
  float m = a.v[0];
  for (int i = 1; i < 16; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}

static inline U16 u_zero() { U16 r; TQ_LANES(r.v[i] = 0) return r; }
static inline U16 u_inc(U16 a, Mask m) { U16 r; TQ_LANES(r.v[i] = a.v[i] + ((m >> i) & 1)) return r; }
static inline void u_store(uint32_t* p, U16 a) { TQ_LANES(p[i] = a.v[i]) }
static inline U16 u_add(U16 a, int x) { U16 r; TQ_LANES(r.v[i] = a.v[i] + (uint32_t)x) return r; }
static inline U16 u_shl(U16 a, int n) { U16 r; TQ_LANES(r.v[i] = a.v[i] << n) return r; }
static inline U16 u_shr(U16 a, int n) { U16 r; TQ_LANES(r.v[i] = a.v[i] >> n) return r; }

static inline U16 u_gather32(const uint8_t* p, U16 off) {
  U16 r;
  for (int t = 0; t < 16; ++t) memcpy(&r.v[t], p + (int32_t)off.v[t], 4);
  return r;
}
static inline U16 u_iota_times(int32_t step) { U16 r; TQ_LANES(r.v[i] = (uint32_t)(i * step)) return r; }

static inline F16 f_from_half(U16 a) { F16 r; TQ_LANES(r.v[i] = half_to_float((uint16_t)a.v[i])) return r; }

template <int B>
static inline U16 u_expand(uint64_t x) { U16 r; TQ_LANES(r.v[i] = (uint32_t)(x >> (B * i))) return r; }
#undef TQ_LANES
