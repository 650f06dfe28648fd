"""Data-parallel PaCoRe batch runs: `torchrun --nproc-per-node 2 -m step3vl pacore --input X --output Y` on the
CPU (gloo) gives the records of the one-process run, resumes per rank (and across world sizes), and a rank that
fails ends the whole run with a non-zero exit naming the rank, without a hang.

Records are compared as JSON, except the fields that legitimately differ between runs:
- timing: `wall_time` and every round's `seconds`;
- prefix-cache accounting: `prefix_hit_tokens` and every round's `prefix_hit_tokens`: how many prompt tokens a
  round found cached depends on which other problems shared the engine (their prompts share the chat template's
  first blocks), and so on how the problems were split over the ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from step3vl.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ["--kv-cache-memory", "8MiB", "--threads", "1"]
# max-concurrent-problems 2: problems start as others finish, so later problems' rounds find earlier ones' template
# blocks in the prefix cache, and which those are differs between one engine and two
RUN = ["--rounds", "2", "--max-tokens", "6", "--message-max-tokens", "4", "--unclosed", "keep", "--seed", "7",
       "--max-concurrent-problems", "2", "--no-progress", *ENGINE]
IDS = ["p0", "p1", "p2", "line4", "p3", "p4"]  # input order; line 4 is not JSON (an error record)
TIMEOUT_S = 120  # per torchrun launch: a hang fails the test instead of the suite


def write_input(path: Path) -> Path:
    lines = []
    for i in range(5):
        lines.append(json.dumps({"id": f"p{i}", "ground_truth": str(2 * i),
                                 "messages": [{"role": "user", "content": f"What is {i}+{i}?" + " Explain." * i}]}))
        if i == 2:
            lines.append('{"id": "broken", ')
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def comparable(rec: dict) -> dict:
    rec = {k: v for k, v in rec.items() if k not in ("wall_time", "prefix_hit_tokens")}
    rec["rounds"] = [{k: v for k, v in s.items() if k not in ("seconds", "prefix_hit_tokens")} for s in rec["rounds"]]
    return rec


def assert_matches_reference(out: Path, reference: dict[str, dict]) -> None:
    recs = read(out)
    assert [r["request_id"] for r in recs] == IDS  # merged in input order, one record per problem
    for r in recs:
        assert comparable(r) == comparable(reference[r["request_id"]]), r["request_id"]
    assert not list(out.parent.glob(out.name + ".part-*")) and not (out.parent / (out.name + ".tmp")).exists()


def torchrun(args: list[str], script: Path | None = None, nproc: int = 2) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    target = [str(script)] if script is not None else ["-m", "step3vl"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", *target,
           "pacore", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc, time.perf_counter() - t0


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    return write_input(tmp_path_factory.mktemp("dp") / "problems.jsonl")


@pytest.fixture(scope="module")
def reference(tiny_dir, problems, tmp_path_factory) -> dict[str, dict]:
    """The one-process run (in this process), by request id."""
    out = tmp_path_factory.mktemp("ref") / "one.jsonl"
    assert main(["pacore", "--model", str(tiny_dir), "--input", str(problems), "--output", str(out), *RUN]) == 0
    recs = {r["request_id"]: r for r in read(out)}
    assert sorted(recs) == sorted(IDS)
    assert all(recs[i]["error"] is None for i in IDS if i != "line4") and "invalid JSON" in recs["line4"]["error"]
    return recs


def test_two_ranks_give_the_one_process_records(tiny_dir, problems, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    proc, _ = torchrun(["--model", str(tiny_dir), "--input", str(problems), "--output", str(out), *RUN])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_matches_reference(out, reference)
    # only rank 0 prints the summary, with every rank's problems counted
    assert proc.stdout.count("problem(s) written") == 1, proc.stdout
    tokens = sum(r["effective_ttc"] for r in reference.values())
    assert f"6 problem(s) written to {out} (1 with an error); {tokens} tokens" in proc.stdout
    assert "accuracy (math_reward of the final response against ground_truth):" in proc.stdout


FAILING_RANK = """
import os, sys

if os.environ.get("RANK") == "1":  # rank 1 writes two records, then fails
    import step3vl_pacore.batch as batch

    real, calls = batch.append_record, []

    def append_record(path, record):
        calls.append(record["request_id"])
        if len(calls) == 3:
            raise RuntimeError("injected failure on rank 1")
        real(path, record)

    batch.append_record = append_record

from step3vl.cli import main

sys.exit(main())
"""


def test_a_failing_rank_fails_the_run_then_one_process_resumes_it(tiny_dir, problems, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    proc, wall = torchrun(["--model", str(tiny_dir), "--input", str(problems), "--output", str(out), *RUN], script)
    assert proc.returncode != 0
    assert "step3vl pacore: rank 1 of 2 stopped: RuntimeError: injected failure on rank 1" in proc.stderr, \
        proc.stderr[-3000:]
    assert "the same command resumes the run" in proc.stderr
    assert wall < 60, f"the run took {wall:.0f}s to fail"  # no wait for a collective's timeout
    assert not out.exists()  # no merge: the records are in the part files
    part1 = read(out.with_name(out.name + ".part-1-of-2"))
    assert [r["request_id"] for r in part1] == ["line4", "p1"] or [r["request_id"] for r in part1] == ["line4", "p4"]

    # resumed by one process (2 ranks -> 1): it folds the part files in and runs only what is missing
    assert main(["pacore", "--model", str(tiny_dir), "--input", str(problems), "--output", str(out), *RUN]) == 0
    assert_matches_reference(out, reference)


def test_resume_from_parts_of_another_world_size_with_retry_errors(tiny_dir, problems, reference, tmp_path):
    """Parts left by a 3-rank run (one torn line, one failed problem) and an output from an earlier run, resumed
    by 2 ranks with --retry-errors: finished problems are not run again, failed ones are, one record each."""
    out = tmp_path / "out.jsonl"
    seeded = {rid: {**reference[rid], "final_response": f"seeded {rid}"} for rid in IDS}  # marks what was kept
    failed_p2 = {**seeded["p2"], "error": "round 1: an earlier failure", "final_response": ""}

    def line(rec):
        return json.dumps(rec) + "\n"

    out.write_text(line(seeded["p4"]))
    out.with_name(out.name + ".part-0-of-3").write_text(line(seeded["p0"]) + line(failed_p2))
    out.with_name(out.name + ".part-1-of-3").write_text(line(seeded["line4"]) + line(seeded["p3"])[:40])  # torn
    out.with_name(out.name + ".part-2-of-3").write_text("")
    proc, _ = torchrun(["--model", str(tiny_dir), "--input", str(problems), "--output", str(out), "--retry-errors",
                        *RUN])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # ran: p1, p3 (torn), p2 (failed), line4 (an error record: retried, fails again)
    assert "4 problem(s) written" in proc.stdout and "(1 with an error)" in proc.stdout, proc.stdout
    recs = {r["request_id"]: r for r in read(out)}
    for rid in ("p0", "p4"):
        assert recs[rid]["final_response"] == f"seeded {rid}"  # kept, not run again
        recs[rid]["final_response"] = reference[rid]["final_response"]
    out.write_text("".join(line(recs[rid]) for rid in IDS))
    assert_matches_reference(out, reference)

    # nothing left: a one-process run changes nothing
    before = out.read_bytes()
    assert main(["pacore", "--model", str(tiny_dir), "--input", str(problems), "--output", str(out), *RUN]) == 0
    assert out.read_bytes() == before


def test_one_question_is_refused_under_torchrun(tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pacore", "--model", str(tiny_dir), "What is 2+2?", *RUN]) == 2
    assert "one question runs in one process: start it without torchrun" in capsys.readouterr().err


def test_merge_keeps_a_finished_record_over_a_later_error(tmp_path):
    from step3vl_pacore.batch import merge_parts, part_files, part_path, read_problems

    inp = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    ok = {"request_id": "p1", "error": None, "final_response": "x"}
    out.write_text(json.dumps(ok) + "\n" + '{"request_id": "p0", "err')  # a torn tail in the output too
    part_path(out, 1, 2).write_text(json.dumps({"request_id": "p1", "error": "later"}) + "\n"
                                    + json.dumps({"request_id": "zz", "error": None}) + "\n"
                                    + json.dumps({"request_id": "p0", "error": "e"}) + "\n")
    part_path(out, 0, 1).write_text(json.dumps({"request_id": "p3", "error": "found first"}) + "\n")
    part_path(out, 0, 2).write_text(json.dumps({"request_id": "p3", "error": "found last"}) + "\nnot json\n")
    merge_parts(out, read_problems(inp))  # the output, then the part files by name
    assert read(out) == [{"request_id": "p0", "error": "e"}, ok, {"request_id": "p3", "error": "found last"},
                         {"request_id": "zz", "error": None}]  # input order, then ids not in the input
    assert part_files(out) == []
