"""The plugin interface (step3vl/plugins.py): entry points sorted by name, STEP3VL_PLUGINS, a broken plugin left out
with a warning naming it, explicit registration, and the CLI with its plugins turned off."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

import step3vl.plugins as plugins
from step3vl.cli import BUILTIN_COMMANDS, main
from step3vl.plugins import ENTRY_POINT_GROUP, PluginRegistry, PluginWarning, load_plugins

PACORE_COMMANDS = ["demo", "pacore", "recipe", "eval"]

FAKE_PLUGINS = '''
def register_a(registry):
    registry.add_command("alpha", "from plugin a", lambda p: p.add_argument("--x", type=int, default=1),
                         lambda args: print(f"alpha x={args.x}") or 0)

def register_b(registry):
    registry.add_command("beta", "from plugin b", lambda p: None, lambda args: 0)

def register_half(registry):  # adds a command, then fails: none of it may stay
    registry.add_command("half", "never listed", lambda p: None, lambda args: 0)
    raise RuntimeError("half-way")
'''


@pytest.fixture
def fake_entry_points(tmp_path, monkeypatch):
    """Replaces the installed plugins with `set_plugins({name: "module:attr"})`'s (module _step3vl_fake_plugins)."""
    (tmp_path / "_step3vl_fake_plugins.py").write_text(FAKE_PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "_step3vl_fake_plugins", raising=False)
    monkeypatch.delenv(plugins.PLUGINS_ENV, raising=False)

    def set_plugins(eps: dict[str, str]) -> None:
        fakes = [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in eps.items()]
        monkeypatch.setattr(plugins, "entry_points", lambda group: [e for e in fakes if e.group == group])
    return set_plugins


def _commands(help_text: str) -> list[str]:
    """The subcommands, in order, from the `positional arguments:` section of `step3vl --help`."""
    lines = help_text.splitlines()
    return lines[lines.index("positional arguments:") + 1].strip().strip("{}").split(",")


def test_pacore_is_an_installed_plugin_and_the_help_lists_every_command_in_order(monkeypatch, capsys):
    monkeypatch.delenv(plugins.PLUGINS_ENV, raising=False)
    assert [(ep.name, ep.value) for ep in plugins.installed_plugins()] == [("pacore", "step3vl_pacore.cli:register")]
    registry = load_plugins()
    assert registry.plugins == ["pacore"] and list(registry.commands) == PACORE_COMMANDS
    assert [e.plugin for e in registry.server_extensions] == ["pacore"]
    assert [s.plugin for s in registry.rl_batch_sources] == ["pacore"]
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert _commands(out) == [*BUILTIN_COMMANDS, *PACORE_COMMANDS]
    assert "plugins: pacore (commands demo, pacore, recipe, eval; options on serve, rl)" in " ".join(out.split())


def test_the_cli_works_with_plugins_turned_off(monkeypatch, capsys):
    monkeypatch.setenv(plugins.PLUGINS_ENV, "")
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--model" in capsys.readouterr().out
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "step3vl demo: error: this command comes from the 'pacore' plugin, which is not loaded" in err
    assert "STEP3VL_PLUGINS='' leaves it out" in err
    with pytest.raises(SystemExit):  # PaCoRe's options are gone from the built-in commands too
        main(["serve", "--pacore-presets", "low"])
    assert "unrecognized arguments: --pacore-presets" in capsys.readouterr().err

    # an embedding application's own (empty) registry
    assert main(["pacore", "--model", "m", "q"], plugins=PluginRegistry()) == 2
    assert "comes from the 'pacore' plugin, which is not loaded (this registry does not load it)" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"], plugins=PluginRegistry())
    assert e.value.code == 0 and _commands(capsys.readouterr().out) == list(BUILTIN_COMMANDS)


def test_step3vl_alone_never_imports_pacore():
    code = ("import sys\nfrom step3vl.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'pacore'], 'pacore imported'\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "STEP3VL_PLUGINS": ""})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_a_broken_plugin_warns_naming_it_and_the_cli_goes_on(fake_entry_points, capsys):
    fake_entry_points({"zeta": "_step3vl_fake_plugins:register_b", "broken": "_step3vl_no_such_module:register",
                       "alpha": "_step3vl_fake_plugins:register_a", "half": "_step3vl_fake_plugins:register_half"})
    with pytest.warns(PluginWarning) as caught:
        registry = load_plugins()
    messages = [str(w.message) for w in caught]
    assert any("'broken'" in m and "_step3vl_no_such_module" in m and "ModuleNotFoundError" in m for m in messages)
    assert any("'half'" in m and "RuntimeError: half-way" in m for m in messages)
    assert registry.plugins == ["alpha", "zeta"]  # sorted by name, the failed ones left out
    assert list(registry.commands) == ["alpha", "beta"] and set(registry.failed) == {"broken", "half"}

    with pytest.warns(PluginWarning) as caught:  # every invocation loads the plugins, and says so again
        assert main(["alpha", "--x", "3"]) == 0
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["broken", "half"]
    assert "alpha x=3" in capsys.readouterr().out
    with pytest.warns(PluginWarning), pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and _commands(out) == [*BUILTIN_COMMANDS, "alpha", "beta"]
    assert "not loaded: broken (failed), half (failed)" in " ".join(out.split())


def test_step3vl_plugins_chooses_which_load(fake_entry_points, monkeypatch):
    fake_entry_points({"alpha": "_step3vl_fake_plugins:register_a", "zeta": "_step3vl_fake_plugins:register_b"})
    monkeypatch.setenv(plugins.PLUGINS_ENV, " zeta ")
    registry = load_plugins()
    assert registry.plugins == ["zeta"] and registry.disabled == ["alpha"]
    monkeypatch.setenv(plugins.PLUGINS_ENV, "zeta,gone")
    with pytest.warns(PluginWarning, match="STEP3VL_PLUGINS names gone, not installed"):
        assert load_plugins().plugins == ["zeta"]


def test_explicit_registration_without_entry_points():
    calls = []

    def register(registry):
        registry.add_command("hello", "say hello", lambda p: p.add_argument("name"),
                             lambda args: calls.append(args.name) or 0)
        registry.add_server_extension(lambda server, args: calls.append(("server", server)))
        registry.add_rl_batches(lambda args, prompts: None)

    registry = PluginRegistry()
    assert registry.register("mine", register)
    assert main(["hello", "world"], plugins=registry) == 0 and calls == ["world"]
    registry.setup_server("the server", None)
    assert calls[-1] == ("server", "the server")
    assert registry.rl_batches(None, []) is None

    # a second plugin with the same command is left out whole
    with pytest.warns(PluginWarning, match="'other'.*'hello'"):
        assert not registry.register("other", register)
    assert registry.plugins == ["mine"] and len(registry.server_extensions) == 1


def test_two_rl_batch_sources_chosen_at_once_is_an_error():
    registry = PluginRegistry()
    registry.register("a", lambda r: r.add_rl_batches(lambda args, prompts: "batches of a"))
    assert registry.rl_batches(None, []) == "batches of a"
    registry.register("b", lambda r: r.add_rl_batches(lambda args, prompts: "batches of b"))
    with pytest.raises(ValueError, match="plugins a, b each choose the RL batches"):
        registry.rl_batches(None, [])
