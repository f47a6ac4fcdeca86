"""Install `coredi_fast` (the system) and `coredi_kernels` (the standalone fused-ops library in `kernels/`).

The ops library is shipped under the import name `coredi_kernels`, not `kernels`: PyPI's `kernels` package
(huggingface/kernels) already owns that top-level name.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["coredi_fast", "coredi_fast.*"])
kernel_packages = ["coredi_kernels"] + [
    "coredi_kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="coredi_fast",
    version="0.1.0",
    description="Fast, faithful CoReDi / ReDi: diffusion transformers trained jointly on latents and learned DINOv2 features",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages + kernel_packages,
    package_dir={"coredi_kernels": "kernels"},
    package_data={"coredi_fast": ["assets/*"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "tqdm",
        "pyyaml",
        "matplotlib",
        "scikit-learn",  # the embedded demo data (digits) ships inside its wheel
    ],
    extras_require={
        # triton comes with CUDA builds of torch; listed for CPU-only torch builds where it is absent.
        "triton": ["triton"],
        "encoders": ["timm>=1.0", "diffusers>=0.30", "safetensors"],
        "deepspeed": ["deepspeed>=0.15"],
        "dali": ["nvidia-dali-cuda130"],
        "eval": ["scipy", "torchmetrics"],
        "dev": [
            "pytest",
            "pytest-benchmark",
            "timm>=1.0",
            "diffusers>=0.30",
            "safetensors",
            "scipy",
            "tensorboard",
        ],
    },
    py_modules=[],
)
