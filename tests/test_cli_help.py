"""`step3vl --help` and every command's: each option (the plugins' included) has a help line, the defaults are
shown (never as "(default: None)": what leaving an option out means is said instead), and each help renders."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from step3vl import plugins
from step3vl.cli import BUILTIN_COMMANDS, HelpFormatter, _command_word, _parser, main
from step3vl.plugins import PluginRegistry, load_plugins


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.delenv(plugins.PLUGINS_ENV, raising=False)
    registry = load_plugins()
    assert "pacore" in registry.plugins  # the installed plugin's commands and options are walked too
    return registry


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _flag(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


def test_every_option_of_every_command_has_help(registry):
    ap = _parser(registry)
    commands = _subparsers(ap)
    assert list(commands) == [*BUILTIN_COMMANDS, *registry.commands]
    missing = [f"{name}: {_flag(a)}" for name, p in [("step3vl", ap), *commands.items()] for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, "options without a help line:\n" + "\n".join(missing)


def test_every_default_is_shown_and_none_is_never_printed(registry):
    ap = _parser(registry)
    for name, p in _subparsers(ap).items():
        formatter = HelpFormatter(prog=f"step3vl {name}")
        for a in p._actions:
            if not a.option_strings or isinstance(a, argparse._HelpAction):
                continue
            text = formatter._get_help_string(a)
            if a.default is not None and a.default is not False and a.default != [] and \
                    a.default is not argparse.SUPPRESS:
                assert "default" in text.lower(), f"step3vl {name} {_flag(a)}: default {a.default!r} not shown"


@pytest.mark.parametrize("command", [None, *BUILTIN_COMMANDS, "demo", "pacore", "recipe", "eval"])
def test_each_help_renders_with_its_options_and_defaults(registry, command, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"] if command is None else [command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    parser = _parser(registry) if command is None else _subparsers(_parser(registry))[command]
    flat = " ".join(out.split())
    for a in parser._actions:
        for flag in a.option_strings:
            assert flag in out, f"{command}: {flag} missing from the help"
    assert "(default: None)" not in flat and "--log-level" in out
    assert "$STEP3VL_LOGGING_LEVEL, else info" in flat


def test_some_defaults_as_a_user_reads_them(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "new tokens per sample, at most (default: 256)" in out
    assert "(default: a fresh random seed each run)" in out
    assert "(default: off, plain decoding)" in out  # --speculative-config: what unset means
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "passes over --data (default: 1)" in out and "(default: 1e-05)" in out


def test_log_level_is_one_option_before_or_after_the_command(registry):
    ap = _parser(registry)
    base = ["generate", "--model", "m", "p"]
    assert ap.parse_args(base).log_level is None  # unset: STEP3VL_LOGGING_LEVEL, else info
    assert ap.parse_args(["--log-level", "debug", *base]).log_level == "debug"
    assert ap.parse_args([*base, "--log-level", "WARNING"]).log_level == "warning"
    assert ap.parse_args(["--log-level", "debug", *base, "--log-level", "error"]).log_level == "error"
    assert ap.parse_args(["--log-level", "error", "serve", "--log-level", "debug"]).log_level == "debug"
    train = ["train", "--model", "m", "--data", "d", "--out", "o"]
    assert ap.parse_args([*train, "--log", "x"]).log == Path("x")  # --log still names --log-file
    with pytest.raises(SystemExit):
        ap.parse_args([*base, "--log-level", "loud"])


def test_the_command_word_skips_the_log_level_value(capsys):
    assert _command_word(["--log-level", "debug", "demo", "x"]) == "demo"
    assert _command_word(["--version"]) is None
    assert main(["--log-level", "warning", "demo"], plugins=PluginRegistry()) == 2
    assert "comes from the 'pacore' plugin, which is not loaded" in capsys.readouterr().err
