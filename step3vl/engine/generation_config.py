"""Default sampling parameters from a generation_config.json (vLLM's `--generation-config`).

A request that leaves temperature, top_p, top_k, min_p, repetition_penalty or its token budget unset gets the
model's values from this file instead of the OpenAI defaults, as vLLM does ("auto"); "vllm" turns that off; a
folder path reads that folder's file instead of the model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from step3vl.engine.sampling_params import SamplingParams

FILE = "generation_config.json"
# the file's name -> SamplingParams' field
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def sampling_defaults(source: str, model_dir: str | Path) -> dict[str, Any]:
    """SamplingParams fields (by name) that `source` sets: {} for "vllm", or when "auto" finds no file."""
    if source == "vllm":
        return {}
    folder = Path(model_dir) if source == "auto" else Path(source)
    path = folder / FILE
    if not path.is_file():
        if source == "auto":
            return {}
        raise ValueError(f"generation_config {source!r}: no {FILE} in {folder} (give 'auto', 'vllm' or a folder "
                         f"that has one)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    out = {ours: data[theirs] for theirs, ours in FIELDS.items() if data.get(theirs) is not None}
    try:
        SamplingParams(**out)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return out
