"""LLM.sleep / wake_up (vLLM's sleep mode): level 1 frees the KV pool (and moves the weights to host memory where
they are elsewhere), level 2 discards the weights too; requests are refused while asleep and nothing is lost;
after waking the engine answers as before (or with the weights update_weights gave it while asleep)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from step3vl.engine import LLM, SamplingParams
from step3vl.engine.llm import EngineSleepingError
from step3vl.loader import load_model

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
PROMPT = "The quick brown fox jumps over the lazy dog. " * 2


def _greedy(llm: LLM):
    out = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0]
    return out.token_ids, out.cumulative_logprob


def _gone(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is None


@pytest.fixture
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt, kv_cache_memory="4MiB", block_size=8)


def test_level_1_frees_the_pool_refuses_requests_and_wakes_to_the_same_answers(llm):
    before = _greedy(llm)
    assert llm.kv_stats()["blocks_cached"] > 0
    pool = weakref.ref(llm.engine.kv.k[0])
    model = weakref.ref(llm.model)
    kv_bytes = llm.kv_stats()["blocks_total"] * llm.kv_stats()["bytes_per_block"]
    assert llm.sleep(level=1) == kv_bytes  # on the CPU the weights already sit in host memory: kept
    assert llm.is_sleeping() and _gone(pool) and not _gone(model)
    with pytest.raises(EngineSleepingError, match=r"asleep \(LLM.sleep\(level=1\)\): call wake_up"):
        llm.generate([PROMPT], GREEDY, use_tqdm=False)
    assert not llm.has_unfinished_requests()
    assert llm.kv_stats()["blocks_total"] == 0 and llm.kv_stats()["sleep_level"] == 1
    llm.wake_up()
    assert not llm.is_sleeping() and llm.kv_stats()["blocks_cached"] == 0  # the pool comes back empty
    assert _greedy(llm) == before


def test_level_2_discards_the_weights_and_reloads_the_checkpoint(llm):
    before = _greedy(llm)
    model = weakref.ref(llm.model)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    assert llm.sleep(level=2) >= weight_bytes
    assert _gone(model) and llm.model.cfg.text.vocab_size > 0  # config still readable
    llm.wake_up(["kv_cache"])
    with pytest.raises(EngineSleepingError):  # the pool is back, the weights are not
        llm.generate([PROMPT], GREEDY, use_tqdm=False)
    llm.wake_up(["weights"])
    assert _greedy(llm) == before


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["native", "torch"])
def test_update_weights_while_asleep_then_wake(tiny_ckpt, cpu_kernels):
    llm = LLM(tiny_ckpt, kv_cache_memory="4MiB", cpu_kernels=cpu_kernels)
    awake = LLM(tiny_ckpt, kv_cache_memory="4MiB", cpu_kernels=cpu_kernels)
    new = load_model(tiny_ckpt, dtype=torch.float32)
    with torch.no_grad():
        for p in new.parameters():
            p.mul_(1.5)
    llm.sleep(level=2)
    llm.update_weights(new.state_dict())  # e.g. the trainer's step, while the engine sleeps
    assert llm.is_sleeping()  # the pool is still asleep
    llm.wake_up()
    awake.update_weights(new.state_dict())
    got, want = _greedy(llm), _greedy(awake)
    assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-5)


def test_level_1_host_offload_round_trip(tiny_ckpt, monkeypatch):
    """The GPU path of level 1 (weights copied to host memory, device copy freed, rebuilt on wake-up), run on the
    CPU by treating the CPU as a device that offloads."""
    llm = LLM(tiny_ckpt, kv_cache_memory="4MiB", cpu_kernels=False)
    before = _greedy(llm)
    monkeypatch.setattr(llm, "_offloads_weights", lambda: True)
    model = weakref.ref(llm.model)
    llm.sleep(level=1)
    assert _gone(model) and llm._sleep.weights == "host"
    llm.wake_up()
    assert _greedy(llm) == before


def test_sleep_needs_an_idle_engine_and_valid_arguments(llm):
    rid = llm.add_request(PROMPT, GREEDY)
    with pytest.raises(RuntimeError, match="1 request\\(s\\) in flight"):
        llm.sleep()
    assert not llm.is_sleeping()
    while llm.has_unfinished_requests():
        outs = llm.step()
    assert outs[-1].request_id == rid and outs[-1].finished  # the request was not disturbed
    with pytest.raises(ValueError, match="level is 1"):
        llm.sleep(level=3)
    with pytest.raises(ValueError, match="unknown tag"):
        llm.wake_up(["kv"])
    llm.wake_up()  # awake already: nothing to do
    assert _greedy(llm)[0] == outs[-1].outputs[0].token_ids
