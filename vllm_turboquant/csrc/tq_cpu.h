// The compiled CPU implementation of the TurboQuant attention ops: the C interface that
// vllm_turboquant/cpu_ops.py loads with ctypes, and what the per-ISA kernels share.
//
// Plain C structs over raw pointers: no Python or torch headers, no C++ ABI across the boundary.
// The layout, the math and the ops' semantics are documented in vllm_turboquant/ops.py
// (the contract), layout.py (byte offsets) and reference.py (the float64 ground truth).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TQ_ABI_VERSION 4

// element types of the tensors handed in (tq_dtype)
enum { TQ_F32 = 0, TQ_F16 = 1, TQ_BF16 = 2, TQ_F64 = 3, TQ_I32 = 4, TQ_I64 = 5 };

// A layer's tables and slot layout (copied and preprocessed by tq_layer_new; the pointers need
// not outlive the call). Tensors are contiguous float32 with leading dim H (KV heads).
typedef struct {
  int32_t head_dim, num_heads, key_bits, value_bits, qjl_dim;
  int32_t off_key_codes, off_key_signs, off_key_norm, off_key_gamma, off_value_codes, off_value_norm;
  int32_t slot_bytes;
  float qjl_coef;                 // lambda sqrt(pi/2) / m (0 without a sketch)
  const float* key_rotation;      // (H, d, d): y = R x
  const float* value_rotation;    // (H, d, d)
  const float* qjl;               // (H, m, d)
  const float* key_boundaries;    // (H, 2^kb - 1)
  const float* key_centroids;     // (H, 2^kb)
  const float* value_boundaries;  // (H, 2^vb - 1)
  const float* value_centroids;   // (H, 2^vb)
  const float* key_mean;          // (H, d)
} TqLayerDesc;

// The paged cache: uint8 [num_blocks, block_size, H, slot_bytes], byte strides of the first three
// dims (the last is 1).
typedef struct {
  uint8_t* data;
  int64_t stride_block, stride_token, stride_head;
  int64_t num_blocks;
  int32_t block_size;
} TqCache;

// The exact copies of protected tokens (protected.py): a second paged cache
// [num_blocks, block_size, H, 2 d] of rows R_k (k - mu) | R_v v in the model dtype; byte strides of
// the first three dims (the last is contiguous). data NULL = none.
typedef struct {
  uint8_t* data;
  int64_t stride_block, stride_token, stride_head;
  int64_t num_blocks;
  int32_t block_size;
  int32_t dtype;  // TQ_F32 / TQ_F16 / TQ_BF16 / TQ_F64
} TqExactCache;

// write_cache: encode n tokens (key/value (n, H, d), any float dtype and strides of the first two
// dims in elements, the last contiguous) into the slots slot_mapping[i] (negative = skip).
typedef struct {
  TqCache cache;
  const void* key;
  const void* value;
  int32_t kv_dtype;
  int64_t key_stride_token, key_stride_head, value_stride_token, value_stride_head;
  const void* slot_mapping;
  int32_t slot_dtype;  // TQ_I32 / TQ_I64
  int64_t num_tokens;
  // exact copies: token i also goes to flat slot exact_slot_mapping[i] of exact (negative = none)
  TqExactCache exact;
  const void* exact_slot_mapping;
  int32_t exact_slot_dtype;
  int32_t num_threads;
} TqWriteArgs;

// attention (paged decode and prefill): query rows (T, Hq, d); sequence b owns rows
// query_start_loc[b] .. query_start_loc[b+1] (NULL: row b, one query per sequence) at positions
// seq_lens[b] - q_len ... seq_lens[b] - 1. A query at q sees keys k <= q (and k > q - sliding_window).
// chunk: TQ_CHUNK_CACHED reads every key from the caches; TQ_CHUNK_EXACT attends the chunk's own
// keys/values (key/value rows of the same index, (T, H, d)) exactly; TQ_CHUNK_SKIP leaves them out
// (the caller attends them and merges, using lse). The keys read from the caches come from their slots,
// except, with sink + window > 0, a protected key (k < sink or k > q - window, before the chunk unless
// TQ_CHUNK_CACHED) which is read from its exact copy (exact cache, exact_block_table). A TQ_CHUNK_CACHED
// prefill (query_start_loc set) given key/value makes its chunk's own copies from them instead, rounded to
// the exact cache's dtype as tq_write_cache stores them (so the cache need not hold them); without key/value
// they are read from the exact cache too. out: float32
// (T, Hq, d) contiguous, every row written (zeros for rows no sequence owns or that see no key); lse
// (optional, float32 (T, Hq)): log sum_k exp(scale <q, k - mu>) over the keys attended, -inf for none.
typedef struct {
  TqCache cache;
  const void* query;
  int32_t q_dtype;
  int64_t q_stride_token, q_stride_head;
  int64_t num_rows;     // T
  int32_t num_q_heads;  // Hq
  const void* key;      // TQ_CHUNK_EXACT; TQ_CHUNK_CACHED prefill with protected tokens (else NULL)
  const void* value;
  int32_t kv_dtype;
  int64_t key_stride_token, key_stride_head, value_stride_token, value_stride_head;
  const void* block_table;
  int32_t block_table_dtype;
  int64_t block_table_stride;  // elements per row
  int64_t block_table_cols;    // blocks per row
  const void* seq_lens;
  int32_t seq_lens_dtype;
  const void* query_start_loc;  // NULL for decode
  int32_t query_start_loc_dtype;
  int64_t num_seqs;
  float scale;
  int32_t sliding_window;  // 0 = none
  int32_t chunk;  // TQ_CHUNK_*
  int32_t sink, window;  // protected tokens (0, 0 = none)
  TqExactCache exact;
  const void* exact_block_table;
  int32_t exact_block_table_dtype;
  int64_t exact_block_table_stride, exact_block_table_cols;
  float* out;
  float* lse;
  int32_t num_threads;
} TqAttnArgs;

enum { TQ_CHUNK_CACHED = 0, TQ_CHUNK_EXACT = 1, TQ_CHUNK_SKIP = 2 };

// ISA choice (tq_set_isa / tq_isa): the best the CPU supports unless forced.
enum { TQ_ISA_GENERIC = 0, TQ_ISA_AVX2 = 1, TQ_ISA_AVX512 = 2 };

int tq_abi_version(void);
int tq_isa(void);                // the ISA in use
int tq_isa_supported(int isa);   // 1 when this build has it and the CPU runs it
int tq_set_isa(int isa);         // 0 on success, -1 when unsupported
void* tq_layer_new(const TqLayerDesc* desc);  // NULL on bad arguments or allocation failure
void tq_layer_free(void* layer);
int tq_write_cache(const void* layer, const TqWriteArgs* args);   // 0 on success
int tq_attention(const void* layer, const TqAttnArgs* args);      // 0 on success
const char* tq_last_error(void);

#ifdef __cplusplus
}
#endif
