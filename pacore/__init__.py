"""PaCoRe: parallel coordinated reasoning on the step3vl engine."""

from pacore.config import PRESETS, PaCoReConfig
from pacore.episodes import EpisodeConfig, SynthesisEpisode, make_episodes, pool_from_result
from pacore.problem import Problem
from pacore.result import PaCoReResult, RoundStats
from pacore.runner import PaCoRe
from pacore.template import SYNTHESIS_TEMPLATE, render_synthesis

__all__ = ["PRESETS", "EpisodeConfig", "PaCoRe", "PaCoReConfig", "PaCoReResult", "Problem", "RoundStats",
           "SYNTHESIS_TEMPLATE", "SynthesisEpisode", "make_episodes", "pool_from_result", "render_synthesis"]
