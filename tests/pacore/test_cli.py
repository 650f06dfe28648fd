"""`step3vl` CLI smoke tests on the tiny checkpoint (and the demo on a small one)."""

import json
from pathlib import Path

from step3vl.cli import main

ASSET = Path(__file__).resolve().parents[2] / "step3vl" / "assets" / "demo_shapes.png"
ENGINE = ["--kv-cache-memory", "8MiB", "--threads", "1"]


def test_make_checkpoint_and_pacore_on_an_image(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["make-checkpoint", str(ck), "--preset", "tiny"]) == 0
    assert (ck / "config.json").is_file()
    rc = main(["pacore", "--model", str(ck), "--image", str(ASSET), "How many shapes?", "--rounds", "2",
               "--max-tokens", "8", "--message-max-tokens", "4", "--unclosed", "keep", "--no-progress",
               "--show-rounds", *ENGINE])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "round 1: K=2" in out and "final: K=1" in out and "answer:" in out and "tokens generated: 24" in out

    # random weights never close their reasoning: the default policy drops them and says so
    rc = main(["pacore", "--model", str(ck), "How many shapes?", "--rounds", "2", "--max-tokens", "8",
               "--no-progress", *ENGINE])
    out = capsys.readouterr().out
    assert rc == 1 and "error: round 1: none of its 2 trajectories yielded a message" in out


def test_pacore_batch_generate_and_bad_arguments(tiny_dir, tmp_path, capsys):
    inp, res = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": f"q {i}"}],
                                       **({"ground_truth": "4"} if i == 0 else {})}) + "\n" for i in range(2)))
    args = ["pacore", "--model", str(tiny_dir), "--input", str(inp), "--output", str(res), "--preset", "low",
            "--max-tokens", "6", "--unclosed", "keep", "--no-progress", *ENGINE]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 problem(s) written" in out
    recs = [json.loads(line) for line in res.read_text().splitlines()]
    from step3vl.train.rewards import math_reward
    right = sum(math_reward(r["final_response"], r["ground_truth"]) > 0.5 for r in recs if "ground_truth" in r)
    assert f"accuracy (math_reward of the final response against ground_truth): {right}/1 =" in out
    assert sorted(r["request_id"] for r in recs) == ["q0", "q1"]
    for r in recs:
        assert r["error"] is None and len(r["round_responses"]) == 2 and len(r["round_responses"][0]) == 4
        assert r["tokens_per_round"] == [sum(t["num_tokens"] for t in rr) for rr in r["round_responses"]]
        assert 4 <= r["tokens_per_round"][0] <= 24 and r["effective_ttc"] == sum(r["tokens_per_round"])
    assert main(args) == 0 and "0 problem(s) written" in capsys.readouterr().out  # resumed: nothing left

    assert main(["generate", "--model", str(tiny_dir), "hello", "--max-tokens", "4", "--n", "2", "--seed", "1",
                 *ENGINE]) == 0
    assert capsys.readouterr().out.count("[") >= 2

    assert main(["pacore", "--model", str(tiny_dir), *ENGINE]) == 2
    assert "give a question" in capsys.readouterr().err
    assert main(["pacore", "--model", str(tmp_path / "nowhere"), "q", *ENGINE]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_demo_random_makes_a_small_checkpoint_and_says_weights_are_random(tmp_path, capsys):
    args = ["demo", "--random", "--preset", "low", "--dir", str(tmp_path / "demo"), "--max-tokens", "12",
            "--think-at", "4", "--message-max-tokens", "4", "--kv-cache-memory", "64MiB", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "made now" in out and "weights are RANDOM" in out
    assert "round 1: K=4" in out and "final: K=1" in out and "tok/s" in out
    assert main(args) == 0 and "reused" in capsys.readouterr().out


def test_version_and_python_m(capsys):
    import subprocess
    import sys
    from importlib.metadata import version

    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"step3vl {version('step3vl')}"
    out = subprocess.run([sys.executable, "-m", "step3vl", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"step3vl {version('step3vl')}"
