"""Test-wide setup.

* No weights or data sets can be downloaded on CI: `HF_HUB_OFFLINE=1` makes hub lookups fail at once.
* Without a GPU, Triton kernels run under the interpreter. `TRITON_INTERPRET` must be set before triton is
  imported (timm and diffusers import it), so it is decided here from `torch.cuda.is_available()`; importing torch
  alone does not import triton.
* Tests marked `gpu` skip when there is no CUDA device.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield
