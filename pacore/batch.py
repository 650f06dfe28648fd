"""JSONL batch runs in the official input format, resumable, one atomic append per result.

Input lines: {"id", "messages", optional "ground_truth", "category"}. Output lines: the result record
(request_id, final_response, final_reasoning_content, round_responses, accounting, error) plus id,
ground_truth and category copied from the input.

Atomicity: each record is one line written by a single os.write on an O_APPEND descriptor, then fsync'd,
so a crash leaves at most a torn last line; on resume that torn tail is cut off before appending and the
ids of every complete line are skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

from pacore.problem import Problem
from pacore.result import PaCoReResult
from pacore.runner import PaCoRe


def read_problems(path: str | Path) -> list[Problem | PaCoReResult]:
    """Problems in file order; a line that is not a valid record becomes an error result (id 'line<N>'
    when it has none) so the rest of the batch still runs. Duplicate ids are an input error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    out, seen = [], {}
    with path.open("rb") as f:  # decoded line by line: a bad byte fails its line only, named by file:line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.append(PaCoReResult(request_id=f"line{n}",
                                        error=f"{path}:{n}: invalid UTF-8 at byte {e.start} of the line"))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                out.append(PaCoReResult(request_id=f"line{n}", error=f"{path}:{n}: invalid JSON: {e}"))
                continue
            if not isinstance(record, dict):
                out.append(PaCoReResult(request_id=f"line{n}", error=f"{path}:{n}: a record must be a JSON object"))
                continue
            item = Problem.from_record(record, default_id=f"line{n}")
            if item.id in seen:
                raise ValueError(f"{path}:{n}: duplicate id {item.id!r} (first on line {seen[item.id]})")
            seen[item.id] = n
            out.append(item)
    return out


def finished_ids(path: str | Path, retry_errors: bool = False) -> set[str]:
    """Ids with a complete record in `path`; cuts a torn last line off the file."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a torn tail from an interrupted write
        with path.open("r+b") as f:
            f.truncate(end)
    done: dict[str, bool] = {}
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a damaged line in the middle: that problem runs again
        rid = rec.get("request_id") if isinstance(rec, dict) else None
        if rid is not None:
            done[str(rid)] = rec.get("error") is None
    return {rid for rid, ok in done.items() if ok or not retry_errors}


def drop_records(path: str | Path, keep: set[str]) -> None:
    """Rewrite `path` (atomically) with only the records of the ids in `keep`: on a retry the failed problems'
    old error records go, so each problem ends with one record. A damaged line is dropped with them."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and str(rec.get("request_id")) in keep:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_record(path: str | Path, record: dict) -> None:
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def result_record(result: PaCoReResult, problem: Problem | None) -> dict:
    d = result.to_dict()
    if problem is not None:
        d["id"] = problem.id
        if problem.ground_truth is not None:
            d["ground_truth"] = problem.ground_truth
        if problem.category is not None:
            d["category"] = problem.category
    return d


def run_batch(pacore: PaCoRe, input_path: str | Path, output_path: str | Path, progress: bool = False,
              retry_errors: bool = False) -> Iterator[dict]:
    """Runs every problem of `input_path` not yet in `output_path`, appending each record as it completes;
    yields the records written."""
    items = read_problems(input_path)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    done = finished_ids(output_path, retry_errors)
    if retry_errors:
        drop_records(output_path, keep=done)
    problems = {}
    for item in items:
        rid = item.request_id if isinstance(item, PaCoReResult) else item.id
        if rid in done:
            continue
        if isinstance(item, PaCoReResult):
            rec = result_record(item, None)
            append_record(output_path, rec)
            yield rec
        else:
            problems[item.id] = item
    # closing(): if our caller stops early, the runner's cleanup (aborting rounds in flight) runs now, not
    # whenever the garbage collector gets to the inner generator
    with contextlib.closing(pacore.run_iter(list(problems.values()), progress=progress)) as results:
        for res in results:
            rec = result_record(res, problems[res.request_id])
            append_record(output_path, rec)
            yield rec
