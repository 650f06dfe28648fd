"""Per-round sampling seeds and the `</think>` marker: the two facts every PaCoRe driver must agree on."""

from __future__ import annotations

import hashlib

THINK_END = "</think>"


def round_seed(seed: int, problem_id: str, round_index: int) -> int:
    """The sampling seed of one round: reproducible per (seed, problem, round), distinct across them."""
    h = hashlib.blake2b(f"{seed}\0{problem_id}\0{round_index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def think_end_marker(tokenizer) -> list[int]:
    tid = getattr(tokenizer, "think_end_id", None)
    if tid is not None:
        return [tid]
    ids = tokenizer.encode(THINK_END)
    if not ids:
        raise ValueError(f"the tokenizer encodes {THINK_END!r} to no tokens")
    return list(ids)
