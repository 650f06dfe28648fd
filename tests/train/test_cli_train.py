"""`step3vl train` and `step3vl rl`: JSONL in, a checkpoint that the engine loads out, one log line per step."""

from __future__ import annotations

import json

import torch

from step3vl.cli import main
from step3vl.engine import LLM, SamplingParams
from step3vl.loader import load_model



def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _logs(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_command_writes_a_loadable_checkpoint(tiny_ckpt, tmp_path):
    data = _write_jsonl(tmp_path / "data.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
        {"text": "A cat sat on the mat."}])
    out, log = tmp_path / "trained", tmp_path / "log.jsonl"
    rc = main(["train", "--model", str(tiny_ckpt), "--data", str(data), "--out", str(out), "--epochs", "8",
               "--lr", "3e-3", "--log", str(log), "--threads", "1", "--eval-data", str(data), "--eval-every", "4"])
    assert rc == 0
    logs = _logs(log)
    assert [s["step"] for s in logs] == list(range(1, 9)) and logs[-1]["loss"] < logs[0]["loss"]
    assert [s["eval_loss"] is not None for s in logs] == [False] * 3 + [True] + [False] * 3 + [True]
    before, after = load_model(tiny_ckpt), load_model(out)
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)
    llm = LLM(out, kv_cache_memory="8MiB")
    assert len(llm.generate(["Hi"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_train_command_reports_bad_data(tiny_ckpt, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{not json\n')
    rc = main(["train", "--model", str(tiny_ckpt), "--data", str(data), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert f"{data}:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rl_command_on_pacore_synthesis_episodes(tiny_ckpt, tmp_path, capsys):
    problems = _write_jsonl(tmp_path / "problems.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "2+2?"}], "ground_truth": "4"},
        {"id": "b", "messages": [{"role": "user", "content": "3+3?"}], "ground_truth": "6"}])
    results = _write_jsonl(tmp_path / "results.jsonl", [
        {"request_id": "a", "round_responses": [[{"content": f"\\boxed{{{v}}}"} for v in (4, 1, 2, 3)]]},
        {"request_id": "b", "round_responses": [[{"content": f"\\boxed{{{v}}}"} for v in (6, 5, 7, 8)]]}])
    out, log = tmp_path / "policy", tmp_path / "rl.jsonl"
    rc = main(["rl", "--model", str(tiny_ckpt), "--problems", str(problems), "--pacore-results", str(results),
               "--out", str(out), "--steps", "2", "--batch-size", "2", "--group-size", "2", "--max-tokens", "4",
               "--min-refs", "2", "--max-refs", "3", "--kv-cache-memory", "8MiB", "--log", str(log), "--threads", "1",
               "--save-every", "1", "--save-dtype", "float32", "--kl-coef", "0.05",
               "--eval-problems", str(problems), "--eval-samples", "2"])
    assert rc == 0, capsys.readouterr().err
    assert "synthesis episodes for 2 problems" in capsys.readouterr().err
    assert [s["step"] for s in _logs(log)] == [1, 2]
    assert _logs(log)[-1]["kl"] is not None
    assert [s["eval_reward"] is not None for s in _logs(log)] == [False, True]  # evaluated after the last step
    final = load_model(out, dtype=torch.float32)  # complete checkpoints, in fp32 as asked
    step2 = load_model(tmp_path / "policy-step2", dtype=torch.float32)
    assert (tmp_path / "policy-step1" / "config.json").is_file()
    from step3vl.loader import checkpoint_files, tensor_entries
    assert {e.dtype for f in checkpoint_files(out) for e in tensor_entries(f)} == {"F32"}
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), step2.state_dict().values()))
