"""Plugins: how packages built on step3vl (PaCoRe) add to it without step3vl importing them.

Modelled on vLLM's general plugins. A plugin is a callable `register(registry)`, found through the entry-point group
`step3vl.plugins` of the installed distributions (`[project.entry-points."step3vl.plugins"]` in a pyproject.toml)
or handed over explicitly by an embedding application (`PluginRegistry.register`). What a plugin may add:

- a CLI subcommand: `registry.add_command(name, help, add_arguments, run)`;
- a server extension: `registry.add_server_extension(setup, add_arguments)`; `setup(server, args)` runs once the
  `step3vl serve` server (an `OpenAIServer`) is built, before it listens, and adds chat models
  (`server.add_chat_model`) and routes (`server.add_route`); `add_arguments` puts its options on `step3vl serve`;
- an RL batch source: `registry.add_rl_batches(make, add_arguments)`; `make(args, prompts)` returns the batches
  `step3vl rl` trains on (anything `reinforce` takes: `batches(step)`, optionally state_dict/load_state_dict), or
  None when its options were not given (the plain problems are drawn then); `add_arguments` puts its options on
  `step3vl rl`.

`load_plugins()` loads the installed plugins sorted by name. The environment variable STEP3VL_PLUGINS (names,
comma-separated, like VLLM_PLUGINS) restricts which: unset, all; empty, none. A plugin that fails to load or to
register warns (`PluginWarning`, naming it) and adds nothing: the CLI goes on without it.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

ENTRY_POINT_GROUP = "step3vl.plugins"
PLUGINS_ENV = "STEP3VL_PLUGINS"

AddArguments = Callable[[argparse.ArgumentParser], None]


class PluginWarning(UserWarning):
    """A plugin that could not be loaded or registered (it is left out), or a STEP3VL_PLUGINS name not installed."""


@dataclass(frozen=True)
class Command:
    """A CLI subcommand from a plugin: `step3vl <name>`; run(args) returns the exit status."""
    name: str
    help: str
    add_arguments: AddArguments
    run: Callable[[argparse.Namespace], int]
    plugin: str


@dataclass(frozen=True)
class ServerExtension:
    """setup(server, args): adds models / routes to the `step3vl serve` server; its options go on `serve`."""
    setup: Callable[[Any, argparse.Namespace], None]
    add_arguments: AddArguments | None
    plugin: str


@dataclass(frozen=True)
class RLBatchSource:
    """make(args, prompts) -> batches for `step3vl rl`, or None when its options were not given."""
    make: Callable[[argparse.Namespace, list], Any]
    add_arguments: AddArguments | None
    plugin: str


class PluginRegistry:
    """What the loaded plugins added. `register(name, fn)` runs one plugin's `fn(registry)`: all of what it adds
    is kept, or, if it raises, none of it (with a PluginWarning naming it)."""

    def __init__(self) -> None:
        self.plugins: list[str] = []  # registered, in load order
        self.failed: dict[str, str] = {}  # plugin -> why it was left out
        self.disabled: list[str] = []  # installed but not loaded (STEP3VL_PLUGINS)
        self.commands: dict[str, Command] = {}
        self.server_extensions: list[ServerExtension] = []
        self.rl_batch_sources: list[RLBatchSource] = []
        self._plugin: str | None = None  # the plugin whose register() is running (a staging registry's)

    # -- what a plugin's register(registry) calls ---------------------------------------------------------------

    def add_command(self, name: str, help: str, add_arguments: AddArguments,
                    run: Callable[[argparse.Namespace], int]) -> None:
        if name in self.commands:
            raise ValueError(f"command {name!r} is already added (by plugin {self.commands[name].plugin!r})")
        add_arguments(argparse.ArgumentParser(prog=f"step3vl {name}"))  # a broken one fails the plugin's load
        self.commands[name] = Command(name, help, add_arguments, run, self._owner())

    def add_server_extension(self, setup: Callable[[Any, argparse.Namespace], None],
                             add_arguments: AddArguments | None = None) -> None:
        self.server_extensions.append(ServerExtension(setup, add_arguments, self._owner()))

    def add_rl_batches(self, make: Callable[[argparse.Namespace, list], Any],
                       add_arguments: AddArguments | None = None) -> None:
        self.rl_batch_sources.append(RLBatchSource(make, add_arguments, self._owner()))

    # -- loading ---------------------------------------------------------------------------------------------

    def register(self, name: str, fn: Callable[[PluginRegistry], None]) -> bool:
        """Runs plugin `name`'s register function `fn` on this registry (entry points, or an embedding
        application's explicit call). Returns whether it was added; a failure warns and adds nothing. The same name
        twice is the caller's mistake: ValueError."""
        if name in self.plugins:
            raise ValueError(f"plugin {name!r} is already registered")
        staging = PluginRegistry()
        staging._plugin = name
        try:
            fn(staging)
            clash = sorted(set(staging.commands) & set(self.commands))
            if clash:
                owners = ", ".join(f"{c!r} (plugin {self.commands[c].plugin!r})" for c in clash)
                raise ValueError(f"its command(s) {owners} are already added")
        except Exception as e:  # noqa: BLE001 - any failure of a plugin leaves it out, never the CLI
            self._fail(name, f"register() raised {type(e).__name__}: {e}")
            return False
        self.plugins.append(name)
        self.commands.update(staging.commands)
        self.server_extensions += staging.server_extensions
        self.rl_batch_sources += staging.rl_batch_sources
        return True

    def _fail(self, name: str, why: str) -> None:
        self.failed[name] = why
        warnings.warn(f"step3vl plugin {name!r} left out: {why}", PluginWarning, stacklevel=3)

    def _owner(self) -> str:
        return self._plugin or "<direct>"

    # -- what step3vl calls ----------------------------------------------------------------------------------

    def add_options(self, command: str, parser: argparse.ArgumentParser) -> None:
        """The plugins' options on built-in command `serve` or `rl` (a plugin whose options clash warns and is
        skipped)."""
        hooks = {"serve": self.server_extensions, "rl": self.rl_batch_sources}.get(command, [])
        for hook in hooks:
            if hook.add_arguments is None:
                continue
            try:
                hook.add_arguments(parser)
            except Exception as e:  # noqa: BLE001 - e.g. an option a built-in already has
                warnings.warn(f"step3vl plugin {hook.plugin!r}: its options on `step3vl {command}` were not all "
                              f"added: {type(e).__name__}: {e}", PluginWarning, stacklevel=2)

    def setup_server(self, server: Any, args: argparse.Namespace) -> None:
        for ext in self.server_extensions:
            ext.setup(server, args)

    def rl_batches(self, args: argparse.Namespace, prompts: list) -> Any:
        """The batches an RL batch source makes from its options, or None when no source's options were given."""
        made = [(src.plugin, b) for src in self.rl_batch_sources if (b := src.make(args, prompts)) is not None]
        if len(made) > 1:
            raise ValueError(f"the options of plugins {', '.join(p for p, _ in made)} each choose the RL batches: "
                             f"give one plugin's options")
        return made[0][1] if made else None

    def summary(self) -> str:
        """One line for `step3vl --help`: the plugins loaded, with their commands, and those left out."""
        parts = []
        for name in self.plugins:
            cmds = [c.name for c in self.commands.values() if c.plugin == name]
            opts = [c for c, hooks in (("serve", self.server_extensions), ("rl", self.rl_batch_sources))
                    if any(h.plugin == name for h in hooks)]
            what = ([f"commands {', '.join(cmds)}"] if cmds else []) + (
                [f"options on {', '.join(opts)}"] if opts else [])
            parts.append(f"{name} ({'; '.join(what)})" if what else name)
        line = f"plugins: {', '.join(parts) if parts else 'none'}"
        left = [f"{n} (disabled by {PLUGINS_ENV})" for n in self.disabled] + [f"{n} (failed)" for n in self.failed]
        return line + (f"; not loaded: {', '.join(left)}" if left else "")


def enabled_names(env: dict[str, str] | None = None) -> set[str] | None:
    """The plugin names STEP3VL_PLUGINS allows: None when unset (all), an empty set when empty (none)."""
    value = (os.environ if env is None else env).get(PLUGINS_ENV)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def installed_plugins() -> list[EntryPoint]:
    """The entry points of group `step3vl.plugins`, sorted by name (one per name: the first found)."""
    seen: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        seen.setdefault(ep.name, ep)
    return [seen[n] for n in sorted(seen)]


def load_plugins(registry: PluginRegistry | None = None, names: set[str] | None = None) -> PluginRegistry:
    """Loads the installed plugins into `registry` (default: a new one), sorted by name, those of `names` only
    (default: STEP3VL_PLUGINS; None: all). A plugin that fails to import or to register warns and is left out."""
    registry = PluginRegistry() if registry is None else registry
    allowed = enabled_names() if names is None else names
    installed = installed_plugins()
    if allowed is not None:
        missing = sorted(allowed - {ep.name for ep in installed})
        if missing:
            warnings.warn(f"{PLUGINS_ENV} names {', '.join(missing)}, not installed (installed: "
                          f"{', '.join(ep.name for ep in installed) or 'none'})", PluginWarning, stacklevel=2)
    for ep in installed:
        if allowed is not None and ep.name not in allowed:
            registry.disabled.append(ep.name)
            continue
        try:
            fn = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin is left out, never the CLI
            registry._fail(ep.name, f"loading {ep.value} raised {type(e).__name__}: {e}")
            continue
        registry.register(ep.name, fn)
    return registry


def plugin_offering(command: str, registry: PluginRegistry) -> str | None:
    """The installed plugin, not loaded into `registry`, that would add CLI command `command` (for the error a
    user gets when it is disabled); None when none does. Tries the plugins only on this error path."""
    for ep in installed_plugins():
        if ep.name in registry.plugins or ep.name in registry.failed:
            continue
        probe = PluginRegistry()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                added = probe.register(ep.name, ep.load())
            except Exception:  # noqa: BLE001
                continue
        if added and command in probe.commands:
            return ep.name
    return None
