// What the C API (tq_api.cpp) and the per-ISA kernels (kernels.inc) share: a layer's tables,
// preprocessed once by tq_layer_new, and the kernel entry points of one ISA.
#pragma once
#include <stdint.h>

#include <vector>

#include "tq_cpu.h"

namespace tq {

constexpr int LANES = 16;  // tokens per tile; every ISA computes 16 lanes the same way

inline int pad16(int n) { return (n + LANES - 1) / LANES * LANES; }

struct Layer {
  int d, dp;   // head_dim, padded to a multiple of 16
  int H;       // KV heads
  int kb, vb;  // key / value code bits
  int m, mp;   // QJL sketch size, padded to a multiple of 16
  int off_key_codes, off_key_signs, off_key_norm, off_key_gamma, off_value_codes, off_value_norm;
  int slot_bytes;
  float coef;
  // attention (float32), per head; rows padded to dp / mp with zeros
  std::vector<float> key_rot_t;    // (H, d, dp): row i = column i of R_k, so R_k q = sum_i q_i row_i
  std::vector<float> value_rot;    // (H, d, dp): row e = row e of R_v, so R_v^T o = sum_e o_e row_e
  std::vector<float> value_rot_t;  // (H, d, dp): row i = column i of R_v
  std::vector<float> qjl_t;        // (H, d, mp): row e = column e of S
  std::vector<float> key_mean;     // (H, dp)
  std::vector<float> key_lut;      // (H, 16): entry c = key centroid (c mod 2^kb)
  std::vector<float> value_lut;    // (H, 16)
  // encoder (float64, what the reference computes in)
  std::vector<double> key_rot_t64, value_rot_t64;  // (H, d, dp)
  std::vector<double> qjl_t64;                     // (H, d, mp)
  std::vector<double> key_bounds, value_bounds;    // (H, 16): 2^b - 1 boundaries, then +inf
  std::vector<double> key_cent;                    // (H, 16): 2^kb centroids
  std::vector<double> key_mean64;                  // (H, d)
  // the float32 encoder (presets without a QJL sketch): boundaries (H, 16) (+inf padded); for code c its
  // cell's lower and upper boundary (H, 16) (-inf / +inf at the ends); per head the bound on |y32 - y64|
  std::vector<float> key_bounds32, value_bounds32, key_cell_lo, key_cell_hi, value_cell_lo, value_cell_hi;
  std::vector<float> key_eps, value_eps;
};

// One unit of attention work: queries [q_first, q_first + q_count) of sequence seq, KV head head.
struct Item {
  int64_t seq;
  int32_t head;
  int32_t q_first, q_count;
};

// Per-sequence facts the planner resolved (row offset in the query tensor, context, length).
struct SeqInfo {
  int64_t row0;    // first query row
  int32_t q_len;   // queries of this sequence
  int32_t len;     // seq_lens[b]: tokens in the cache, the queries' own included
};

struct AttnJob {
  const Layer* layer;
  const TqAttnArgs* args;
  const SeqInfo* seqs;
  // the chunk's own rows (T, H, 2, dp), float32: TQ_CHUNK_EXACT (chunk_rows), a compressed prefill chunk with
  // protected tokens and its key/value (chunk_copies); else NULL
  const float* chunk;
};

struct Kernels {
  // encode tokens [begin, end) of args (all heads) into their slots
  void (*encode)(const Layer&, const TqWriteArgs&, int64_t begin, int64_t end);
  // rotated exact rows (R_k (k - mu), R_v v) of query rows [begin, end) into chunk (T, H, 2, dp)
  void (*chunk_rows)(const Layer&, const TqAttnArgs&, float* chunk, int64_t begin, int64_t end);
  // the same rows rotated in float64 and rounded to the exact-copy cache's dtype, as write_cache stores them
  void (*chunk_copies)(const Layer&, const TqAttnArgs&, float* chunk, int64_t begin, int64_t end);
  // one attention item
  void (*attend)(const AttnJob&, const Item&);
};

// which kernels this build has (setup.py leaves out an ISA its compiler refuses)
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(TQ_GENERIC_ONLY) && !defined(TQ_WITHOUT_AVX512)
#define TQ_HAVE_AVX512 1
#else
#define TQ_HAVE_AVX512 0
#endif
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(TQ_GENERIC_ONLY) && !defined(TQ_WITHOUT_AVX2)
#define TQ_HAVE_AVX2 1
#else
#define TQ_HAVE_AVX2 0
#endif

extern const Kernels kernels_generic;
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;

}  // namespace tq
