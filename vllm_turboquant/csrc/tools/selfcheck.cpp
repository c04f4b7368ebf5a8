// A deterministic run of the C API -- cache writes (slots and exact copies), decode, protected decode with
// a sliding window, compressed and exact-chunk prefill, four layouts -- writing every output byte to
// argv[1] (argv[2]: force an ISA). Every build and ISA must write the same file: tests/kernels/test_cpu_ops.py
// compares the host's ISAs and an aarch64 build run under qemu. Not part of the library.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdint.h>
#include <vector>
#include "tq_cpu.h"
static uint64_t st = 88172645463325252ull;
static double uni() { st ^= st << 13; st ^= st >> 7; st ^= st << 17; return (st >> 11) * (1.0 / 9007199254740992.0); }
static float gauss() { double u = uni() + 1e-300, v = uni(); return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v)); }
int main(int argc, char** argv) {
  if (argc > 2) tq_set_isa(atoi(argv[2]));
  FILE* f = fopen(argv[1], "wb");
  const int cfg[][6] = {{64, 3, 3, 4, 2, 0}, {128, 2, 4, 2, 3, 128}, {80, 1, 8, 3, 1, 64}, {256, 1, 4, 1, 2, 256}};
  for (auto& c : cfg) {
    const int d = c[0], H = c[1], G = c[2], kb = c[3], vb = c[4], m = c[5], nk = 1 << kb, nv = 1 << vb;
    // an orthogonal-ish rotation is not needed for determinism; random Gaussian tables
    std::vector<float> rk(H * d * d), rv(H * d * d), S(H * m * d + 1), mean(H * d), kbd(H * (nk - 1)), kc(H * nk), vbd(H * (nv - 1)), vc(H * nv);
    for (auto& x : rk) x = gauss() / sqrtf(d); for (auto& x : rv) x = gauss() / sqrtf(d); for (auto& x : S) x = gauss(); for (auto& x : mean) x = gauss() * 0.3f;
    for (int h = 0; h < H; ++h) { for (int i = 0; i < nk; ++i) kc[h*nk+i] = (-1 + (2.0f*i+1)/nk) * 0.3f; for (int i = 0; i < nk-1; ++i) kbd[h*(nk-1)+i] = 0.5f*(kc[h*nk+i]+kc[h*nk+i+1]);
      for (int i = 0; i < nv; ++i) vc[h*nv+i] = (-1 + (2.0f*i+1)/nv) * 0.3f; for (int i = 0; i < nv-1; ++i) vbd[h*(nv-1)+i] = 0.5f*(vc[h*nv+i]+vc[h*nv+i+1]); }
    int off = 0; auto field = [&](int nb){ int s = off; off = (off + nb + 1) / 2 * 2; return s; };
    int okc = field(d*kb/8), oks = field(m/8), okn = field(2), okg = field(m ? 2 : 0), ovc = field(d*vb/8), ovn = field(2);
    TqLayerDesc D{d, H, kb, vb, m, okc, oks, okn, okg, ovc, ovn, off, m ? 0.02f : 0.0f, rk.data(), rv.data(), S.data(), kbd.data(), kc.data(), vbd.data(), vc.data(), mean.data()};
    void* L = tq_layer_new(&D);
    const int bs = 16, lens[3] = {37, 1, 90}, per = 6, nb = 3 * per + 1, slot = off;
    std::vector<uint8_t> cache((size_t)nb * bs * H * slot, 0);
    std::vector<int32_t> bt(3 * per); for (int i = 0; i < 3 * per; ++i) bt[i] = 1 + (i * 7) % (3 * per);
    TqCache C{cache.data(), (int64_t)bs * H * slot, (int64_t)H * slot, slot, nb, bs};
    // exact-copy cache for protected decode, float32
    std::vector<float> ex((size_t)nb * bs * H * 2 * d, 0.0f);
    TqExactCache E{(uint8_t*)ex.data(), (int64_t)bs * H * 2 * d * 4, (int64_t)H * 2 * d * 4, (int64_t)2 * d * 4, nb, bs, TQ_F32};
    for (int b = 0; b < 3; ++b) {
      std::vector<float> k((size_t)lens[b] * H * d), v(k.size()); for (auto& x : k) x = gauss() * 2 + 0.5f; for (auto& x : v) x = gauss();
      std::vector<int64_t> sm(lens[b]); for (int p = 0; p < lens[b]; ++p) sm[p] = (int64_t)bt[b * per + p / bs] * bs + p % bs;
      TqWriteArgs W{}; W.cache = C; W.key = k.data(); W.value = v.data(); W.kv_dtype = TQ_F32; W.key_stride_token = H * d; W.key_stride_head = d;
      W.value_stride_token = H * d; W.value_stride_head = d; W.slot_mapping = sm.data(); W.slot_dtype = TQ_I64; W.num_tokens = lens[b];
      W.exact = E; W.exact_slot_mapping = sm.data(); W.exact_slot_dtype = TQ_I64; W.num_threads = 1;
      if (tq_write_cache(L, &W)) { printf("write: %s\n", tq_last_error()); return 1; }
    }
    fwrite(cache.data(), 1, cache.size(), f); fwrite(ex.data(), 4, ex.size(), f);
    std::vector<float> q((size_t)90 * H * G * d); for (auto& x : q) x = gauss();
    std::vector<int32_t> sl(lens, lens + 3), qsl = {0, 10, 11, 11 + 90};
    std::vector<float> kv((size_t)101 * H * d); for (auto& x : kv) x = gauss();
    for (int mode = 0; mode < 4; ++mode) {  // decode, decode protected, compressed prefill, exact-chunk prefill
      TqAttnArgs A{}; A.cache = C; A.query = q.data(); A.q_dtype = TQ_F32; A.q_stride_token = H * G * d; A.q_stride_head = d;
      A.num_q_heads = H * G; A.block_table = bt.data(); A.block_table_dtype = TQ_I32; A.block_table_stride = per; A.block_table_cols = per;
      A.seq_lens = sl.data(); A.seq_lens_dtype = TQ_I32; A.num_seqs = 3; A.scale = 0.1f; A.num_threads = 1;
      A.sliding_window = mode == 1 ? 40 : 0;
      if (mode == 1) { A.sink = 4; A.window = 8; A.exact = E; A.exact_block_table = bt.data(); A.exact_block_table_dtype = TQ_I32; A.exact_block_table_stride = per; A.exact_block_table_cols = per; }
      if (mode >= 2) { A.query_start_loc = qsl.data(); A.query_start_loc_dtype = TQ_I32; A.num_rows = 101;
        A.chunk = mode == 2 ? TQ_CHUNK_CACHED : TQ_CHUNK_EXACT; A.key = kv.data(); A.value = kv.data(); A.kv_dtype = TQ_F32;
        A.key_stride_token = H * d; A.key_stride_head = d; A.value_stride_token = H * d; A.value_stride_head = d;
        if (q.size() < (size_t)101 * H * G * d) q.resize((size_t)101 * H * G * d, 0.5f), A.query = q.data(); }
      else A.num_rows = 3;
      std::vector<float> out((size_t)A.num_rows * H * G * d), lse(A.num_rows * H * G);
      A.out = out.data(); A.lse = lse.data();
      if (tq_attention(L, &A)) { printf("attention %d: %s\n", mode, tq_last_error()); return 1; }
      fwrite(out.data(), 4, out.size(), f); fwrite(lse.data(), 4, lse.size(), f);
    }
    tq_layer_free(L);
  }
  fclose(f); printf("ok isa %d\n", tq_isa()); return 0;
}
