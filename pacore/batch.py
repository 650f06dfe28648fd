"""JSONL batch runs in the official input format, resumable, one atomic append per result.

Input lines: {"id", "messages", optional "ground_truth", "category"}. Output lines: the result record
(request_id, final_response, final_reasoning_content, round_responses, accounting, error) plus id,
ground_truth and category copied from the input.

Atomicity: each record is one line written by a single os.write on an O_APPEND descriptor, then fsync'd,
so a crash leaves at most a torn last line; on resume that torn tail is cut off before appending and the
ids of every complete line are skipped.

Data parallel (`run_batch(..., dist=DistEnv)` under torchrun, one engine per rank): rank 0 folds whatever an
earlier run left (the output and any part files, of any world size) into the output and broadcasts the ids still
to do; each rank runs its `DistEnv.shard` of them, appending to its own part file `<output>.part-<rank>-of-<N>`
(same atomic appends); after a barrier rank 0 merges the output and every part file into the output in input
order (tmp file + os.replace) and removes the part files. A run that stops anywhere is resumed by the same command
with any number of ranks, or by one process (which folds the part files in the same way). A problem's seeds
depend on (seed, problem id, round) only, so its record does not depend on the rank that ran it, but for its
timings and prefix_hit_tokens (docs/ARCHITECTURE.md says when last-bit prefill differences can matter).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from step3vl.durable import append_json_line

from step3vl_pacore.journal import RoundJournal, journal_path, remove_journals
from step3vl_pacore.problem import Problem
from step3vl_pacore.result import PaCoReResult
from step3vl_pacore.runner import PaCoRe

if TYPE_CHECKING:
    from step3vl.distributed import DistEnv


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
    append_json_line(path, record)


def result_record(result: PaCoReResult, problem: Problem | None) -> dict:
    d = result.to_dict()
    if problem is not None:
        d["id"] = problem.id
        if problem.ground_truth is not None:
            d["ground_truth"] = problem.ground_truth
        if problem.category is not None:
            d["category"] = problem.category
    return d


def _item_id(item: Problem | PaCoReResult) -> str:
    return item.request_id if isinstance(item, PaCoReResult) else item.id


def _run_items(pacore: PaCoRe, items: list, path: Path, progress: bool, output: Path | None = None) -> Iterator[dict]:
    """Appends to `path` the record of every item (error results at once, problems as they complete); the
    finished rounds of problems still running go to the rounds journal beside it (pacore/journal.py), and an
    earlier run's journal beside `output` (default: `path`) resumes them."""
    problems = {}
    for item in items:
        if isinstance(item, PaCoReResult):
            rec = result_record(item, None)
            append_record(path, rec)
            yield rec
        else:
            problems[item.id] = item
    # closing(): if our caller stops early, the runner's cleanup (aborting rounds in flight) runs now, not
    # whenever the garbage collector gets to the inner generator
    journal = RoundJournal(journal_path(path), output or path)
    with contextlib.closing(pacore.run_iter(list(problems.values()), progress=progress, journal=journal)) as results:
        for res in results:
            rec = result_record(res, problems[res.request_id])
            append_record(path, rec)
            yield rec


def run_batch(pacore: PaCoRe, input_path: str | Path, output_path: str | Path, progress: bool = False,
              retry_errors: bool = False, dist: "DistEnv | None" = None) -> Iterator[dict]:
    """Runs every problem of `input_path` not yet in `output_path`, appending each record as it completes;
    yields the records written (by this rank).

    dist: under torchrun, this rank's DistEnv: the problems to do are split over the ranks (see the module
    docstring); every rank must call this with the same arguments and run the generator to its end (the last
    step is a barrier, then rank 0's merge). A single process that finds part files left by a data-parallel run
    folds them in first and ends with the same merge."""
    output_path = Path(output_path)
    if (dist is None or not dist.is_distributed) and not part_files(output_path):
        yield from _run_single(pacore, input_path, output_path, progress, retry_errors)
        return
    if dist is None:
        import torch

        from step3vl.distributed import DistEnv
        dist = DistEnv(0, 1, 0, torch.device("cpu"))  # world size 1: the collectives are no-ops
    yield from _run_sharded(pacore, input_path, output_path, progress, retry_errors, dist)


def _run_single(pacore: PaCoRe, input_path, output_path: Path, progress: bool, retry_errors: bool) -> Iterator[dict]:
    items = read_problems(input_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    done = finished_ids(output_path, retry_errors)
    if retry_errors:
        drop_records(output_path, keep=done)
    yield from _run_items(pacore, [it for it in items if _item_id(it) not in done], output_path, progress)
    remove_journals(output_path)  # every problem has its record: the rounds kept for resuming are spent


def _run_sharded(pacore: PaCoRe, input_path, output_path: Path, progress: bool, retry_errors: bool,
                 dist: "DistEnv") -> Iterator[dict]:
    items = read_problems(input_path)  # on every rank (the same list); a bad input fails every rank alike
    todo = None
    if dist.is_main:  # the others wait in the broadcast while rank 0 reads and rewrites the files
        output_path.parent.mkdir(parents=True, exist_ok=True)
        if part_files(output_path):
            merge_parts(output_path, items)  # an earlier run's parts (any world size) become part of the output
        done = finished_ids(output_path, retry_errors)
        if retry_errors:
            drop_records(output_path, keep=done)
        todo = [_item_id(it) for it in items if _item_id(it) not in done]
    todo = set(dist.shard(dist.broadcast_object(todo)))
    part = part_path(output_path, dist.rank, dist.world_size)
    yield from _run_items(pacore, [it for it in items if _item_id(it) in todo], part, progress, output_path)
    dist.barrier()  # every rank's records are in its part file
    if dist.is_main:
        merge_parts(output_path, items)
        remove_journals(output_path)


# -- part files of a data-parallel run ---------------------------------------------------------------

def part_path(output_path: str | Path, rank: int, world_size: int) -> Path:
    output_path = Path(output_path)
    return output_path.with_name(f"{output_path.name}.part-{rank}-of-{world_size}")


def part_files(output_path: str | Path) -> list[Path]:
    """The part files next to `output_path` left by data-parallel runs of any world size, sorted by name."""
    output_path = Path(output_path)
    if not output_path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(output_path.name) + r"\.part-\d+-of-\d+")
    return sorted(p for p in output_path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def _complete_lines(path: Path) -> Iterator[tuple[int, int, dict]]:
    """(offset, length, record) of each complete line of `path` that is a JSON object with a request_id;
    a torn last line (no newline) and damaged lines are skipped."""
    with path.open("rb") as f:
        offset = 0
        for line in f:
            start, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict) and rec.get("request_id") is not None:
                yield start, len(line), rec


def merge_parts(output_path: str | Path, items: list) -> None:
    """Rewrite `output_path` with its records and those of every part file next to it, one per id in the order
    of `items` (the input; ids not in it follow in the order found), atomically; then remove the part files.
    When an id has several records, the last found wins unless it is an error and an earlier one is not (the
    output is read first, then the part files by name). Damaged and torn lines are dropped."""
    output_path = Path(output_path)
    parts = part_files(output_path)
    sources = ([output_path] if output_path.exists() else []) + parts
    chosen: dict[str, tuple[int, int, int, bool]] = {}  # id -> (source, offset, length, ok)
    for s, path in enumerate(sources):
        for offset, length, rec in _complete_lines(path):
            rid, ok = str(rec["request_id"]), rec.get("error") is None
            prev = chosen.get(rid)
            if prev is not None and prev[3] and not ok:
                continue
            chosen[rid] = (s, offset, length, ok)
    order = [_item_id(it) for it in items]
    in_input = set(order)
    ids = [rid for rid in order if rid in chosen] + [rid for rid in chosen if rid not in in_input]
    tmp = output_path.with_name(output_path.name + ".tmp")
    files = [path.open("rb") for path in sources]
    try:
        with open(tmp, "wb") as out:
            for rid in ids:
                s, offset, length, _ = chosen[rid]
                files[s].seek(offset)
                out.write(files[s].read(length))
            out.flush()
            os.fsync(out.fileno())
    finally:
        for f in files:
            f.close()
    os.replace(tmp, output_path)
    _fsync_dir(output_path.parent)
    for path in parts:  # only once the merged output is in place: a crash before this leaves duplicates, which
        path.unlink()   # the next merge folds again (the same records)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
