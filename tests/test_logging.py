"""Logging: one level switch (STEP3VL_LOGGING_LEVEL, or the CLI's --log-level, which wins) for step3vl, its
plugins and uvicorn; vLLM's line format on stderr; configured by the command line only, never by an import."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from step3vl import logs
from step3vl.logs import LOGGING_LEVEL_ENV, configure_logging, level_name

LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[\w.]+\.py:\d+\] ", re.M)
LLM_INFO = re.compile(r"^INFO \d\d-\d\d \d\d:\d\d:\d\d \[llm\.py:\d+\] LLM: .*float32 on cpu.*KV pool \d+ blocks "
                      r"of 16 tokens \(8\.0 MiB\), max_model_len \d+", re.M)
LLM_DEBUG = re.compile(r"^DEBUG .* \[llm\.py:\d+\] LLM: EngineConfig\(", re.M)


@pytest.fixture(autouse=True)
def _restore_loggers():
    """main() and configure_logging() set up the package loggers for the process: put them back (pytest attaches
    its own capture handlers to non-propagating loggers, and removes them itself)."""
    saved = {n: (lg.level, lg.propagate, _ours(lg)) for n in logs.LOGGERS for lg in [logging.getLogger(n)]}
    yield
    for n, (level, propagate, handlers) in saved.items():
        lg = logging.getLogger(n)
        lg.setLevel(level)
        lg.propagate = propagate
        for h in _ours(lg):
            if h not in handlers:
                lg.removeHandler(h)


def _ours(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if isinstance(h, logs._StderrHandler)]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != LOGGING_LEVEL_ENV}
    return subprocess.run([sys.executable, "-m", "step3vl", *args], capture_output=True, text=True, timeout=timeout,
                          env={**clean, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("logging") / "tiny"
    out = _cli("make-checkpoint", str(path), "--preset", "tiny")
    assert out.returncode == 0 and "wrote a tiny checkpoint" in out.stdout, out.stderr
    return path


def _generate(ckpt, before: tuple[str, ...] = (), after: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`step3vl [before] generate --model CKPT hi ... [after]`: options before and after the command."""
    out = _cli(*before, "generate", "--model", str(ckpt), "hi", "--max-tokens", "2", "--kv-cache-memory", "8MiB",
               "--threads", "1", *after, env=env)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^\(\d tokens, finish_reason=\w+\)$", out.stderr, re.M)  # the command's output, not a log line
    return out


def test_the_default_level_is_info_in_vllms_format(ckpt):
    out = _generate(ckpt)
    assert LLM_INFO.search(out.stderr), out.stderr
    assert not LLM_DEBUG.search(out.stderr)
    assert not re.search(r"\] plugins: ", out.stderr)  # which plugins loaded: a DEBUG line
    assert not LINE.search(out.stdout)  # log lines go to stderr; stdout has the result only
    assert out.stderr.count("] LLM: ") == 1  # one handler, one line


def test_step3vl_logging_level_sets_the_level(ckpt):
    debug = _generate(ckpt, env={LOGGING_LEVEL_ENV: "DEBUG"})
    assert LLM_DEBUG.search(debug.stderr) and LLM_INFO.search(debug.stderr), debug.stderr
    assert re.search(r"^DEBUG .*\] plugins: pacore \(commands", debug.stderr, re.M)
    quiet = _generate(ckpt, env={LOGGING_LEVEL_ENV: "warning"})
    assert not LINE.search(quiet.stderr), quiet.stderr


def test_log_level_wins_over_the_environment_before_or_after_the_command(ckpt):
    quiet = _generate(ckpt, after=("--log-level", "warning"), env={LOGGING_LEVEL_ENV: "DEBUG"})
    assert not LINE.search(quiet.stderr), quiet.stderr
    debug = _generate(ckpt, before=("--log-level", "debug"), env={LOGGING_LEVEL_ENV: "ERROR"})
    assert LLM_DEBUG.search(debug.stderr), debug.stderr


def test_an_unknown_level_is_an_error_naming_its_source(ckpt):
    out = _cli("generate", "--model", str(ckpt), "hi", env={LOGGING_LEVEL_ENV: "loud"})
    assert out.returncode == 2 and f"{LOGGING_LEVEL_ENV}='loud': choose one of debug, info" in out.stderr
    with pytest.raises(ValueError, match="--log-level='x'"):
        level_name("x")


def test_importing_step3vl_configures_no_logging():
    code = ("import logging, step3vl, step3vl.cli, step3vl.engine.llm, step3vl.serve.server, step3vl_pacore.cli\n"
            "names = ['', 'step3vl', 'step3vl_pacore', 'step3vl.engine.llm', 'step3vl.cli']\n"
            "bad = [(n, logging.getLogger(n).handlers) for n in names if logging.getLogger(n).handlers]\n"
            "assert not bad, bad\n"
            "assert logging.getLogger('step3vl').level == logging.NOTSET\n"
            "assert logging.getLogger('step3vl').propagate\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", LOGGING_LEVEL_ENV: "DEBUG"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_configuring_twice_adds_no_second_handler_and_follows_sys_stderr(monkeypatch, capsys):
    monkeypatch.delenv(LOGGING_LEVEL_ENV, raising=False)
    assert configure_logging() == "info"
    assert configure_logging("DEBUG") == "debug"
    for name in ("step3vl", "step3vl_pacore"):
        lg = logging.getLogger(name)
        assert lg.level == logging.DEBUG and len(_ours(lg)) == 1 and not lg.propagate
    logging.getLogger("step3vl_pacore.runner").debug("a debug line")
    err = capsys.readouterr().err  # written to the sys.stderr of now (pytest's capture), not of configuration
    assert re.fullmatch(r"DEBUG \d\d-\d\d \d\d:\d\d:\d\d \[test_logging\.py:\d+\] a debug line\n", err), err
    monkeypatch.setenv(LOGGING_LEVEL_ENV, "error")
    assert configure_logging() == "error" and logging.getLogger("step3vl").level == logging.ERROR
    logging.getLogger("step3vl.engine").warning("hidden")
    assert capsys.readouterr().err == ""


def test_uvicorn_follows_the_level(monkeypatch):
    from step3vl.cli import uvicorn_options

    monkeypatch.delenv(LOGGING_LEVEL_ENV, raising=False)
    assert uvicorn_options("127.0.0.1", 8000) == dict(host="127.0.0.1", port=8000, log_level="info")
    assert uvicorn_options("0.0.0.0", 1, "DEBUG")["log_level"] == "debug"
    monkeypatch.setenv(LOGGING_LEVEL_ENV, "ERROR")
    assert uvicorn_options("127.0.0.1", 8000)["log_level"] == "error"
    assert uvicorn_options("127.0.0.1", 8000, "warning")["log_level"] == "warning"


@pytest.mark.parametrize("argv, env, level", [
    (["--log-level", "warning", "serve"], None, "warning"),  # the global switch
    (["serve", "--log-level", "debug"], "error", "debug"),  # serve's own --log-level is the same switch
    (["serve"], "ERROR", "error"),  # the environment
])
def test_serve_passes_the_one_level_to_uvicorn(ckpt, monkeypatch, argv, env, level):
    import uvicorn

    from step3vl.cli import main

    if env is None:
        monkeypatch.delenv(LOGGING_LEVEL_ENV, raising=False)
    else:
        monkeypatch.setenv(LOGGING_LEVEL_ENV, env)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    args = [*argv, str(ckpt), "--kv-cache-memory", "8MiB", "--pacore-presets", "", "--port", "8123"]
    assert main(args) == 0
    assert {k: seen[k] for k in ("host", "port", "log_level")} == dict(host="127.0.0.1", port=8123, log_level=level)
    assert logging.getLogger("step3vl").level == getattr(logging, level.upper())
