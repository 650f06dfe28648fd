"""Resuming: a run interrupted after a `--save-every` checkpoint and resumed from it ends with the same weights
as the run that was never interrupted (fp32, bit for bit), for pre-training and for RL."""

from __future__ import annotations

import json

import torch

from step3vl.cli import main
from step3vl.loader import load_model
from step3vl.train.run import PromptBatches



def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _same_weights(a, b) -> bool:
    ma, mb = load_model(a, dtype=torch.float32), load_model(b, dtype=torch.float32)
    return all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


def test_pretrain_resume_equals_an_uninterrupted_run(tiny_ckpt, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": f"sample number {i} of the corpus"} for i in range(6)])
    common = ["--model", str(tiny_ckpt), "--data", str(data), "--epochs", "2", "--max-tokens-per-batch", "24",
              "--lr", "1e-2", "--warmup-steps", "2", "--save-dtype", "float32", "--threads", "1"]
    assert main(["train", *common, "--out", str(tmp_path / "full")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "part"), "--save-every", "3", "--max-steps", "100"]) == 0
    # Resume from step 3 of the second run (its options are the first run's: --max-steps 100 caps nothing).
    assert main(["train", *common, "--out", str(tmp_path / "resumed"), "--resume", str(tmp_path / "part-step3")]) == 0
    assert _same_weights(tmp_path / "full", tmp_path / "resumed")
    assert not _same_weights(tmp_path / "full", tmp_path / "part-step3")


def test_rl_resume_equals_an_uninterrupted_run(tiny_ckpt, tmp_path):
    problems = _jsonl(tmp_path / "p.jsonl", [
        {"id": str(i), "messages": [{"role": "user", "content": f"Say {w}."}], "ground_truth": w}
        for i, w in enumerate(["a", "e", "o"])])
    common = ["--model", str(tiny_ckpt), "--problems", str(problems), "--steps", "3", "--batch-size", "2",
              "--group-size", "4", "--max-tokens", "6", "--truncated-reward", "0.5", "--lr", "1e-2",
              "--kv-cache-memory", "8MiB", "--save-dtype", "float32", "--threads", "1"]
    assert main(["rl", *common, "--out", str(tmp_path / "full"), "--save-every", "1"]) == 0
    assert main(["rl", *common, "--out", str(tmp_path / "resumed"), "--resume", str(tmp_path / "full-step1")]) == 0
    assert _same_weights(tmp_path / "full", tmp_path / "resumed")


def test_resume_needs_a_trainer_state(tiny_ckpt, tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    rc = main(["train", "--model", str(tiny_ckpt), "--data", str(data), "--out", str(tmp_path / "o"), "--resume", str(tiny_ckpt)])
    assert rc == 2 and "no trainer_state.pt" in capsys.readouterr().err


def test_prompt_batches_state_round_trip():
    a = PromptBatches(list("abcdefg"), 3, seed=4)
    a(0)
    state = a.state_dict()
    want = [a(k) for k in range(1, 5)]
    b = PromptBatches(list("abcdefg"), 3, seed=999)
    b.load_state_dict(json.loads(json.dumps(state)))  # JSON-safe too
    assert [b(k) for k in range(1, 5)] == want
    assert all(set(batch) <= set("abcdefg") for batch in want)


def test_prompt_batches_never_repeat_a_prompt_within_a_step():
    for seed in range(20):
        b = PromptBatches(list("abcde"), 3, seed=seed)
        draws = [b(k) for k in range(12)]
        assert all(len(set(d)) == 3 for d in draws)
        # Every prompt comes around: over 5 passes' worth of draws each one is drawn 12*3/5 ± a pass.
        counts = {x: sum(d.count(x) for d in draws) for x in "abcde"}
        assert max(counts.values()) - min(counts.values()) <= 2


def test_a_run_started_from_a_step_checkpoint_does_not_inherit_its_state(tiny_ckpt, tmp_path):
    from step3vl.saver import save_checkpoint
    from step3vl.train.run import STATE_FILE

    model = load_model(tiny_ckpt, dtype=torch.float32)
    step = save_checkpoint(model, tmp_path / "run1-step5", tiny_ckpt, extra={STATE_FILE: {"kind": "rl"}})
    assert (step / STATE_FILE).is_file()
    assert not (save_checkpoint(model, tmp_path / "run2", step) / STATE_FILE).exists()


def test_a_resumed_run_logs_each_step_once(tiny_ckpt, tmp_path):
    """The interrupted run logged steps past its last save; resuming drops those lines, then logs them afresh."""
    data = _jsonl(tmp_path / "d.jsonl", [{"text": f"sample number {i} of the corpus"} for i in range(6)])
    common = ["--model", str(tiny_ckpt), "--data", str(data), "--epochs", "2", "--max-tokens-per-batch", "24",
              "--lr", "1e-2", "--threads", "1", "--out", str(tmp_path / "run"), "--log", str(tmp_path / "log.jsonl")]
    assert main(["train", *common, "--save-every", "3"]) == 0
    full = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(full) > 3
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 1.0')  # a line cut by a kill
    assert main(["train", *common, "--resume", str(tmp_path / "run-step3")]) == 0
    again = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [r["step"] for r in full]
    assert [r["loss"] for r in again] == [r["loss"] for r in full]
