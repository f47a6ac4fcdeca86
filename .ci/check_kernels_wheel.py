"""Checks a coredi-kernels wheel against the checkout's kernels/ folder (CI, after `pip wheel ./kernels`).

    python .ci/check_kernels_wheel.py build/kernels-dist/coredi_kernels-*.whl

The wheel must hold every Python file of kernels/ as coredi_kernels/... with the same bytes (setup.py, which builds
it, excepted) and nothing else, and its metadata must name coredi-kernels at `__version__` with torch and triton as
the only requirements. Exit status 1 with one line per problem, else 0.
"""
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
PACKAGE = "coredi_kernels"


def expected_files() -> dict:
    """Path in the wheel -> bytes, for every .py file of kernels/ but setup.py."""
    return {f"{PACKAGE}/{p.relative_to(KERNELS).as_posix()}": p.read_bytes() for p in KERNELS.rglob("*.py")
            if "__pycache__" not in p.parts and p != KERNELS / "setup.py"}


def source_version() -> str:
    text = (KERNELS / "__init__.py").read_text(encoding="utf-8")
    found = re.search(r"^__version__ = [\"']([^\"']+)[\"']", text, re.M)
    if not found:
        raise SystemExit(f"no __version__ = '...' in {KERNELS / '__init__.py'}")
    return found.group(1)


def problems(wheel: Path) -> list:
    found = []
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        info = [n for n in names if n.split("/")[0].endswith(".dist-info")]
        contents = {n: zf.read(n) for n in names if n not in info}
        metadata = Parser().parsestr(zf.read(next(n for n in info if n.endswith("/METADATA"))).decode())
    want = expected_files()
    found += [f"missing from the wheel: {n}" for n in sorted(set(want) - set(contents))]
    found += [f"in the wheel but not a kernels/ module: {n}" for n in sorted(set(contents) - set(want))]
    found += [f"differs from kernels/: {n}" for n in sorted(set(want) & set(contents)) if want[n] != contents[n]]
    if metadata["Name"] != "coredi-kernels" or metadata["Version"] != source_version():
        found.append(f"metadata names {metadata['Name']} {metadata['Version']}, not coredi-kernels {source_version()}")
    requires = {re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in metadata.get_all("Requires-Dist") or []}
    if requires != {"torch", "triton"}:
        found.append(f"requires {sorted(requires)}, not exactly torch and triton")
    return found


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    wheel = Path(argv[0])
    if not wheel.is_file():
        print(f"no wheel at {wheel}")
        return 2
    found = problems(wheel)
    for line in found:
        print(f"{wheel.name}: {line}")
    if not found:
        print(f"{wheel.name}: {len(expected_files())} modules, the same bytes as kernels/; requires torch, triton")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
