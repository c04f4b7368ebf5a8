// 16-lane float / uint32 vectors on AVX2 + FMA + F16C: two ymm registers each (lanes 0-7, 8-15).
// Same functions and lane-wise arithmetic as simd_avx512.h.

struct F16 { __m256 lo, hi; };
struct U16 { __m256i lo, hi; };
typedef uint32_t Mask;

// register budget (16 ymm, two per F16): see simd_avx512.h
constexpr int kDotRows = 1, kAccRows = 2, kAccVecs = 2, kFusedRows = 1;

static inline F16 f_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void f_store(float* p, F16 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
static inline F16 f_set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
static inline F16 f_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
#define TQ_F16_BINARY(name, op) \
  static inline F16 name(F16 a, F16 b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
TQ_F16_BINARY(f_add, _mm256_add_ps)
TQ_F16_BINARY(f_sub, _mm256_sub_ps)
TQ_F16_BINARY(f_mul, _mm256_mul_ps)
TQ_F16_BINARY(f_div, _mm256_div_ps)
TQ_F16_BINARY(f_max, _mm256_max_ps)
#undef TQ_F16_BINARY
static inline F16 f_fma(F16 a, F16 b, F16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline __m256 mask_half(Mask m) {  // lanes 0-7 of m as a vector mask
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)m), bits), bits));
}
static inline F16 f_select(Mask m, F16 a, F16 b) {
  return {_mm256_blendv_ps(b.lo, a.lo, mask_half(m)), _mm256_blendv_ps(b.hi, a.hi, mask_half(m >> 8))};
}
static inline Mask f_lt(F16 a, F16 b) {
  return (Mask)_mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OQ))
       | ((Mask)_mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OQ)) << 8);
}
static inline F16 f_round(F16 a) {
  return {_mm256_round_ps(a.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
          _mm256_round_ps(a.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
static inline U16 f_to_int(F16 a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
static inline F16 f_from_bits(U16 a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
static inline __m256 scale2_half(__m256 y, __m256 n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
static inline F16 f_scale2(F16 y, F16 n) { return {scale2_half(y.lo, n.lo), scale2_half(y.hi, n.hi)}; }
static inline __m256 lut_half(F16 table, __m256i idx) {
  const __m256 lo = _mm256_permutevar8x32_ps(table.lo, idx), hi = _mm256_permutevar8x32_ps(table.hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 picks the half
}
static inline F16 f_lut(F16 table, U16 idx) { return {lut_half(table, idx.lo), lut_half(table, idx.hi)}; }

static inline float f_hsum(F16 a) {
  __m256 s8 = _mm256_add_ps(a.lo, a.hi);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
static inline float f_hmax(F16 a) {
  __m256 s8 = _mm256_max_ps(a.lo, a.hi);
  __m128 s4 = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_max_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_max_ss(s2, _mm_movehdup_ps(s2)));
}

static inline U16 u_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline U16 u_inc(U16 a, Mask m) {  // + 1 in the lanes of m
  return {_mm256_sub_epi32(a.lo, _mm256_castps_si256(mask_half(m))),
          _mm256_sub_epi32(a.hi, _mm256_castps_si256(mask_half(m >> 8)))};
}
static inline void u_store(uint32_t* p, U16 a) {
  _mm256_storeu_si256((__m256i*)p, a.lo);
  _mm256_storeu_si256((__m256i*)(p + 8), a.hi);
}
static inline U16 u_add(U16 a, int x) {
  return {_mm256_add_epi32(a.lo, _mm256_set1_epi32(x)), _mm256_add_epi32(a.hi, _mm256_set1_epi32(x))};
}
static inline U16 u_shl(U16 a, int n) {
  return {_mm256_sll_epi32(a.lo, _mm_cvtsi32_si128(n)), _mm256_sll_epi32(a.hi, _mm_cvtsi32_si128(n))};
}
static inline U16 u_shr(U16 a, int n) {
  return {_mm256_srl_epi32(a.lo, _mm_cvtsi32_si128(n)), _mm256_srl_epi32(a.hi, _mm_cvtsi32_si128(n))};
}

static inline U16 u_gather32(const uint8_t* p, U16 off) {
  return {_mm256_i32gather_epi32((const int*)p, off.lo, 1), _mm256_i32gather_epi32((const int*)p, off.hi, 1)};
}
static inline U16 u_iota_times(int32_t step) {
  const __m256i s = _mm256_set1_epi32(step);
  return {_mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), s),
          _mm256_mullo_epi32(_mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15), s)};
}

static inline F16 f_from_half(U16 a) {
  alignas(32) uint32_t w[16];
  _mm256_store_si256((__m256i*)w, a.lo);
  _mm256_store_si256((__m256i*)(w + 8), a.hi);
  alignas(32) uint16_t h[16];
  for (int t = 0; t < 16; ++t) h[t] = (uint16_t)w[t];
  return {_mm256_cvtph_ps(_mm_load_si128((const __m128i*)h)), _mm256_cvtph_ps(_mm_load_si128((const __m128i*)(h + 8)))};
}

template <int B>
static inline U16 u_expand(uint64_t x) {
  if (B <= 2) {
    const __m256i w = _mm256_set1_epi32((int)x);
    return {_mm256_srlv_epi32(w, _mm256_load_si256((const __m256i*)kExpand<B>.bit)),
            _mm256_srlv_epi32(w, _mm256_load_si256((const __m256i*)(kExpand<B>.bit + 8)))};
  }
  const __m256i v = _mm256_set1_epi64x((long long)x);
  const __m256i lo = _mm256_shuffle_epi8(v, _mm256_load_si256((const __m256i*)kExpand<B>.ctrl));
  const __m256i hi = _mm256_shuffle_epi8(v, _mm256_load_si256((const __m256i*)(kExpand<B>.ctrl + 32)));
  return {_mm256_srlv_epi32(lo, _mm256_load_si256((const __m256i*)kExpand<B>.shift)),
          _mm256_srlv_epi32(hi, _mm256_load_si256((const __m256i*)(kExpand<B>.shift + 8)))};
}
