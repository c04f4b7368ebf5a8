// 16-lane float / uint32 vectors on AVX-512 (F, BW, DQ, VL): one zmm register each.
// Included inside the ISA's namespace by tq_avx512.cpp; every ISA layer offers the same functions
// with the same lane-wise arithmetic, so the kernels give the same bits on each.

struct F16 { __m512 v; };
struct U16 { __m512i v; };
typedef uint32_t Mask;  // bit t = lane t

// register budget (32 zmm): rows per block of dot products, rows and 16-lane vectors per block of value
// accumulation, rows decoded in registers (more go through the tile buffers). None changes any lane's arithmetic.
constexpr int kDotRows = 4, kAccRows = 4, kAccVecs = 4, kFusedRows = 4;

static inline F16 f_load(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline void f_store(float* p, F16 a) { _mm512_storeu_ps(p, a.v); }
static inline F16 f_set1(float x) { return {_mm512_set1_ps(x)}; }
static inline F16 f_zero() { return {_mm512_setzero_ps()}; }
static inline F16 f_add(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline F16 f_sub(F16 a, F16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
static inline F16 f_mul(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
static inline F16 f_div(F16 a, F16 b) { return {_mm512_div_ps(a.v, b.v)}; }
static inline F16 f_fma(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a * b + c
static inline F16 f_max(F16 a, F16 b) { return {_mm512_max_ps(a.v, b.v)}; }
static inline F16 f_select(Mask m, F16 a, F16 b) { return {_mm512_mask_blend_ps((__mmask16)m, b.v, a.v)}; }
static inline Mask f_lt(F16 a, F16 b) { return (Mask)_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
static inline F16 f_round(F16 a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
static inline U16 f_to_int(F16 a) { return {_mm512_cvtps_epi32(a.v)}; }  // a integral
static inline F16 f_from_bits(U16 a) { return {_mm512_castsi512_ps(a.v)}; }
// y * 2^n for integral n with a normal result (exact, as a multiplication by 2^n is)
static inline F16 f_scale2(F16 y, F16 n) { return {_mm512_scalef_ps(y.v, n.v)}; }
// table[idx & 15]
static inline F16 f_lut(F16 table, U16 idx) { return {_mm512_permutexvar_ps(idx.v, table.v)}; }

// lane sums and maxima in one fixed tree: (i, i+8), then (i, i+4), (i, i+2), (0, 1)
static inline float f_hsum(F16 a) {
  __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a.v), _mm512_extractf32x8_ps(a.v, 1));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
static inline float f_hmax(F16 a) { return _mm512_reduce_max_ps(a.v); }

static inline U16 u_zero() { return {_mm512_setzero_si512()}; }
static inline U16 u_inc(U16 a, Mask m) { return {_mm512_mask_add_epi32(a.v, (__mmask16)m, a.v, _mm512_set1_epi32(1))}; }
static inline void u_store(uint32_t* p, U16 a) { _mm512_storeu_si512((void*)p, a.v); }
static inline U16 u_add(U16 a, int x) { return {_mm512_add_epi32(a.v, _mm512_set1_epi32(x))}; }
static inline U16 u_shl(U16 a, int n) { return {_mm512_sll_epi32(a.v, _mm_cvtsi32_si128(n))}; }
static inline U16 u_shr(U16 a, int n) { return {_mm512_srl_epi32(a.v, _mm_cvtsi32_si128(n))}; }

// lane t = the 4 bytes at p + off[t] (little-endian)
static inline U16 u_gather32(const uint8_t* p, U16 off) { return {_mm512_i32gather_epi32(off.v, (const void*)p, 1)}; }
static inline U16 u_iota_times(int32_t step) {  // lane t = t * step
  return {_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                             _mm512_set1_epi32(step))};
}

// fp16 bits in the low half of each lane -> float
static inline F16 f_from_half(U16 a) { return {_mm512_cvtph_ps(_mm512_cvtepi32_epi16(a.v))}; }

// lane i = x >> (B * i) (the code of coordinate i in its low B bits, then the following bits)
template <int B>
static inline U16 u_expand(uint64_t x) {
  if (B <= 2)  // 16 codes in 32 bits: shift the broadcast word
    return {_mm512_srlv_epi32(_mm512_set1_epi32((int)x), _mm512_load_si512((const void*)kExpand<B>.bit))};
  const __m512i bytes = _mm512_shuffle_epi8(_mm512_set1_epi64((long long)x),
                                            _mm512_load_si512((const void*)kExpand<B>.ctrl));
  return {_mm512_srlv_epi32(bytes, _mm512_load_si512((const void*)kExpand<B>.shift))};
}
