"""The GPU check's first stage: the card, the driver, the versions, the code under test, as JSON.

    python3 scripts/gpu_check_env.py --json env.json
    python3 scripts/gpu_check_env.py --site .site --packages-only   # after installing into .site

Run from the repository root the way the check runs its stages (so the packages it reports are the ones the stages
import). Prints one line per fact and writes them to --json. With --site, it also checks that `coredi_fast` and
`coredi_kernels` import from this checkout or from that freshly installed copy of it, and that every Python file of
the imported packages equals the checkout's: a stale install (pip keeps an old --target folder) fails here, before
any number is measured. Exit status 1 on such a mismatch, else 0.

The commit comes from git when the checkout has its .git; the GPU machine gets a copy of the working tree that may
not, so a digest of the source files is recorded too: `python3 scripts/gpu_check_env.py --digest` prints the same
digest on any machine, which ties a result to a commit.
"""
import argparse
import datetime
import hashlib
import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the digest covers: the code that can change a number (not docs, not results).
DIGEST_DIRS = ("kernels", "coredi_fast", "benchmarks", "scripts", "tests", "csrc", "configs")
DIGEST_FILES = ("setup.py", "pyproject.toml", "CMakeLists.txt", "ds_zero2.json")
DIGEST_SUFFIXES = (".py", ".cu", ".cpp", ".h", ".yaml", ".json", ".toml", ".txt", ".sh")
# Import name -> the checkout folder it is built from (kernels/ is the coredi-kernels distribution).
PACKAGES = {"coredi_fast": "coredi_fast", "coredi_kernels": "kernels"}


def source_files(root: Path = ROOT) -> list:
    """The files the digest covers, as sorted paths relative to `root`."""
    found = [root / name for name in DIGEST_FILES if (root / name).is_file()]
    for folder in DIGEST_DIRS:
        found += [p for p in (root / folder).rglob("*") if p.is_file() and p.suffix in DIGEST_SUFFIXES
                  and "__pycache__" not in p.parts]
    return sorted(str(p.relative_to(root)) for p in found)


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the relative paths and contents of `source_files` (first 12 hex digits)."""
    h = hashlib.sha256()
    for rel in source_files(root):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_commit(root: Path = ROOT) -> str:
    """The commit and '+dirty' when tracked files differ from it; 'unknown (no .git)' without git metadata."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short=10", "HEAD")
        if head.returncode != 0:
            return "unknown (no .git)"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def nvidia_smi() -> dict:
    """Name, driver, memory, power limit and max SM clock per nvidia-smi; {} without it."""
    fields = ("name", "driver_version", "memory.total", "power.limit", "clocks.max.sm")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return {f"smi {k}": v for k, v in zip(fields, values)}


def torch_facts() -> dict:
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.version.cuda or "none",
             "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
             "gpu": "none"}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                     gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    return facts


def check_packages(site) -> tuple:
    """(facts, problems): where each package imports from, and every Python file that differs from the checkout."""
    facts, problems = {}, []
    allowed = [ROOT.resolve()] + ([Path(site).resolve()] if site else [])
    for name, folder in PACKAGES.items():
        module = importlib.import_module(name)
        package_dir = Path(module.__file__).resolve().parent
        facts[f"{name} from"] = str(package_dir)
        if not any(package_dir.is_relative_to(a) for a in allowed):
            problems.append(f"{name} imports from {package_dir}, not from this checkout or {site}")
            continue
        source_dir = ROOT / folder
        for src in source_dir.rglob("*.py"):
            if "__pycache__" in src.parts or src == source_dir / "setup.py":  # kernels/setup.py builds it, not in it
                continue
            installed = package_dir / src.relative_to(source_dir)
            if not installed.is_file() or installed.read_bytes() != src.read_bytes():
                problems.append(f"{installed} differs from the checkout's {src.relative_to(ROOT)} (a stale install?)")
    return facts, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the facts here")
    parser.add_argument("--site", help="the folder the check installed the package into (checks the imports)")
    parser.add_argument("--packages-only", action="store_true", help="with --site: only the import check")
    parser.add_argument("--digest", action="store_true", help="print the source digest and exit")
    args = parser.parse_args(argv)
    if args.digest:
        print(source_digest())
        return 0
    if args.packages_only and args.site is None:
        parser.error("--packages-only needs --site")
    facts = {}
    if not args.packages_only:
        facts.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     host=platform.node(), python=platform.python_version(), commit=git_commit())
        facts["source digest"] = source_digest()
        facts.update(nvidia_smi())
        facts.update(torch_facts())
    problems = []
    if args.site is not None:
        package_facts, problems = check_packages(args.site)
        facts.update(package_facts)
    facts["install check"] = "; ".join(problems[:5]) if problems else "ok"
    for key, value in facts.items():
        print(f"{key}: {value}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(facts, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
