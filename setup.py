"""Install `coredi_fast` (the system). The fused ops are their own distribution, `coredi-kernels` in `kernels/`
(import name `coredi_kernels`), which this one requires.

The ops library is shipped under the import name `coredi_kernels`, not `kernels`: PyPI's `kernels` package
(huggingface/kernels) already owns that top-level name.

Where `coredi-kernels` comes from. It is on no package index, so by default the requirement is this checkout's
`kernels/` folder, `coredi-kernels @ file:///<checkout>/kernels`: `pip install -e ".[dev]"` and `pip install .`
build it from there and install it as a copy (pip installs a dependency non-editable, and rebuilds one from a local
folder at every install). With COREDI_KERNELS_BY_VERSION=1 the requirement is `coredi-kernels==<its __version__>`
instead, to be met by a coredi-kernels given in the same command or found on an index:
    COREDI_KERNELS_BY_VERSION=1 pip install -e ./kernels -e ".[dev]"   # both editable: edits to kernels/ are live
    COREDI_KERNELS_BY_VERSION=1 pip wheel --no-deps . ./kernels         # wheels for an index: no path inside
(pip refuses `-e ./kernels` beside the default requirement: the same project from two sources.)
"""
import ast
import atexit
import os
import shutil
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
KERNELS = HERE / "kernels"


def kernels_version() -> str:
    """`__version__` of kernels/__init__.py (the one place the ops' version is written)."""
    if not (KERNELS / "pyproject.toml").is_file():
        raise RuntimeError(f"{KERNELS} (the coredi-kernels distribution) is missing: build coredi_fast from a "
                           "checkout of the repository, not from a copy of setup.py or an sdist")
    tree = ast.parse((KERNELS / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"no __version__ = '...' in {KERNELS / '__init__.py'}")


def kernels_requirement() -> str:
    """The PEP 508 requirement on coredi-kernels: this checkout's kernels/ folder, or its version when
    COREDI_KERNELS_BY_VERSION=1."""
    version = kernels_version()
    by_version = os.environ.get("COREDI_KERNELS_BY_VERSION", "0")
    if by_version not in ("0", "1"):
        raise ValueError(f"COREDI_KERNELS_BY_VERSION must be 0 or 1, got {by_version!r}")
    if by_version == "1":
        return f"coredi-kernels=={version}"
    return f"coredi-kernels @ {KERNELS.as_uri()}"


# Each build starts from an empty folder: setuptools only ever adds to build/lib, so what an earlier build left
# there (a deleted module, or coredi_kernels, which this distribution shipped before it became its own) would
# ship again.
scratch = tempfile.mkdtemp(prefix="coredi-fast-build-")
atexit.register(shutil.rmtree, scratch, True)

setup(
    name="coredi_fast",
    version="0.1.0",
    description=("Fast, faithful CoReDi / ReDi: diffusion transformers trained jointly on latents and learned DINOv2 "
                 "features"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["coredi_fast", "coredi_fast.*"]),
    package_data={"coredi_fast": ["assets/*"]},
    install_requires=[
        kernels_requirement(),
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "tqdm",
        "pyyaml",
        "matplotlib",
        "scikit-learn",  # the embedded demo data (digits) ships inside its wheel
        "scipy",  # imported by the evaluation (FID's sqrtm) and the study (its judge and statistics)
    ],
    extras_require={
        # triton comes with CUDA builds of torch; listed for CPU-only torch builds where it is absent.
        "triton": ["triton"],
        "encoders": ["timm>=1.0", "diffusers>=0.30", "safetensors"],
        "deepspeed": ["deepspeed>=0.15"],
        "dali": ["nvidia-dali-cuda130"],
        "dev": [
            "pytest",
            "pytest-benchmark",
            "timm>=1.0",
            "diffusers>=0.30",
            "safetensors",
            "tensorboard",
        ],
    },
    py_modules=[],
    options={"build": {"build_base": scratch}},
)
