"""Training on N ranks (torchrun, gloo on the CPU, FSDP2) trains the same run as one process.

Reference: the one-process run with the same data, global batch and seeds. Checked: the loss of every step, the
weights after the run (fp32, within 1e-5), resuming a DCP step checkpoint at another world size (2 -> 1 and
1 -> 2), RL with each rank's engine sampling its share of the prompts, and a rank that dies: the run fails with a
message naming it and the last step checkpoint stays loadable and resumable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from step3vl.cli import main
from step3vl.loader import load_model

TOL = 1e-5


def _torchrun(args: list[str], cwd: Path, timeout: float = 150, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "STEP3VL_DIST_TIMEOUT_S": "60", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _logs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _max_diff(a: Path, b: Path) -> float:
    ma, mb = load_model(a, dtype=torch.float32), load_model(b, dtype=torch.float32)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def _same_steps(one: list[dict], many: list[dict], keys=("loss", "grad_norm", "lr", "tokens", "targets")) -> None:
    assert [s["step"] for s in one] == [s["step"] for s in many]
    for s1, s2 in zip(one, many):
        for k in keys:
            assert s2[k] == pytest.approx(s1[k], rel=TOL, abs=TOL), (s1["step"], k)


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory, make_image) -> Path:
    """Image-text and text-only examples, so some micro-batches have images on one rank and none on the other."""
    d = tmp_path_factory.mktemp("dist-data")
    records = []
    for i in range(10):
        if i % 3 == 0:
            records.append({"text": f"plain text number {i} about shapes and colours"})
        else:
            make_image(60, 40, seed=i).save(d / f"im{i}.png")
            records.append({"text": f"<image>a picture {i} with red squares", "images": [str(d / f"im{i}.png")]})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d / "data.jsonl"


def _train_args(ckpt: Path, data: Path, out: Path, log: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--log-file", str(log),
            "--max-tokens-per-batch", "200", "--grad-accum", "2", "--lr", "1e-3", "--warmup-steps", "1",
            "--save-dtype", "float32", "--save-every", "1", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def one_process_run(tiny_ckpt, mixed_data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dist-one")
    assert main(_train_args(tiny_ckpt, mixed_data, d / "out", d / "log.jsonl")) == 0
    return d


def test_pretraining_on_two_ranks_equals_one_process(tiny_ckpt, mixed_data, one_process_run, tmp_path):
    # Through the console script, as a user runs it (torchrun --no-python step3vl train ...).
    script = shutil.which("step3vl") or pytest.skip("the step3vl console script is not installed")
    # Activation checkpointing on the sharded side only: recomputing changes nothing but memory.
    _torchrun(["--no-python", script, *_train_args(tiny_ckpt, mixed_data, tmp_path / "out", tmp_path / "log.jsonl",
                                                   "--activation-checkpointing")],
              tmp_path)
    one, two = _logs(one_process_run / "log.jsonl"), _logs(tmp_path / "log.jsonl")
    assert len(one) >= 3
    _same_steps(one, two)
    assert _max_diff(one_process_run / "out", tmp_path / "out") < TOL
    # Each rank wrote its own shards of the step checkpoint; it loads as a model.
    shards = sorted(p.name for p in (tmp_path / "out-step2" / "dcp").glob("*.distcp"))
    assert len(shards) == 2
    assert _max_diff(one_process_run / "out-step2", tmp_path / "out-step2") < TOL


def test_resume_across_world_sizes(tiny_ckpt, mixed_data, one_process_run, tmp_path):
    """A 1-rank step checkpoint resumed on 2 ranks, and that run's step checkpoint resumed on 1 rank, end where the
    uninterrupted one-process run ended."""
    one = one_process_run
    _torchrun(["-m", "step3vl", *_train_args(tiny_ckpt, mixed_data, tmp_path / "b", tmp_path / "b.jsonl",
                                             "--resume", str(one / "out-step1"))], tmp_path)
    _same_steps(_logs(one / "log.jsonl")[1:], _logs(tmp_path / "b.jsonl"))
    assert main(_train_args(tiny_ckpt, mixed_data, tmp_path / "c", tmp_path / "c.jsonl",
                            "--resume", str(tmp_path / "b-step2"))) == 0
    _same_steps(_logs(one / "log.jsonl")[2:], _logs(tmp_path / "c.jsonl"))
    assert _max_diff(one / "out", tmp_path / "c") < TOL


RL_WORKER = textwrap.dedent('''
    """RL through the library API with a reward that varies on a random model (the checker would give all zeros)."""
    import json, sys, torch
    from step3vl.train.rl import RLConfig, RLPrompt
    from step3vl.train.optim import OptimConfig
    from step3vl.train.run import PromptBatches, reinforce

    torch.set_num_threads(1)
    ckpt, problems, out, log = sys.argv[1:5]
    resume = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else None
    episodes = sys.argv[6] if len(sys.argv) > 6 else None  # PaCoRe results: train on synthesis episodes
    prompts = [RLPrompt(r["messages"], r["ground_truth"], r["id"]) for r in map(json.loads, open(problems))]

    def reward(text, answer):
        return float(sum(map(ord, text)) % 3) / 2.0

    batches = PromptBatches(prompts, 3, seed=0)
    if episodes:
        from step3vl_pacore import EpisodeConfig, Problem, pool_from_result
        from step3vl_pacore.episodes import EpisodeBatches

        pools = {r["request_id"]: pool_from_result(r) for r in map(json.loads, open(episodes))}
        batches = EpisodeBatches([Problem(p.id, p.messages, ground_truth=p.answer) for p in prompts], pools,
                                 EpisodeConfig(min_refs=2, max_refs=3, seed=0), 3, reward_fn=lambda t, a: 0.0)

    cfg = RLConfig(optim=OptimConfig(lr=1e-3, weight_decay=0.0), total_steps=3, group_size=4, max_tokens=5,
                   truncated_reward=None, kl_coef=0.05, ppo_epochs=2, train_vision=True)
    reinforce(ckpt, batches, out, 3, cfg, reward_fn=reward, log_path=log,
              progress=False, save_every=1, save_dtype=torch.float32, engine_kwargs={"kv_cache_memory": "8MiB"},
              resume=resume)
''')


def test_rl_on_two_ranks_equals_one_process(tiny_ckpt, make_image, tmp_path):
    problems = []
    for i, w in enumerate("aeiou"):
        make_image(60, 40, seed=20 + i).save(tmp_path / f"p{i}.png")
        content = ([{"type": "image", "image": str(tmp_path / f"p{i}.png")}, {"type": "text", "text": f"Say {w}."}]
                   if i % 2 == 0 else f"Say {w}.")
        problems.append({"id": str(i), "messages": [{"role": "user", "content": content}], "ground_truth": w})
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    (tmp_path / "worker.py").write_text(RL_WORKER)
    args = [str(tiny_ckpt), str(tmp_path / "problems.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "worker.py", *args, "one", "one.jsonl"], cwd=tmp_path, env=env, check=True,
                   timeout=120)
    _torchrun(["worker.py", *args, "two", "two.jsonl"], tmp_path)
    one, two = _logs(tmp_path / "one.jsonl"), _logs(tmp_path / "two.jsonl")
    assert sum(s["trained_groups"] for s in one) >= 3  # the reward varies: the updates are not empty
    _same_steps(one, two, keys=("reward_mean", "solved_fraction", "trained_groups", "response_tokens", "loss",
                                "grad_norm", "kl", "clip_fraction"))
    assert _max_diff(tmp_path / "one", tmp_path / "two") < TOL
    # The 2-rank run's step checkpoint resumes in one process to the same policy.
    subprocess.run([sys.executable, "worker.py", *args, "resumed", "resumed.jsonl", "two-step1"], cwd=tmp_path,
                   env=env, check=True, timeout=120)
    assert _max_diff(tmp_path / "one", tmp_path / "resumed") < TOL


def test_rl_on_synthesis_episodes_on_two_ranks_equals_one_process(tiny_ckpt, tmp_path):
    """PaCoRe synthesis episodes (the official template over cached references, drawn afresh each step) as the RL
    batches: every rank draws the same episodes and samples its share."""
    problems = [{"id": str(i), "messages": [{"role": "user", "content": f"{i}+{i}?"}], "ground_truth": str(2 * i)}
                for i in range(4)]
    results = [{"request_id": str(i), "round_responses": [[{"content": f"\\boxed{{{v}}}"} for v in range(5)]]}
               for i in range(4)]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    (tmp_path / "worker.py").write_text(RL_WORKER)
    args = [str(tiny_ckpt), str(tmp_path / "problems.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "worker.py", *args, "one", "one.jsonl", "-", "results.jsonl"], cwd=tmp_path,
                   env=env, check=True, timeout=120)
    _torchrun(["worker.py", *args, "two", "two.jsonl", "-", "results.jsonl"], tmp_path)
    one, two = _logs(tmp_path / "one.jsonl"), _logs(tmp_path / "two.jsonl")
    assert sum(s["trained_groups"] for s in one) >= 2
    _same_steps(one, two, keys=("reward_mean", "trained_groups", "response_tokens", "loss", "grad_norm", "kl"))
    assert _max_diff(tmp_path / "one", tmp_path / "two") < TOL


def test_a_rank_that_dies_fails_the_run_and_keeps_the_last_checkpoint(tiny_ckpt, mixed_data, tmp_path):
    # Rank 1 raises at its third optimizer step, after the step-2 checkpoint (a hook the test injects through
    # sitecustomize, so the product code has no test switch).
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent('''
        import os
        if os.environ.get("RANK") == "1":
            from step3vl.train import pretrain as p
            original = p.Pretrainer._step
            def _step(self, step, *a, **k):
                if step == 3:
                    raise RuntimeError("injected failure at step 3")
                return original(self, step, *a, **k)
            p.Pretrainer._step = _step
    '''))
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    proc = _torchrun(["-m", "step3vl", *_train_args(tiny_ckpt, mixed_data, tmp_path / "out", tmp_path / "log.jsonl")],
                     tmp_path, env=env, check=False, timeout=120)
    assert proc.returncode != 0
    assert "rank 1 of 2 stopped: RuntimeError: injected failure at step 3" in proc.stderr
    assert not (tmp_path / "out").exists()
    load_model(tmp_path / "out-step2", dtype=torch.float32)  # the last checkpoint is complete and loadable
    assert main(_train_args(tiny_ckpt, mixed_data, tmp_path / "out", tmp_path / "log.jsonl",
                            "--resume", str(tmp_path / "out-step2"))) == 0
    assert [s["step"] for s in _logs(tmp_path / "log.jsonl")][-1] >= 3


CLOSE_SCRIPT = """
import os, sys
from step3vl.distributed import close_distributed, init_distributed

threads_before = len(os.listdir("/proc/self/task"))
env = init_distributed("cpu")
import step3vl.train.rewards  # noqa: F401  (imports torch.distributed.fsdp after the group exists, as pacore does)
assert env.all_gather_objects(env.rank) == [0, 1]
close_distributed()
left = len(os.listdir("/proc/self/task"))
print(f"rank {env.rank}: threads {threads_before} before, {left} after close", flush=True)
sys.exit(0 if left <= threads_before else 3)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")
def test_close_distributed_stops_the_gloo_threads(tmp_path):
    """A process group that outlives close_distributed() keeps gloo's worker threads running into interpreter
    exit, where freeing a finished collective aborted the process now and then; the count is deterministic."""
    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT)
    proc = _torchrun([str(script)], cwd=Path(__file__).resolve().parents[2], timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("after close") == 2
