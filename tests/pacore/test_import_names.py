"""step3vl's PaCoRe is imported as `step3vl_pacore`: another distribution's top-level `pacore` (the official
PaCoRe package has one) installed beside it breaks neither side.

Locally a stand-in `pacore` goes first on PYTHONPATH; CI (.ci/run) also installs one as a distribution
(.ci/stub-pacore), so there the whole suite runs with the clash present.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

FOREIGN = "WHO = 'the other pacore'\n"


def _python(code: str, cwd: Path, pythonpath: Path | None = None, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    # cwd outside the repository: from its root, the pacore/ folder itself would be importable as `pacore`
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture
def foreign_pacore(tmp_path) -> Path:
    site = tmp_path / "site"
    (site / "pacore").mkdir(parents=True)
    (site / "pacore" / "__init__.py").write_text(FOREIGN)
    return site


def test_both_packages_import_side_by_side(foreign_pacore, tmp_path):
    code = ("import pacore, step3vl_pacore\n"
            "from step3vl_pacore import PaCoRe, PaCoReConfig\n"
            "from step3vl.plugins import load_plugins\n"
            "assert pacore.WHO == 'the other pacore', pacore.__file__\n"
            "assert PaCoRe.__module__ == 'step3vl_pacore.runner'\n"
            "registry = load_plugins()\n"
            "assert {'pacore', 'demo', 'recipe', 'eval'} <= set(registry.commands), registry.summary()\n"
            "print('ok')")
    out = _python(code, tmp_path, foreign_pacore)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_from_the_repository_root_pacore_is_still_the_other_package(foreign_pacore):
    # there the pacore/ folder is on sys.path as the top-level `pacore`: it hands the import on
    root = Path(__file__).resolve().parents[2]
    code = "import pacore, step3vl_pacore\nassert pacore.WHO == 'the other pacore'\nprint(pacore.__file__)"
    out = _python(code, root, foreign_pacore)
    assert out.returncode == 0 and out.stdout.strip() == str(foreign_pacore / "pacore" / "__init__.py"), out.stderr
    out = _python("import pacore\nprint(pacore.__file__)", root)
    if _installed("pacore"):  # another distribution's pacore (CI's stand-in): that one
        assert out.returncode == 0 and not out.stdout.strip().startswith(str(root / "pacore")), out.stderr
    else:  # none installed: there is none, and the error says why
        assert out.returncode != 0 and "the repository's pacore/ folder is step3vl_pacore's source" in out.stderr


def test_step3vl_pacore_runs_with_a_foreign_pacore_first_on_the_path(foreign_pacore, tiny_dir, tmp_path):
    code = "import sys\nfrom step3vl.cli import main\nsys.exit(main(sys.argv[1:]))"
    out = _python(code, tmp_path, foreign_pacore, "pacore", "--model", str(tiny_dir), "How many shapes?",
                  "--rounds", "2", "--max-tokens", "6", "--message-max-tokens", "4", "--unclosed", "keep", "--seed", "0",
                  "--kv-cache-memory", "8MiB", "--threads", "1", "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokens generated:" in out.stdout


@pytest.mark.skipif(os.environ.get("STEP3VL_EXPECT_FOREIGN_PACORE") != "1",
                    reason="CI only: .ci/run installs the stand-in distribution .ci/stub-pacore and sets this")
def test_the_installed_foreign_distribution_keeps_its_name(tmp_path):
    code = ("import importlib.metadata as md, pacore, step3vl_pacore\n"
            "assert pacore.OFFICIAL_STAND_IN and md.distribution('pacore').version == '0.0.0'\n"
            "assert step3vl_pacore.__name__ == 'step3vl_pacore'\n"
            "print('ok')")
    out = _python(code, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
