"""Replacing a checkpoint is atomic: a save killed at any step leaves a loadable checkpoint under the target name
(the old one or the new one, never a mix or nothing), and the next save succeeds.

The kill is simulated by raising at the k-th file-system step of a save (each copy, shard write, fsync, rename,
exchange, delete), for every k until a save runs through; nothing in the save catches it, so the files are left
exactly as a SIGKILL at that point would leave them.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

from step3vl import durable, saver
from step3vl.loader import load_model
from step3vl.saver import save_checkpoint


class Killed(BaseException):
    pass


class KillAt:
    """Counts the save's file-system steps and raises Killed at step `at` (before or after doing it)."""

    def __init__(self, monkeypatch, at: int, after: bool):
        self.at, self.after, self.count = at, after, 0
        for owner, name in ((saver, "copy_checkpoint_files"), (saver, "write_shards"), (durable, "fsync_tree"),
                            (durable, "fsync_dir"), (durable, "_exchange"), (pathlib.Path, "rename"),
                            (durable.shutil, "rmtree"), (saver.torch, "save")):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, fn):
        def step(*args, **kwargs):
            self.count += 1
            mine = self.count  # steps nested inside this one count after it
            if mine == self.at and not self.after:
                raise Killed
            out = fn(*args, **kwargs)
            if mine == self.at and self.after:
                raise Killed
            return out
        return step


def _model(ckpt, shift: float):
    model = load_model(ckpt, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.fill_(shift)
    return model


def _norm(path) -> float:
    return float(load_model(path, dtype=torch.float32).model.norm.weight[0])


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "move-aside"])
@pytest.mark.parametrize("after", [False, True], ids=["killed-before-a-step", "killed-after-a-step"])
def test_a_save_killed_at_any_step_leaves_a_loadable_checkpoint(tiny_ckpt, tmp_path, monkeypatch, exchange, after):
    if not exchange:
        monkeypatch.setattr(durable, "_exchange", lambda a, b: False)
    old, new = _model(tiny_ckpt, 2.0), _model(tiny_ckpt, 3.0)
    k, outcomes = 0, set()
    while True:
        k += 1
        out = tmp_path / f"run{k}" / "ckpt"
        save_checkpoint(old, out, tiny_ckpt, dtype=None)
        with monkeypatch.context() as m:
            kill = KillAt(m, k, after)
            try:
                save_checkpoint(new, out, tiny_ckpt, dtype=None)
                finished = True
            except Killed:
                finished = False
        if not exchange and not out.exists():
            # Without the exchange there is one gap (between moving the old one aside and renaming the new one
            # in): nothing is lost, the old checkpoint is whole under <out>.old.
            assert _norm(out.with_name("ckpt.old")) == 2.0
            got = 2.0
        else:
            got = _norm(out)  # loadable after the kill, whatever the step
        assert got in (2.0, 3.0)
        outcomes.add(got)
        if finished:
            assert got == 3.0 and kill.count < k
            break
        save_checkpoint(new, out, tiny_ckpt, dtype=None)  # the next save cleans up and succeeds
        assert _norm(out) == 3.0
        assert not out.with_name("ckpt.tmp").exists() and not out.with_name("ckpt.old").exists()
        shutil.rmtree(out.parent)
    assert k > 5 and outcomes == {2.0, 3.0}  # the kills landed before and after the swap
