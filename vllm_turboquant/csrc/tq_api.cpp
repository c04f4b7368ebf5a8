// The C interface of the compiled CPU ops (declared in tq_cpu.h): ISA dispatch, a layer's tables
// preprocessed once, the work plan of an attention call and a small thread pool over its items.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#ifdef __linux__
#include <dirent.h>
#include <sched.h>
#include <stdlib.h>
#include <unistd.h>
#endif

#include "tq_internal.h"

#define TQ_EXPORT extern "C" __attribute__((visibility("default")))

namespace tq {
namespace {

thread_local std::string g_error;

int fail(const std::string& msg) {
  g_error = msg;
  return -1;
}

bool cpu_has(int isa) {
  if (isa == TQ_ISA_GENERIC) return true;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (isa == TQ_ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == TQ_ISA_AVX512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
#endif
  return false;
}

const Kernels* kernels_of(int isa) {
#if TQ_HAVE_AVX512
  if (isa == TQ_ISA_AVX512) return &kernels_avx512;
#endif
#if TQ_HAVE_AVX2
  if (isa == TQ_ISA_AVX2) return &kernels_avx2;
#endif
  return isa == TQ_ISA_GENERIC ? &kernels_generic : nullptr;
}

int best_isa() {
  for (int isa : {TQ_ISA_AVX512, TQ_ISA_AVX2})
    if (kernels_of(isa) && cpu_has(isa)) return isa;
  return TQ_ISA_GENERIC;
}

std::atomic<int> g_isa{-1};

const Kernels* active_kernels() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = best_isa();
    g_isa.store(isa);
  }
  return kernels_of(isa);
}

// ---------------------------------------------------------------------------------------------
// thread pool: items 0..n-1 handed out dynamically (results do not depend on who computes what)
// ---------------------------------------------------------------------------------------------

#ifdef __linux__
// The CPUs any thread of this process may run on. vLLM's CPU worker binds its OpenMP threads one per
// core (the calling thread to the first): a worker created by the caller inherits the caller's single
// core, so workers widen their mask to the cores the process's threads are bound to.
bool process_cpus(cpu_set_t* out) {
  CPU_ZERO(out);
  DIR* dir = opendir("/proc/self/task");
  if (!dir) return false;
  bool any = false;
  while (dirent* e = readdir(dir)) {
    const int tid = atoi(e->d_name);
    cpu_set_t s;
    if (tid > 0 && sched_getaffinity(tid, sizeof s, &s) == 0) {
      CPU_OR(out, out, &s);
      any = true;
    }
  }
  closedir(dir);
  return any;
}
#endif

class Pool {
 public:
  void run(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
    threads = (int)std::min<int64_t>(threads, n);
    if (threads <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> one_at_a_time(call_mu_);
    start_workers(threads - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      active_ = threads - 1;
      pending_ = threads - 1;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return pending_ == 0; });
  }

 private:
  void work() {
    for (int64_t i; (i = next_.fetch_add(1)) < n_;) (*fn_)(i);
  }

  void start_workers(int count) {
#ifdef __linux__
    if (owner_ != getpid()) {  // a forked child has none of its parent's threads
      for (auto& t : workers_) t.detach();
      workers_.clear();
      owner_ = getpid();
    }
#endif
    while ((int)workers_.size() < count) {
      const int index = (int)workers_.size();
      workers_.emplace_back([this, index] { loop(index); });
    }
  }

  void loop(int index) {
#ifdef __linux__
    cpu_set_t mine, all;
    if (sched_getaffinity(0, sizeof mine, &mine) == 0 && CPU_COUNT(&mine) <= index + 1 && process_cpus(&all) &&
        CPU_COUNT(&all) > CPU_COUNT(&mine))
      sched_setaffinity(0, sizeof all, &all);
#endif
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= active_) continue;
      }
      work();
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::atomic<int64_t> next_{0};
  int64_t n_ = 0;
  int active_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
#ifdef __linux__
  pid_t owner_ = getpid();
#endif
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers may outlive static destruction
  return *p;
}

int64_t index_at(const void* base, int dtype, int64_t i) {
  return dtype == TQ_I32 ? (int64_t)((const int32_t*)base)[i] : ((const int64_t*)base)[i];
}

bool bad_cache(const TqCache& c, const Layer& L) {
  return !c.data || c.block_size < 1 || c.num_blocks < 0 || L.slot_bytes < 1;
}

}  // namespace
}  // namespace tq

using namespace tq;

TQ_EXPORT int tq_abi_version(void) { return TQ_ABI_VERSION; }

TQ_EXPORT int tq_isa(void) {
  active_kernels();
  return g_isa.load();
}

TQ_EXPORT int tq_isa_supported(int isa) { return kernels_of(isa) && cpu_has(isa) ? 1 : 0; }

TQ_EXPORT int tq_set_isa(int isa) {
  if (!tq_isa_supported(isa)) return fail("ISA " + std::to_string(isa) + " is not available on this CPU or build");
  g_isa.store(isa);
  return 0;
}

TQ_EXPORT const char* tq_last_error(void) { return g_error.c_str(); }

TQ_EXPORT void* tq_layer_new(const TqLayerDesc* D) {
  if (!D || D->head_dim <= 0 || D->head_dim % 8 || D->head_dim > 512 || D->num_heads < 1 || D->key_bits < 1 ||
      D->key_bits > 4 || D->value_bits < 1 || D->value_bits > 4 || D->qjl_dim < 0 || D->qjl_dim % 8 ||
      !D->key_rotation || !D->value_rotation || !D->key_boundaries || !D->key_centroids || !D->value_boundaries ||
      !D->value_centroids || !D->key_mean || (D->qjl_dim && !D->qjl)) {
    fail("tq_layer_new: invalid layer description");
    return nullptr;
  }
  Layer* L = new (std::nothrow) Layer();
  if (!L) return nullptr;
  const int d = D->head_dim, H = D->num_heads, m = D->qjl_dim;
  const int dp = pad16(d), mp = pad16(m);
  const int nk = 1 << D->key_bits, nv = 1 << D->value_bits;
  L->d = d, L->dp = dp, L->H = H, L->kb = D->key_bits, L->vb = D->value_bits, L->m = m, L->mp = mp;
  L->off_key_codes = D->off_key_codes, L->off_key_signs = D->off_key_signs, L->off_key_norm = D->off_key_norm;
  L->off_key_gamma = D->off_key_gamma, L->off_value_codes = D->off_value_codes;
  L->off_value_norm = D->off_value_norm, L->slot_bytes = D->slot_bytes, L->coef = D->qjl_coef;
  const size_t hdd = (size_t)d * dp, hdm = (size_t)d * mp;
  try {
    L->key_rot_t.assign(H * hdd, 0.0f), L->value_rot.assign(H * hdd, 0.0f), L->value_rot_t.assign(H * hdd, 0.0f);
    L->qjl_t.assign(H * hdm, 0.0f), L->key_mean.assign((size_t)H * dp, 0.0f);
    L->key_lut.assign((size_t)H * 16, 0.0f), L->value_lut.assign((size_t)H * 16, 0.0f);
    L->key_rot_t64.assign(H * hdd, 0.0), L->value_rot_t64.assign(H * hdd, 0.0), L->qjl_t64.assign(H * hdm, 0.0);
    L->key_bounds.assign((size_t)H * 16, INFINITY), L->value_bounds.assign((size_t)H * 16, INFINITY);
    L->key_cent.assign((size_t)H * 16, 0.0), L->key_mean64.assign((size_t)H * d, 0.0);
  } catch (const std::bad_alloc&) {
    delete L;
    fail("tq_layer_new: out of memory");
    return nullptr;
  }
  for (int h = 0; h < H; ++h) {
    const float* rk = D->key_rotation + (size_t)h * d * d;
    const float* rv = D->value_rotation + (size_t)h * d * d;
    for (int e = 0; e < d; ++e)
      for (int i = 0; i < d; ++i) {
        L->key_rot_t[h * hdd + (size_t)i * dp + e] = rk[(size_t)e * d + i];
        L->key_rot_t64[h * hdd + (size_t)i * dp + e] = rk[(size_t)e * d + i];
        L->value_rot[h * hdd + (size_t)e * dp + i] = rv[(size_t)e * d + i];
        L->value_rot_t[h * hdd + (size_t)i * dp + e] = rv[(size_t)e * d + i];
        L->value_rot_t64[h * hdd + (size_t)i * dp + e] = rv[(size_t)e * d + i];
      }
    for (int k = 0; k < m; ++k)
      for (int e = 0; e < d; ++e) {
        const float s = D->qjl[((size_t)h * m + k) * d + e];
        L->qjl_t[h * hdm + (size_t)e * mp + k] = s;
        L->qjl_t64[h * hdm + (size_t)e * mp + k] = s;
      }
    for (int j = 0; j < d; ++j) {
      L->key_mean[(size_t)h * dp + j] = D->key_mean[(size_t)h * d + j];
      L->key_mean64[(size_t)h * d + j] = D->key_mean[(size_t)h * d + j];
    }
    for (int c = 0; c < 16; ++c) {
      L->key_lut[h * 16 + c] = D->key_centroids[(size_t)h * nk + (c & (nk - 1))];
      L->value_lut[h * 16 + c] = D->value_centroids[(size_t)h * nv + (c & (nv - 1))];
    }
    for (int k = 0; k < nk - 1; ++k) L->key_bounds[h * 16 + k] = D->key_boundaries[(size_t)h * (nk - 1) + k];
    for (int k = 0; k < nv - 1; ++k) L->value_bounds[h * 16 + k] = D->value_boundaries[(size_t)h * (nv - 1) + k];
    for (int c = 0; c < nk; ++c) L->key_cent[h * 16 + c] = D->key_centroids[(size_t)h * nk + c];
  }
  // the float32 encoder's tables: y32 = R u in float32 is within (d + 2) 2^-24 max_e |R_e| |u| of the
  // float64 y (a float32 dot product of d FMAs, plus u's rounding; |u| = 1); eps doubles that
  auto fast_tables = [&](const float* rot, const float* bounds, int levels, std::vector<float>& b32,
                         std::vector<float>& lo, std::vector<float>& hi, std::vector<float>& eps) {
    b32.assign((size_t)H * 16, INFINITY), lo.assign((size_t)H * 16, -INFINITY), hi.assign((size_t)H * 16, INFINITY);
    eps.assign(H, 0.0f);
    for (int h = 0; h < H; ++h) {
      for (int k = 0; k < levels - 1; ++k) {
        const float b = bounds[(size_t)h * (levels - 1) + k];
        b32[h * 16 + k] = b, hi[h * 16 + k] = b, lo[h * 16 + k + 1] = b;
      }
      double worst = 0.0;
      for (int e = 0; e < d; ++e) {
        double r2 = 0.0;
        for (int i = 0; i < d; ++i) r2 += (double)rot[((size_t)h * d + e) * d + i] * rot[((size_t)h * d + e) * d + i];
        worst = std::max(worst, std::sqrt(r2));
      }
      eps[h] = (float)(2.0 * (d + 2) * std::ldexp(1.0, -24) * worst * 1.0001);
    }
  };
  fast_tables(D->key_rotation, D->key_boundaries, nk, L->key_bounds32, L->key_cell_lo, L->key_cell_hi, L->key_eps);
  fast_tables(D->value_rotation, D->value_boundaries, nv, L->value_bounds32, L->value_cell_lo, L->value_cell_hi,
              L->value_eps);
  return L;
}

TQ_EXPORT void tq_layer_free(void* layer) { delete static_cast<Layer*>(layer); }

TQ_EXPORT int tq_write_cache(const void* layer, const TqWriteArgs* A) {
  if (!layer || !A) return fail("tq_write_cache: null argument");
  const Layer& L = *static_cast<const Layer*>(layer);
  if (A->num_tokens <= 0) return 0;
  if (bad_cache(A->cache, L) || !A->key || !A->value || !A->slot_mapping) return fail("tq_write_cache: bad arguments");
  const int64_t num_slots = A->cache.num_blocks * A->cache.block_size;
  const int64_t exact_slots = A->exact.data ? A->exact.num_blocks * A->exact.block_size : 0;
  if (A->exact.data && (!A->exact_slot_mapping || A->exact.block_size < 1))
    return fail("tq_write_cache: bad exact-copy arguments");
  for (int64_t i = 0; i < A->num_tokens; ++i) {
    const int64_t s = index_at(A->slot_mapping, A->slot_dtype, i);
    if (s >= num_slots) return fail("slot_mapping[" + std::to_string(i) + "] = " + std::to_string(s) +
                                    " is outside the cache (" + std::to_string(num_slots) + " slots)");
    const int64_t e = A->exact.data ? index_at(A->exact_slot_mapping, A->exact_slot_dtype, i) : -1;
    if (e >= exact_slots) return fail("exact_slot_mapping[" + std::to_string(i) + "] = " + std::to_string(e) +
                                      " is outside the exact-copy cache (" + std::to_string(exact_slots) + " slots)");
  }
  const Kernels* K = active_kernels();
  constexpr int64_t per_item = 4;  // tokens per work item
  const int64_t items = (A->num_tokens + per_item - 1) / per_item;
  pool().run(items, A->num_threads, [&](int64_t i) {
    K->encode(L, *A, i * per_item, std::min(A->num_tokens, (i + 1) * per_item));
  });
  return 0;
}

TQ_EXPORT int tq_attention(const void* layer, const TqAttnArgs* A) {
  if (!layer || !A) return fail("tq_attention: null argument");
  const Layer& L = *static_cast<const Layer*>(layer);
  if (bad_cache(A->cache, L) || !A->query || !A->out || !A->seq_lens || (A->num_seqs > 0 && !A->block_table))
    return fail("tq_attention: bad arguments");
  if (A->num_q_heads < 1 || A->num_q_heads % L.H)
    return fail("query heads (" + std::to_string(A->num_q_heads) + ") must be a multiple of the KV heads (" +
                std::to_string(L.H) + ")");
  if (A->chunk < TQ_CHUNK_CACHED || A->chunk > TQ_CHUNK_SKIP) return fail("tq_attention: bad chunk mode");
  if (A->chunk == TQ_CHUNK_EXACT && (!A->key || !A->value)) return fail("tq_attention: TQ_CHUNK_EXACT needs the chunk's key/value");
  const bool guard = A->sink + A->window > 0;
  if (A->sink < 0 || A->window < 0 || (guard && (!A->exact.data || !A->exact_block_table || A->exact.block_size < 1)))
    return fail("tq_attention: bad protected-token arguments");
  const int64_t B = A->num_seqs, T = A->num_rows, row_bytes = (int64_t)A->num_q_heads * L.d * sizeof(float);
  const bool decode = A->query_start_loc == nullptr;
  // a compressed prefill chunk's own protected keys: from its key/value when given (chunk_copies), else the cache
  const bool own_copies = guard && !decode && A->chunk == TQ_CHUNK_CACHED && A->key && A->value;
  std::vector<SeqInfo> seqs(B);
  int64_t covered_lo = T, covered_hi = 0;
  for (int64_t b = 0; b < B; ++b) {
    SeqInfo& s = seqs[b];
    const int64_t row0 = decode ? b : index_at(A->query_start_loc, A->query_start_loc_dtype, b);
    const int64_t q_len = decode ? 1 : index_at(A->query_start_loc, A->query_start_loc_dtype, b + 1) - row0;
    const int64_t len = index_at(A->seq_lens, A->seq_lens_dtype, b);
    if (q_len < 0 || row0 < 0 || row0 + q_len > T)
      return fail("query_start_loc: sequence " + std::to_string(b) + " has rows outside the query");
    if (len < 0 || (!decode && len < q_len))
      return fail("seq_lens[" + std::to_string(b) + "] = " + std::to_string(len) + " is shorter than its " +
                  std::to_string(q_len) + " queries");
    const int64_t max_len = A->block_table_cols * (int64_t)A->cache.block_size;
    if (len > max_len)
      return fail("seq_lens[" + std::to_string(b) + "] = " + std::to_string(len) + " exceeds the block table (" +
                  std::to_string(max_len) + " tokens)");
    for (int64_t k = 0, used = (len + A->cache.block_size - 1) / A->cache.block_size; k < used; ++k) {
      const int64_t blk = index_at(A->block_table, A->block_table_dtype, b * A->block_table_stride + k);
      if (blk < 0 || blk >= A->cache.num_blocks)
        return fail("block_table[" + std::to_string(b) + ", " + std::to_string(k) + "] = " + std::to_string(blk) +
                    " is not a cache block (" + std::to_string(A->cache.num_blocks) + " blocks)");
    }
    if (guard && q_len > 0 && len > 0) {  // the exact copies the queries read: sink and window
      const int64_t ctx = len - q_len, hi = A->chunk == TQ_CHUNK_CACHED && !own_copies ? len : ctx;
      const int64_t lo = A->sliding_window > 0 ? std::max<int64_t>(0, ctx - A->sliding_window + 1) : 0;
      const int64_t ebs = A->exact.block_size;
      const int64_t spans[2][2] = {{lo, std::min<int64_t>(A->sink, hi)},
                                   {std::max<int64_t>({lo, (int64_t)A->sink, ctx - A->window + 1}), hi}};
      for (const auto& span : spans)
        for (int64_t k = span[0] / ebs; span[0] < span[1] && k <= (span[1] - 1) / ebs; ++k) {
          const int64_t blk = k < A->exact_block_table_cols
              ? index_at(A->exact_block_table, A->exact_block_table_dtype, b * A->exact_block_table_stride + k) : -1;
          if (blk < 0 || blk >= A->exact.num_blocks)
            return fail("protected tokens: exact block_table[" + std::to_string(b) + ", " + std::to_string(k) +
                        "] = " + std::to_string(blk) + " is not a block of the exact-copy cache");
        }
    }
    s.row0 = row0, s.q_len = (int32_t)q_len, s.len = (int32_t)len;
    if (q_len > 0) covered_lo = std::min(covered_lo, row0), covered_hi = std::max(covered_hi, row0 + q_len);
  }
  // rows no sequence owns are zeros
  if (covered_lo >= covered_hi) covered_lo = covered_hi = 0;
  memset(A->out, 0, (size_t)(covered_lo * row_bytes));
  memset((char*)A->out + covered_hi * row_bytes, 0, (size_t)((T - covered_hi) * row_bytes));
  if (A->lse)
    for (int64_t i = 0; i < T * A->num_q_heads; ++i)
      if (i < covered_lo * A->num_q_heads || i >= covered_hi * A->num_q_heads) A->lse[i] = -INFINITY;
  const Kernels* K = active_kernels();
  const int G = A->num_q_heads / L.H;
  std::vector<float> chunk;
  if ((A->chunk == TQ_CHUNK_EXACT || own_copies) && covered_hi > covered_lo) {
    try {
      chunk.resize((size_t)T * L.H * 2 * L.dp);
    } catch (const std::bad_alloc&) {
      return fail("tq_attention: out of memory");
    }
    constexpr int64_t per_item = 8;
    const int64_t n = covered_hi - covered_lo;
    const auto rows = own_copies ? K->chunk_copies : K->chunk_rows;
    pool().run((n + per_item - 1) / per_item, A->num_threads, [&](int64_t i) {
      rows(L, *A, chunk.data(), covered_lo + i * per_item, covered_lo + std::min(n, (i + 1) * per_item));
    });
  }
  // items: (sequence, block of queries, KV head); a block's rows share every decoded tile
  const int q_block = std::max(1, 64 / G);
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b)
    for (int q0 = 0; q0 < seqs[b].q_len; q0 += q_block)
      for (int h = 0; h < L.H; ++h) items.push_back({b, h, q0, std::min(q_block, seqs[b].q_len - q0)});
  const AttnJob job{&L, A, seqs.data(), chunk.empty() ? nullptr : chunk.data()};
  pool().run((int64_t)items.size(), A->num_threads, [&](int64_t i) { K->attend(job, items[i]); });
  return 0;
}
