"""The arrows that must never exist (docs/ARCHITECTURE.md), checked statically on every module with `ast`:

- step3vl → pacore (PaCoRe sits on the engine; the CLI gets it through the plugin interface, step3vl/plugins.py);
- step3vl/model → step3vl/engine (the model knows nothing about scheduling or paging);
- kernels (imported as step3vl_kernels) → step3vl or pacore (kernels are leaves: tensors in, tensors out);
- anything → bench or tests;
- the package code → step3vl_native anywhere but step3vl_kernels.native (the one entry into the native module);
- anything → the bare names `pacore` and `kernels` (other distributions own them: pacore/ is imported as
  step3vl_pacore, kernels/ as step3vl_kernels).

Every import counts: module level or inside a function, relative ones resolved, and `importlib.import_module(...)`
/ `__import__(...)` with a string literal.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder (setup.py's FOLDERS: pacore/ is installed as step3vl_pacore, kernels/ as step3vl_kernels)
PACKAGES = {"step3vl": "step3vl", "step3vl_pacore": "pacore", "step3vl_kernels": "kernels"}
NATIVE_GATE = "step3vl_kernels.native"
SCRIPT_DIRS = ("bench", "tests")  # not packages, but their imports count too (nothing may import them)

# (importing module prefix, imported module prefix, the arrow's name)
FORBIDDEN = [
    ("step3vl", "step3vl_pacore", "step3vl → pacore"),
    ("step3vl.model", "step3vl.engine", "step3vl/model → step3vl/engine"),
    ("step3vl_kernels", "step3vl", "kernels → step3vl"),
    ("step3vl_kernels", "step3vl_pacore", "kernels → pacore"),
    ("", "bench", "→ bench"),
    ("", "tests", "→ tests"),
    ("step3vl", "step3vl_native", f"→ step3vl_native outside {NATIVE_GATE}"),
    ("step3vl_pacore", "step3vl_native", f"→ step3vl_native outside {NATIVE_GATE}"),
    ("step3vl_kernels", "step3vl_native", f"→ step3vl_native outside {NATIVE_GATE}"),
    ("", "pacore", "→ bare pacore (import step3vl_pacore)"),
    ("", "kernels", "→ bare kernels (import step3vl_kernels)"),
]
ALLOWED = {(NATIVE_GATE, "step3vl_native")}


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def module_name(root: Path, path: Path, packages: dict[str, str]) -> tuple[str, bool] | None:
    """(dotted name, is a package's __init__) of a file under one of `packages`' folders, else None."""
    rel = path.relative_to(root)
    for name, folder in packages.items():
        if rel.parts[0] == folder:
            parts = [name, *rel.parts[1:-1]]
            if rel.name != "__init__.py":
                parts.append(rel.stem)
            return ".".join(parts), rel.name == "__init__.py"
    return None


def _resolve(module: str | None, level: int, current: str, is_package: bool) -> str | None:
    if level == 0:
        return module
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level - 1 > len(base) - 1:
        return None  # beyond the top package: Python refuses it anyway
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def imports_of(source: str, current: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import in `source`; `from a import b` gives both a and a.b (b may be a
    submodule)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, current, is_package)
            if base:
                found.append((node.lineno, base))
                found += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            target = _literal(node.args[0])
            if fname in ("import_module", "__import__") and target:
                level = len(target) - len(target.lstrip("."))
                package = next((_literal(k.value) for k in node.keywords if k.arg == "package"), None)
                if level and package:
                    target = _resolve(target[level:] or None, level, package, True)
                if target and not target.startswith("."):
                    found.append((node.lineno, target))
    return found


def violations(root: Path, packages: dict[str, str] = PACKAGES,
               script_dirs: tuple[str, ...] = SCRIPT_DIRS) -> list[str]:
    out = []
    for folder in [*packages.values(), *script_dirs]:
        for path in sorted((root / folder).rglob("*.py")):
            if any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(root).parts):
                continue
            named = module_name(root, path, packages)
            # a script in bench/ or tests/ is "bench.x" / "tests.x": importing its own folder is no arrow
            current, is_package = named if named else (".".join(path.relative_to(root).with_suffix("").parts), False)
            for line, target in imports_of(path.read_text(encoding="utf-8"), current, is_package):
                for src, dst, arrow in FORBIDDEN:
                    if (_within(current, src) and _within(target, dst) and not _within(current, dst)
                            and (current, dst) not in ALLOWED):
                        out.append(f"{path.relative_to(root)}:{line}: {arrow} (imports {target})")
    return out


def test_no_forbidden_arrow_in_the_repository():
    found = violations(ROOT)
    assert not found, "forbidden imports (docs/ARCHITECTURE.md):\n" + "\n".join(found)


def test_the_folders_have_the_import_names_the_build_gives_them():
    # the rules above only hold if each folder's import name is the one the build installs it under
    tree = ast.parse((ROOT / "setup.py").read_text())
    folders = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "FOLDERS" for t in n.targets))
    assert folders == {name: folder for name, folder in PACKAGES.items() if name != folder}


def test_the_checker_finds_every_kind_of_import(tmp_path):
    files = {
        "step3vl/__init__.py": "",
        "step3vl/cli.py": "import os\n\ndef f():\n    from step3vl_pacore.cli import register\n",
        "step3vl/serve.py": "import importlib\nx = importlib.import_module('step3vl_pacore.serve')\n",
        "step3vl/model/__init__.py": "from .. import engine\n",
        "step3vl/model/decoder.py": "from ..engine.llm import LLM\nimport step3vl.config\n",
        "step3vl/engine/__init__.py": "import step3vl_pacore\n",
        "step3vl/engine/llm.py": "__import__('bench.serving')\n",
        "pacore/__init__.py": "from step3vl.engine import LLM\nimport tests.conftest\n",
        "kernels/__init__.py": "from . import ops\nimport step3vl_native\n",
        "kernels/native.py": "import step3vl_native\n",
        "step3vl/engine/cpu.py": "from step3vl_native import BlockManager\nfrom step3vl_kernels.native import x\n",
        "kernels/ops.py": "from step3vl.engine import x\nfrom pacore import y\nimport step3vl_pacore.z\n",
        "bench/run.py": "import step3vl_pacore\nfrom tests.x import y\n",
        "tests/test_x.py": "import step3vl\nimport tests.helpers\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    got = violations(tmp_path)
    assert sorted(got) == sorted([
        "step3vl/cli.py:4: step3vl → pacore (imports step3vl_pacore.cli)",
        "step3vl/cli.py:4: step3vl → pacore (imports step3vl_pacore.cli.register)",
        "step3vl/serve.py:2: step3vl → pacore (imports step3vl_pacore.serve)",
        "step3vl/model/__init__.py:1: step3vl/model → step3vl/engine (imports step3vl.engine)",
        "step3vl/model/decoder.py:1: step3vl/model → step3vl/engine (imports step3vl.engine.llm)",
        "step3vl/model/decoder.py:1: step3vl/model → step3vl/engine (imports step3vl.engine.llm.LLM)",
        "step3vl/engine/__init__.py:1: step3vl → pacore (imports step3vl_pacore)",
        "step3vl/engine/llm.py:1: → bench (imports bench.serving)",
        "step3vl/engine/cpu.py:1: → step3vl_native outside step3vl_kernels.native (imports step3vl_native)",
        "step3vl/engine/cpu.py:1: → step3vl_native outside step3vl_kernels.native (imports step3vl_native.BlockManager)",
        "pacore/__init__.py:2: → tests (imports tests.conftest)",
        "kernels/__init__.py:2: → step3vl_native outside step3vl_kernels.native (imports step3vl_native)",
        "kernels/ops.py:1: kernels → step3vl (imports step3vl.engine)",
        "kernels/ops.py:1: kernels → step3vl (imports step3vl.engine.x)",
        "kernels/ops.py:2: → bare pacore (import step3vl_pacore) (imports pacore)",
        "kernels/ops.py:2: → bare pacore (import step3vl_pacore) (imports pacore.y)",
        "kernels/ops.py:3: kernels → pacore (imports step3vl_pacore.z)",
        "bench/run.py:2: → tests (imports tests.x)",
        "bench/run.py:2: → tests (imports tests.x.y)",
    ])
