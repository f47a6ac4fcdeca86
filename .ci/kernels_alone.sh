#!/usr/bin/env bash
# coredi-kernels on its own, as another DiT codebase takes it: its wheel built from kernels/, installed into a fresh
# venv holding torch alone, imported from outside the checkout, then the kernel tests (tests/test_kernel_*.py: they
# import nothing from coredi_fast, tests/test_kernels_distribution.py checks it) run there from a copy, where
# coredi_fast cannot be imported. Part of .ci/run (~5 min on 2 cores); runs alone too: bash .ci/kernels_alone.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
KERNELS_VENV=${KERNELS_VENV:-.venv-kernels}
DIST=build/kernels-dist
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
unset PYTHONPATH   # nothing of the checkout may leak in
started=$SECONDS

rm -rf "$KERNELS_VENV" "$DIST"
"$PY" -m venv "$KERNELS_VENV"
KPY="$ROOT/$KERNELS_VENV/bin/python"
"$KPY" -m pip install -q -c .ci/constraints.txt "torch==2.14.1"
"$KPY" -m pip wheel -q --no-deps ./kernels -w "$DIST"
WHEEL=$(ls "$DIST"/coredi_kernels-*.whl)
"$PY" .ci/check_kernels_wheel.py "$WHEEL"      # every kernels/ module, the same bytes, nothing else
"$KPY" -m pip install -q -c .ci/constraints.txt "$WHEEL"
"$KPY" -m pip check

# The tests and their helpers, copied out of the checkout.
WORK=$(mktemp -d)
# The venv (~5.5 GB of torch) and the copied tests are this check's alone: nothing of them outlives it.
trap 'rm -rf "$WORK" "$ROOT/$KERNELS_VENV"' EXIT
for f in tests/*.py; do
    case $(basename "$f") in test_kernel_*|conftest.py) cp "$f" "$WORK"/ ;; test_*) ;; *) cp "$f" "$WORK"/ ;; esac
done
cd "$WORK"
# With only what the wheel needs installed: it imports, and coredi_fast is nowhere to be found.
"$KPY" - <<'EOF'
import importlib.util

import coredi_kernels
from coredi_kernels import joint_embedding, layernorm_modulate, patch_dit, patch_jit, qk_norm_rope  # noqa: F401

assert importlib.util.find_spec("coredi_fast") is None, "coredi_fast is importable in the kernels-only venv"
assert "site-packages" in coredi_kernels.__file__, f"coredi_kernels imported from {coredi_kernels.__file__}"
print(f"coredi_kernels {coredi_kernels.__version__} from {coredi_kernels.__file__}; coredi_fast not importable")
EOF
"$KPY" -m pip install -q -c "$ROOT/.ci/constraints.txt" pytest numpy   # the tests' own needs
"$KPY" -m pytest -q -p no:cacheprovider -c "$ROOT/pyproject.toml" --rootdir "$WORK" test_kernel_*.py
echo "coredi-kernels alone: wheel, install and kernel tests in $((SECONDS - started)) s"
