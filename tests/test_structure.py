"""Structure of the package (issue 10): private names stay private, the core stays lean.

* No module of ``src/kexue`` imports a ``_private`` name from another kexue module, neither
  ``from kexue.x import _y`` / ``from .x import _y`` nor ``module._y`` on an imported kexue
  module (a helper used in two modules is public; see ``docs/contributing.md``).
* ``import kexue`` and the core capabilities (``ops``, ``losses``, ``distributions``) import no
  optional dependency, and still import when every optional dependency is missing; a
  capability that needs an extra says which one (``MissingExtraError``) instead of crashing.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "kexue"

#: third-party packages of the extras (pyproject.toml), by import name
OPTIONAL = (
    "accelerate",
    "diffusers",
    "faiss",
    "matplotlib",
    "mlxtend",
    "peft",
    "PIL",
    "safetensors",
    "scipy",
    "sklearn",
    "torchmetrics",
    "transformers",
)
CORE_CAPABILITIES = ("kexue.ops", "kexue.losses", "kexue.distributions")


# --------------------------------------------------------------------------------------------
# (a) no _private name crosses a module boundary


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` (``kexue.x.y``) is a module or package of src/kexue."""
    rel = Path(*dotted.split("."))
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(node: ast.ImportFrom, module: str, package: bool) -> str | None:
    """The absolute module of ``from ... import``, or ``None`` outside kexue."""
    if node.level == 0:
        target = node.module or ""
    else:
        base = module.split(".")
        if not package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    return target if target == "kexue" or target.startswith("kexue.") else None


def private_imports(path: Path) -> list[str]:
    """``file:line: what`` for each ``_private`` name ``path`` takes from another kexue module."""
    module, package = _module_name(path), _is_package(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    modules: dict[str, str] = {}  # local name -> kexue module it is bound to
    where = f"{path.relative_to(SRC.parent)}"

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, package)
            if target is None:
                continue
            for alias in node.names:
                if _is_module(f"{target}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{target}.{alias.name}"
                if _private(alias.name) and target != module:
                    found.append(f"{where}:{node.lineno}: from {target} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "kexue" or alias.name.startswith("kexue."):
                    if _private(alias.name.rsplit(".", 1)[-1]):
                        found.append(f"{where}:{node.lineno}: import {alias.name}")
                    if alias.asname:
                        modules[alias.asname] = alias.name
                    else:
                        modules["kexue"] = "kexue"

    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        chain: list[str] = []
        value: ast.expr = node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in modules:
            continue
        owner = ".".join([modules[value.id], *reversed(chain)])
        if _is_module(owner) and owner != module:
            found.append(f"{where}:{node.lineno}: {owner}.{node.attr}")
    return found


def test_the_checker_sees_private_imports(tmp_path, monkeypatch):
    # the check itself, on planted code (a checker that finds nothing proves nothing)
    fake = tmp_path / "kexue"
    (fake / "sub").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "helpers.py").write_text("def _h(): ...\n")
    (fake / "sub" / "__init__.py").write_text("")
    (fake / "sub" / "a.py").write_text("def _x(): ...\n")
    planted = fake / "sub" / "b.py"
    planted.write_text(
        textwrap.dedent(
            """
            from __future__ import annotations
            import kexue.helpers
            import kexue.helpers as hp
            from kexue import helpers
            from kexue.helpers import _h
            from .a import _x, public
            from . import a
            from .. import helpers as h2

            def _own(): ...

            kexue.helpers._h()
            hp._h(); helpers._h(); a._x(); h2._h()
            _own(); a.public(); helpers.__name__
            """
        )
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    found = private_imports(planted)
    assert len(found) == 7, found
    assert not private_imports(fake / "sub" / "a.py")


def test_no_private_name_is_imported_across_modules():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in private_imports(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


# --------------------------------------------------------------------------------------------
# (b) the core imports no optional dependency


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_core_imports_no_optional_dependency():
    # one interpreter, the modules in order: each line lists what that import added
    proc = _run(
        f"""
        import importlib, json, sys
        for module in {["kexue", *CORE_CAPABILITIES]!r}:
            importlib.import_module(module)
            print(json.dumps([module, sorted(m for m in {OPTIONAL!r} if m in sys.modules)]))
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = dict(json.loads(line) for line in proc.stdout.splitlines())
    assert loaded == {m: [] for m in ["kexue", *CORE_CAPABILITIES]}, loaded


_BLOCK_EXTRAS = f"""
import importlib.abc, sys

class _Missing(importlib.abc.MetaPathFinder):
    # every optional dependency behaves as if it were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Missing())
"""


def test_core_imports_without_the_extras():
    modules = ["kexue", *CORE_CAPABILITIES]
    proc = _run(_BLOCK_EXTRAS + f"for m in {modules!r}:\n    __import__(m)\nprint('ok')\n")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize(("module", "extra"), [("kexue.lst", "lst")])
def test_a_capability_without_its_extra_names_it(module, extra):
    proc = _run(
        _BLOCK_EXTRAS
        + textwrap.dedent(
            f"""
            from kexue.exceptions import MissingExtraError
            try:
                import {module}
            except MissingExtraError as e:
                print("missing:", e)
            else:
                print("imported")
            """
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("missing:") and f"kexue[{extra}]" in proc.stdout, proc.stdout


def test_test_module_names_are_unique():
    # tests/ has no __init__.py files: pytest's default import mode keys a test module by its
    # file name, so two test_x.py in different folders break collection from a clean clone
    tests = Path(__file__).resolve().parent
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted(tests.rglob("*.py")):
        if path.name == "conftest.py" or "__pycache__" in path.parts:
            continue
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(tests)} and {path.relative_to(tests)}")
        seen.setdefault(path.name, path)
    assert not clashes, clashes
