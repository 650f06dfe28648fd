"""Logging of step3vl and its plugins, configured once by the command line (vLLM's style).

Library modules only log (`logger = logging.getLogger(__name__)`) and never configure anything: an application
that embeds step3vl keeps its own logging setup. The `step3vl` command (step3vl/cli.py) calls
`configure_logging()`, which gives the `step3vl`, `step3vl_pacore` and `step3vl_kernels` loggers one handler on
stderr and one level: the global `--log-level`, else the environment variable STEP3VL_LOGGING_LEVEL (like
VLLM_LOGGING_LEVEL), else INFO.
`step3vl serve` passes the same level to uvicorn. Lines look like vLLM's:

    INFO 12-06 21:10:00 [llm.py:85] message
"""

from __future__ import annotations

import logging
import os
import sys

LOGGING_LEVEL_ENV = "STEP3VL_LOGGING_LEVEL"
LEVELS = ("debug", "info", "warning", "error", "critical")  # the names --log-level takes (uvicorn's too)
DEFAULT_LEVEL = "info"
LOGGERS = ("step3vl", "step3vl_pacore", "step3vl_kernels")  # the hierarchies configured (our three packages)
FORMAT = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
DATE_FORMAT = "%m-%d %H:%M:%S"


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (as logging.lastResort does), not to the one at configuration
    time: a caller that swaps sys.stderr (pytest's capture, a redirect) gets the lines."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def level_name(level: str | None = None, env: dict[str, str] | None = None) -> str:
    """The level to use, lower case (one of LEVELS): `level` (--log-level) when given, else STEP3VL_LOGGING_LEVEL
    when set and not empty, else info. An unknown name raises ValueError saying where it came from."""
    source = "--log-level"
    if level is None:
        level = (os.environ if env is None else env).get(LOGGING_LEVEL_ENV) or None
        source = LOGGING_LEVEL_ENV
    if level is None:
        return DEFAULT_LEVEL
    name = str(level).strip().lower()
    if name not in LEVELS:
        raise ValueError(f"{source}={level!r}: choose one of {', '.join(LEVELS)}")
    return name


def configure_logging(level: str | None = None, loggers: tuple[str, ...] = LOGGERS) -> str:
    """Give each of `loggers` one stderr handler with the format above, and the level `level_name(level)`;
    returns that name. Idempotent: a second call changes the level and adds no handler. The loggers do not
    propagate to the root logger, so a root handler set by something else does not print every line twice."""
    name = level_name(level)
    value = getattr(logging, name.upper())
    for logger_name in loggers:
        logger = logging.getLogger(logger_name)
        logger.setLevel(value)
        logger.propagate = False
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
            logger.addHandler(handler)
    return name
