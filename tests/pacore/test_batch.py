"""JSONL batch runs: official input format, atomic appends, resume after an interruption."""

import json

from pacore import PaCoRe, PaCoReConfig
from pacore.batch import finished_ids, read_problems, run_batch


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
