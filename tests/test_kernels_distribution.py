"""coredi-kernels as its own distribution (kernels/pyproject.toml), and how coredi_fast requires it (setup.py).

* kernels/ never imports coredi_fast, and the kernel tests (tests/test_kernel_*.py and the helper modules they
  import) import only torch, triton, pytest, numpy, coredi_kernels and the standard library: CI runs them in a venv
  holding the coredi-kernels wheel and torch alone (.ci/run), so a coredi_fast import would break them there.
* kernels/pyproject.toml: name, dependencies (torch and triton), the version read from `coredi_kernels.__version__`,
  a CHANGELOG entry for that version.
* setup.py: coredi_fast no longer ships coredi_kernels; it requires this checkout's kernels/ folder, or the same
  version with COREDI_KERNELS_BY_VERSION=1; scipy (imported by the evaluation and the study) is a base dependency.
* The coredi_kernels this suite imports is this checkout's kernels/ (editable) or an identical copy: a copy left
  from an older checkout would test old code.
"""
import ast
import re
import runpy
import sys
from pathlib import Path

import pytest
import setuptools

import coredi_kernels

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
TESTS = ROOT / "tests"
# What the kernels-only venv of .ci/run holds besides the standard library (numpy and pytest: for the tests only).
KERNEL_TEST_IMPORTS = {"torch", "triton", "functorch", "pytest", "numpy", "coredi_kernels"}


def imported_modules(path: Path) -> set:
    """Absolute module names imported by a file: `import a.b`, `from a.b import c`, importlib.import_module("a.b")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def kernel_test_files() -> list:
    """tests/test_kernel_*.py, conftest.py, and the tests/ helper modules they import (transitively)."""
    todo = sorted(TESTS.glob("test_kernel_*.py")) + [TESTS / "conftest.py"]
    seen = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            helper = TESTS / f"{name.split('.')[0]}.py"
            if helper.is_file():
                todo.append(helper)
    return sorted(seen)


def test_kernels_never_import_coredi_fast():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) > 20 and KERNELS / "patch.py" in files
    offenders = {}
    for path in files:
        found = sorted(m for m in imported_modules(path) if m.split(".")[0] == "coredi_fast")
        if found:
            offenders[str(path.relative_to(KERNELS.parent))] = found
    assert offenders == {}


def test_kernel_tests_import_nothing_the_kernels_only_venv_lacks():
    files = kernel_test_files()
    names = {f.name for f in files}
    assert {"test_kernel_attention.py", "test_kernel_joint_embedding.py", "norm_modulate_suite.py"} <= names
    local = {f.stem for f in files}
    unexpected = {}
    for path in files:
        tops = {m.split(".")[0] for m in imported_modules(path)}
        bad = sorted(tops - KERNEL_TEST_IMPORTS - local - set(sys.stdlib_module_names))
        if bad:
            unexpected[path.name] = bad
    assert unexpected == {}, "move tests that need these into a file not named test_kernel_*.py"


def test_the_import_scan_sees_every_form_of_import(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("import coredi_fast.models as m\nfrom coredi_fast import x\nfrom . import y\n"
                      "import importlib\nimportlib.import_module('coredi_fast.data')\n__import__('numpy')\n")
    assert imported_modules(source) == {"coredi_fast.models", "coredi_fast", "importlib", "coredi_fast.data", "numpy"}


def test_kernels_pyproject_declares_the_distribution():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((KERNELS / "pyproject.toml").read_text(encoding="utf-8"))
    project = config["project"]
    assert project["name"] == "coredi-kernels"
    assert project["dynamic"] == ["version"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "coredi_kernels.__version__"}
    assert config["tool"]["setuptools"]["package-dir"] == {"coredi_kernels": "."}
    assert {re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0] for r in project["dependencies"]} == {"torch", "triton"}
    assert (KERNELS / project["readme"]).is_file()


def test_changelog_has_an_entry_for_the_version():
    changelog = (KERNELS / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", changelog, flags=re.M)
    assert headings and headings[0] == coredi_kernels.__version__, "the newest CHANGELOG entry is not __version__"


def setup_arguments(monkeypatch, by_version=None) -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (setup.py run with `setup` replaced)."""
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    if by_version is None:
        monkeypatch.delenv("COREDI_KERNELS_BY_VERSION", raising=False)
    else:
        monkeypatch.setenv("COREDI_KERNELS_BY_VERSION", by_version)
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def test_setup_requires_coredi_kernels_from_this_checkout(monkeypatch):
    args = setup_arguments(monkeypatch)
    assert f"coredi-kernels @ {KERNELS.as_uri()}" in args["install_requires"]
    assert args["packages"] and all(p == "coredi_fast" or p.startswith("coredi_fast.") for p in args["packages"])
    assert "package_dir" not in args
    pinned = setup_arguments(monkeypatch, by_version="1")["install_requires"]
    assert f"coredi-kernels=={coredi_kernels.__version__}" in pinned
    assert not any(r.startswith("coredi-kernels @") for r in pinned)
    with pytest.raises(ValueError, match="COREDI_KERNELS_BY_VERSION"):
        setup_arguments(monkeypatch, by_version="yes")


def test_scipy_is_a_base_dependency_because_the_package_imports_it(monkeypatch):
    importers = [f for f in (ROOT / "coredi_fast").rglob("*.py") if "scipy" in {m.split(".")[0] for m in
                                                                                imported_modules(f)}]
    assert importers, "nothing imports scipy any more: drop it from install_requires"
    assert "scipy" in setup_arguments(monkeypatch)["install_requires"]


def test_imported_coredi_kernels_is_this_checkouts():
    """An editable install imports kernels/ itself; `pip install -e ".[dev]"` installs a copy, made again at each
    install: a copy that differs from kernels/ means the tests below would check old code."""
    installed = Path(coredi_kernels.__file__).resolve().parent
    if installed == KERNELS:
        return
    stale = [str(src.relative_to(KERNELS)) for src in KERNELS.rglob("*.py")
             if "__pycache__" not in src.parts and src != KERNELS / "setup.py"
             and not ((installed / src.relative_to(KERNELS)).is_file()
                      and (installed / src.relative_to(KERNELS)).read_bytes() == src.read_bytes())]  # fmt: skip
    assert not stale, (f"coredi_kernels is imported from {installed}, a copy that differs from this checkout's "
                       f"kernels/ in {stale[:5]}: reinstall (`pip install -e \".[dev]\"`), or make it editable "
                       f"(`COREDI_KERNELS_BY_VERSION=1 pip install -e ./kernels -e \".[dev]\"`)")
