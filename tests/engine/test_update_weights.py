"""LLM.update_weights: the engine takes a trainer's weights in place of its own, drops the KV it cached under
the old ones, and refuses bad input without losing its current weights."""

from __future__ import annotations

import pytest
import torch

from step3vl.engine import LLM, SamplingParams
from step3vl.loader import CheckpointError, load_model
from step3vl.saver import save_checkpoint

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, logprobs=0)
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


def _perturbed(ckpt, seed: int = 0):
    model = load_model(ckpt, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _greedy(llm: LLM, prompt: str = PROMPT):
    return llm.generate([prompt], GREEDY, use_tqdm=False)[0]


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["native-rebuild", "torch-in-place"])
def test_update_matches_a_fresh_engine_on_the_saved_weights(tiny_ckpt, tmp_path, cpu_kernels):
    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB", cpu_kernels=cpu_kernels)
    before = _greedy(llm).outputs[0]
    model = _perturbed(tiny_ckpt)
    llm.update_weights(model.state_dict())
    after = _greedy(llm).outputs[0]
    fresh = LLM(save_checkpoint(model, tmp_path / "new", tiny_ckpt, dtype=None), kv_cache_memory="8MiB",
                cpu_kernels=cpu_kernels)
    want = _greedy(fresh).outputs[0]
    assert after.token_ids == want.token_ids
    assert after.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-5)
    assert after.cumulative_logprob != pytest.approx(before.cumulative_logprob, abs=1e-3)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["native-rebuild", "torch-in-place"])
def test_a_stream_of_tensors_equals_the_whole_dict(tiny_ckpt, cpu_kernels):
    """A trainer gathering sharded weights hands them over one at a time (an iterator, not a dict)."""
    model = _perturbed(tiny_ckpt)
    whole = LLM(tiny_ckpt, kv_cache_memory="8MiB", cpu_kernels=cpu_kernels)
    whole.update_weights(model.state_dict())
    streamed = LLM(tiny_ckpt, kv_cache_memory="8MiB", cpu_kernels=cpu_kernels)
    handed = []

    def one_by_one():
        for name, t in model.state_dict().items():
            handed.append(name)
            yield name, t.clone()

    streamed.update_weights(one_by_one())
    assert len(handed) == len(model.state_dict())
    a, b = _greedy(whole).outputs[0], _greedy(streamed).outputs[0]
    assert a.token_ids == b.token_ids and a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-6)


def test_a_stream_names_the_bad_tensor(tiny_ckpt):
    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB", cpu_kernels=False)
    state = _perturbed(tiny_ckpt).state_dict()
    bad = iter(list(state.items())[:3] + [("model.norm.weight", torch.ones(3))])
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight'.*expects.*after 3 tensors were copied"):
        llm.update_weights(bad)
    with pytest.raises(CheckpointError, match="missing key"):
        llm.update_weights(iter(list(state.items())[:3]))
    llm.update_weights(iter(state.items()))  # a complete set repairs it


def test_update_drops_the_prefix_cache(tiny_ckpt):
    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB", block_size=8)
    _greedy(llm)
    assert _greedy(llm).num_cached_tokens > 0  # the prompt's blocks were cached
    assert llm.kv_stats()["blocks_cached"] > 0
    llm.update_weights(_perturbed(tiny_ckpt).state_dict())
    assert llm.kv_stats()["blocks_cached"] == 0
    assert _greedy(llm).num_cached_tokens == 0  # KV of the old weights is never reused


def test_update_refuses_bad_weights_and_keeps_the_old_ones(tiny_ckpt):
    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB")
    before = _greedy(llm).outputs[0].token_ids
    state = _perturbed(tiny_ckpt).state_dict()
    wrong_shape = dict(state, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*shape \[3\]"):
        llm.update_weights(wrong_shape)
    with pytest.raises(CheckpointError, match="unexpected key 'model.extra'"):
        llm.update_weights(dict(state, **{"model.extra": torch.zeros(1)}))
    nan = dict(state, **{"model.norm.weight": torch.full_like(state["model.norm.weight"], float("nan"))})
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' holds NaN/inf"):
        llm.update_weights(nan)
    missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError, match="missing key"):
        llm.update_weights(missing)
    assert _greedy(llm).outputs[0].token_ids == before


def test_update_refuses_while_requests_are_in_flight(tiny_ckpt):
    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB")
    rid = llm.add_request(PROMPT, SamplingParams(max_tokens=50))
    llm.step()
    with pytest.raises(RuntimeError, match="in flight"):
        llm.update_weights(_perturbed(tiny_ckpt).state_dict())
    llm.abort(rid)
    llm.update_weights(_perturbed(tiny_ckpt).state_dict())
    assert len(_greedy(llm).outputs[0].token_ids) == 10


def test_a_failed_rebuild_leaves_the_engine_as_it_was(tiny_ckpt, monkeypatch):
    import step3vl.loader

    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB")
    before = _greedy(llm).outputs[0].token_ids

    def out_of_memory(*args, **kwargs):
        raise MemoryError("simulated: no room for the new weights")

    monkeypatch.setattr(step3vl.loader, "model_from_state", out_of_memory)
    with pytest.raises(MemoryError):
        llm.update_weights(_perturbed(tiny_ckpt).state_dict())
    assert _greedy(llm).outputs[0].token_ids == before


def test_unseeded_requests_keep_drawing_fresh_seeds_across_updates(tiny_ckpt):
    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB", seed=7)
    state = load_model(tiny_ckpt, dtype=torch.float32).state_dict()  # the same weights: only seeds can differ
    sample = SamplingParams(n=4, max_tokens=8, temperature=1.0)
    runs = []
    for _ in range(3):
        runs.append([c.token_ids for c in llm.generate([PROMPT], sample, use_tqdm=False)[0].outputs])
        llm.update_weights(state)
    assert runs[0] != runs[1] and runs[1] != runs[2]


def test_update_refuses_values_the_engine_dtype_cannot_hold(tiny_ckpt):
    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB", dtype="float16")
    state = _perturbed(tiny_ckpt).state_dict()
    state["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e5  # finite in fp32, inf in fp16
    with pytest.raises(ValueError, match=r"down_proj\.weight' holds NaN/inf or values beyond torch.float16's range"):
        llm.update_weights(state)
