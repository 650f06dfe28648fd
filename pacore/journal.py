"""The rounds journal of a batch run: each finished round of a problem that is still running, so a run
interrupted inside a problem resumes at its next round instead of redoing the rounds it had (a medium problem's
first round alone is 16 trajectories).

A sidecar beside the output, `<output>.rounds.jsonl` (a data-parallel rank's beside its part file), one JSON line
per finished non-final round: what `ProblemRun` needs to continue (the messages passed on, the round records and
stats so far). Lines are appended whole and fsynced (step3vl.durable.append_json_line); a line cut by a kill is ignored. The
newest entry of a problem wins. Resuming gives the same result as an uninterrupted run: a round's prompt and
seed depend only on the problem, the round and the messages the journal kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from step3vl.durable import append_json_line

SUFFIX = ".rounds.jsonl"


def journal_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + SUFFIX)


class RoundJournal:
    """Writes to `path`; resumes from the entries of every journal beside `output` (this run's and those of
    earlier runs at any number of ranks)."""

    def __init__(self, path: str | Path, output: str | Path):
        self.path = Path(path)
        self.entries = _read_all(Path(output))

    def entry(self, problem_id: str) -> dict | None:
        return self.entries.get(problem_id)

    def record(self, entry: dict) -> None:
        append_json_line(self.path, entry)


def journals(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f"{output.name}*{SUFFIX}"))


def remove_journals(output: Path) -> None:
    for p in journals(output):
        p.unlink(missing_ok=True)


def _read_all(output: Path) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    for path in journals(output):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(e, dict) and "request_id" in e:
                old = entries.get(e["request_id"])
                if old is None or e["round"] >= old["round"]:
                    entries[e["request_id"]] = e
    return entries
