"""Training on a CUDA device: the packed loss and the shared-prefix attention against their CPU / per-sequence
references, bf16 autocast close to fp32, and one RL step with a bf16 CUDA engine syncing from an fp32 policy."""

from __future__ import annotations

import pytest
import torch

from step3vl.engine import LLM, SamplingParams
from step3vl.loader import load_model
from step3vl.model.attention import DenseAttention, SharedPrefixAttention
from step3vl.saver import save_checkpoint
from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint
from step3vl.train import OptimConfig, PretrainConfig, Pretrainer, RLConfig, RLPrompt, RLTrainer, TrainExample, pack
from step3vl.train.logprobs import next_token_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("train-gpu"), preset="tiny", seed=0, shards=1)


def _examples(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [TrainExample(ids, ids) for ids in (torch.randint(0, 400, (int(k),), generator=g).tolist()
                                                for k in torch.randint(20, 90, (n,), generator=g))]


def test_loss_on_cuda_matches_cpu_and_bf16_autocast_is_close(ckpt):
    batch = pack(_examples())
    cpu = load_model(ckpt, dtype=torch.float32)
    gpu = load_model(ckpt, dtype=torch.float32, device="cuda")
    want, n = next_token_loss(cpu, batch)
    got, _ = next_token_loss(gpu, batch)
    torch.testing.assert_close(got.cpu() / n, want / n, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed, _ = next_token_loss(gpu, batch)
    assert abs(float(mixed) / n - float(want) / n) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prefix_attention_on_cuda(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    prefix, branches, hq, hkv, d = 37, [5, 1, 12], 8, 2, 64
    t = prefix + sum(branches)
    q, k, v = (torch.randn(t, h, d, generator=g, device="cuda").to(dtype) for h in (hq, hkv, hkv))
    got = SharedPrefixAttention([(prefix, branches)])(0, q, k, v, d ** -0.5)
    want = [DenseAttention([prefix])(0, q[:prefix], k[:prefix], v[:prefix], d ** -0.5)]
    at = prefix
    for n in branches:
        idx = torch.cat([torch.arange(prefix), torch.arange(at, at + n)]).cuda()
        want.append(DenseAttention([prefix + n])(0, q[idx], k[idx], v[idx], d ** -0.5)[prefix:])
        at += n
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), torch.cat(want).float(), **tol)


def test_pretrain_with_autocast_learns(ckpt):
    model = load_model(ckpt, dtype=torch.float32, device="cuda")
    cfg = PretrainConfig(optim=OptimConfig(lr=3e-3), epochs=20, shuffle=False, autocast_dtype=torch.bfloat16)
    logs = Pretrainer(model, cfg).fit(_examples(2))
    assert logs[-1].loss < 0.5 * logs[0].loss


def test_rl_step_with_a_bf16_cuda_engine(ckpt, tmp_path):
    llm = LLM(ckpt, device="cuda", kv_cache_memory="64MiB")  # bf16, Triton/CUDA kernels
    model = load_model(ckpt, dtype=torch.float32, device="cuda")
    cfg = RLConfig(optim=OptimConfig(lr=3e-3, weight_decay=0.0), group_size=8, max_tokens=8, truncated_reward=None)
    trainer = RLTrainer(model, llm, lambda text, answer: float(answer in text), cfg)
    log = trainer.step([RLPrompt([{"role": "user", "content": "Say cat."}], "a", id="p0")])
    assert log.trained_groups == 1 and log.response_tokens > 0
    assert log.logprob_gap is not None and log.logprob_gap < 0.1  # bf16 sampler vs fp32 policy
    # The engine now serves the new policy: the same as a fresh bf16 engine on the saved weights.
    fresh = LLM(save_checkpoint(model, tmp_path / "policy", ckpt), device="cuda", kv_cache_memory="64MiB")
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    a = llm.generate(["Say cat."], greedy, use_tqdm=False)[0].outputs[0].token_ids
    b = fresh.generate(["Say cat."], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b
