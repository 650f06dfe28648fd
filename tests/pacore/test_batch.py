"""JSONL batch runs: official input format, atomic appends, resume after an interruption."""

import json

from step3vl_pacore import PaCoRe, PaCoReConfig
from step3vl_pacore.batch import finished_ids, read_problems, run_batch


def write_input(path, n=4):
    lines = []
    for i in range(n):
        rec = {"id": f"p{i}", "messages": [{"role": "user", "content": f"What is {i}+{i}?"}],
               "ground_truth": str(2 * i), "category": "math"}
        lines.append(json.dumps(rec))
        if i == 1:
            lines.append('{"id": "broken", "messages": [')  # not JSON: an error record, the rest still runs
    path.write_text("\n".join(lines) + "\n")


def read_output(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_an_interrupted_batch(tmp_path, make_llm, script, hook):
    inp, out = tmp_path / "problems.jsonl", tmp_path / "results.jsonl"
    write_input(inp)
    cfg = PaCoReConfig(rounds=[2], max_tokens=16, sampling_hook=hook({"*": script()}))

    llm = make_llm()
    gen = run_batch(PaCoRe(llm, cfg), inp, out)
    got = []
    for rec in gen:  # interrupt after the first solved problem
        got.append(rec)
        if rec["error"] is None:
            break
    gen.close()
    assert not llm.has_unfinished_requests()  # the interrupted rounds were aborted
    assert read_output(out) == got
    solved_first = got[-1]["request_id"]
    with open(out, "ab") as f:  # a crash in the middle of a write leaves a torn line
        f.write(b'{"request_id": "p3", "final_resp')

    resumed = list(run_batch(PaCoRe(make_llm(), cfg), inp, out))
    assert solved_first not in {r["request_id"] for r in resumed}
    records = read_output(out)  # every line parses: the torn tail was cut before appending
    ids = [r["request_id"] for r in records]
    assert sorted(ids) == sorted(["p0", "p1", "p2", "p3", "line3"]) and len(ids) == len(set(ids))
    by_id = {r["request_id"]: r for r in records}
    assert "invalid JSON" in by_id["line3"]["error"]
    for i in range(4):
        r = by_id[f"p{i}"]
        assert r["error"] is None and r["final_response"].startswith(" The answer is")
        assert r["ground_truth"] == str(2 * i) and r["category"] == "math" and r["id"] == f"p{i}"
        assert set(r) >= {"request_id", "final_response", "final_reasoning_content", "round_responses",
                          "tokens_per_round", "effective_ttc", "prefix_hit_tokens", "wall_time", "error"}
        assert len(r["round_responses"]) == 2 and len(r["round_responses"][0]) == 2

    # an uninterrupted run gives the same answers: seeds depend on (seed, problem, round) only
    fresh = tmp_path / "fresh.jsonl"
    straight = {r["request_id"]: r for r in run_batch(PaCoRe(make_llm(), cfg), inp, fresh)}
    for i in range(4):
        assert straight[f"p{i}"]["round_responses"] == by_id[f"p{i}"]["round_responses"]

    assert list(run_batch(PaCoRe(make_llm(), cfg), inp, out)) == []  # nothing left to do
    assert finished_ids(out, retry_errors=True) == {"p0", "p1", "p2", "p3"}

    # --retry-errors runs the failed line again and leaves one record per problem, not the old error beside it
    retried = list(run_batch(PaCoRe(make_llm(), cfg), inp, out, retry_errors=True))
    assert [r["request_id"] for r in retried] == ["line3"]
    ids = [r["request_id"] for r in read_output(out)]
    assert sorted(ids) == sorted(["p0", "p1", "p2", "p3", "line3"]) and len(ids) == len(set(ids))
    assert {r["request_id"]: r for r in read_output(out)}["p0"] == by_id["p0"]


def test_read_problems_rejects_duplicate_ids(tmp_path):
    p = tmp_path / "dup.jsonl"
    rec = json.dumps({"id": "same", "messages": [{"role": "user", "content": "q"}]})
    p.write_text(rec + "\n" + rec + "\n")
    try:
        read_problems(p)
    except ValueError as e:
        assert "duplicate id 'same'" in str(e) and "line 1" in str(e)
    else:
        raise AssertionError("duplicate ids were accepted")


def test_invalid_utf8_fails_its_line_only(tmp_path):
    p = tmp_path / "mixed.jsonl"
    good = json.dumps({"id": "a", "messages": [{"role": "user", "content": "q"}]}).encode()
    p.write_bytes(good + b"\n" + b'{"id": "b", "messages": "\xff"}\n' + good.replace(b'"a"', b'"c"') + b"\n")
    items = read_problems(p)
    assert [getattr(i, "id", None) or i.request_id for i in items] == ["a", "line2", "c"]
    assert items[1].error == f"{p}:2: invalid UTF-8 at byte 25 of the line"  # after {"id": "b", "messages": "


def _comparable(rec):
    """A record without what depends on timing or on which other prompts shared the prefix cache."""
    rec = dict(rec)
    for k in ("wall_time", "prefix_hit_tokens"):
        rec.pop(k)
    rec["rounds"] = [{k: v for k, v in s.items() if k not in ("seconds", "prefix_hit_tokens")} for s in rec["rounds"]]
    return rec


def test_a_problem_interrupted_between_rounds_resumes_at_its_next_round(tmp_path, make_llm, script, hook,
                                                                          monkeypatch):
    from step3vl_pacore import journal as J
    from step3vl_pacore.problem_run import ProblemRun

    inp = tmp_path / "problems.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"Q{i}?"}]}) + "\n"
                           for i in range(3)))
    cfg = PaCoReConfig(rounds=[3, 2], max_tokens=16, sampling_hook=hook({"*": script()}))
    straight = {r["request_id"]: r for r in run_batch(PaCoRe(make_llm(), cfg), inp, tmp_path / "straight.jsonl")}
    assert not list(tmp_path.glob("*.rounds.jsonl"))  # a finished run leaves no journal

    out, started = tmp_path / "results.jsonl", []
    original_record, original_request = J.RoundJournal.record, ProblemRun._round_request

    def record_then_die(self, entry):  # the kill comes after the second finished round is kept
        original_record(self, entry)
        if sum(1 for _ in open(self.path)) == 2:
            raise KeyboardInterrupt

    def logged(self, r, messages):
        started.append((self.problem.id, r))
        return original_request(self, r, messages)

    monkeypatch.setattr(ProblemRun, "_round_request", logged)
    with monkeypatch.context() as m:
        m.setattr(J.RoundJournal, "record", record_then_die)
        try:
            list(run_batch(PaCoRe(make_llm(), cfg), inp, out))
        except KeyboardInterrupt:
            pass
    kept = J.RoundJournal(J.journal_path(out), out).entries
    assert len(kept) >= 1 and not (out.exists() and out.read_text().strip())  # rounds kept, no problem finished
    started.clear()
    resumed = {r["request_id"]: r for r in run_batch(PaCoRe(make_llm(), cfg), inp, out)}
    for pid, entry in kept.items():  # resumed at the round after the kept one, never from round 1
        assert (pid, 0) not in started and (pid, entry["round"] + 1) in started
    assert {k: _comparable(v) for k, v in resumed.items()} == {k: _comparable(v) for k, v in straight.items()}
    assert not list(tmp_path.glob("*.rounds.jsonl"))
