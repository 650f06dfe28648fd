"""PaCoRe: parallel coordinated reasoning on the step3vl engine, installed as `step3vl_pacore`.

The names below are imported on first use: every `step3vl` invocation loads the `pacore` plugin (pacore/cli.py),
which should not pull in torch and the engine just to list its commands.

Run from the repository root, this folder would also be importable as the top-level `pacore`, the import name of
the official PaCoRe package; imported under that name, it hands the import on to that package (or fails as if
`pacore` were absent), as kernels/__init__.py does for `kernels`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from step3vl.lazy import lazy_exports

if __name__ == "pacore":
    from step3vl_kernels.bare_name import hand_on

    hand_on("pacore", __file__, "step3vl_pacore", "the official PaCoRe package")

_EXPORTS = {
    "PRESETS": "step3vl_pacore.config", "PaCoReConfig": "step3vl_pacore.config",
    "EpisodeConfig": "step3vl_pacore.episodes", "SynthesisEpisode": "step3vl_pacore.episodes", "make_episodes": "step3vl_pacore.episodes",
    "pool_from_result": "step3vl_pacore.episodes",
    "Problem": "step3vl_pacore.problem",
    "PaCoReResult": "step3vl_pacore.result", "RoundStats": "step3vl_pacore.result",
    "PaCoRe": "step3vl_pacore.runner",
    "SYNTHESIS_TEMPLATE": "step3vl_pacore.template", "render_synthesis": "step3vl_pacore.template",
}

__all__ = ["PRESETS", "EpisodeConfig", "PaCoRe", "PaCoReConfig", "PaCoReResult", "Problem", "RoundStats",
           "SYNTHESIS_TEMPLATE", "SynthesisEpisode", "make_episodes", "pool_from_result", "render_synthesis"]

if TYPE_CHECKING:
    from step3vl_pacore.config import PRESETS, PaCoReConfig
    from step3vl_pacore.episodes import EpisodeConfig, SynthesisEpisode, make_episodes, pool_from_result
    from step3vl_pacore.problem import Problem
    from step3vl_pacore.result import PaCoReResult, RoundStats
    from step3vl_pacore.runner import PaCoRe
    from step3vl_pacore.template import SYNTHESIS_TEMPLATE, render_synthesis


__getattr__ = lazy_exports(globals(), _EXPORTS)
