"""PaCoRe: parallel coordinated reasoning on the step3vl engine.

The names below are imported on first use: every `step3vl` invocation loads the `pacore` plugin (pacore/cli.py),
which should not pull in torch and the engine just to list its commands.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "PRESETS": "pacore.config", "PaCoReConfig": "pacore.config",
    "EpisodeConfig": "pacore.episodes", "SynthesisEpisode": "pacore.episodes", "make_episodes": "pacore.episodes",
    "pool_from_result": "pacore.episodes",
    "Problem": "pacore.problem",
    "PaCoReResult": "pacore.result", "RoundStats": "pacore.result",
    "PaCoRe": "pacore.runner",
    "SYNTHESIS_TEMPLATE": "pacore.template", "render_synthesis": "pacore.template",
}

__all__ = ["PRESETS", "EpisodeConfig", "PaCoRe", "PaCoReConfig", "PaCoReResult", "Problem", "RoundStats",
           "SYNTHESIS_TEMPLATE", "SynthesisEpisode", "make_episodes", "pool_from_result", "render_synthesis"]

if TYPE_CHECKING:
    from pacore.config import PRESETS, PaCoReConfig
    from pacore.episodes import EpisodeConfig, SynthesisEpisode, make_episodes, pool_from_result
    from pacore.problem import Problem
    from pacore.result import PaCoReResult, RoundStats
    from pacore.runner import PaCoRe
    from pacore.template import SYNTHESIS_TEMPLATE, render_synthesis


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pacore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
