#!/usr/bin/env bash
# The GPU check of issues 4, 6 and 7, one command, < 10 minutes on one H100/H200:
#
#     bash scripts/gpu_check.sh
#
# For the project's GPU machines (torch 2.11, triton 3.6, timm, pytest, pytest-benchmark; no package registry):
# installs the package into .site (an editable install fails there), builds the native AdamW+EMA extension for the
# card, runs every GPU-marked test of the kernels and the optimizer, then the real-shape benchmarks: fused ops vs
# eager vs torch.compile (GB/s), attention backends, SiT-XL/2 blocks, the optimizer, and the SiT-XL/2 CoReDi training
# step (eager / per-block compile / ours, img/s, MFU, peak memory), and JiT's fused qk-norm + RoPE. Logs and JSON go
# to $OUT (or gpu_results/); the tables are printed last. Each stage has its own time limit, and all share one budget,
# so one slow stage cannot eat the rest and the whole check ends in time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1

# One budget for the whole check (default 560 s, so it ends inside 10 minutes with the tables printed): a stage gets
# its own limit or what is left of the budget, whichever is less; stages are ordered by what matters most.
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-560}))
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        echo "$name skipped: the ${GPU_CHECK_BUDGET:-560} s budget is spent" | tee -a "$OUT/summary.txt"
        return
    fi
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
    tail -n 3 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"

stage install 90 python3 -m pip install -q --no-deps --no-build-isolation --no-index --target .site .
export PYTHONPATH=$PWD/.site
ARCH=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
stage native_build 150 python3 -m coredi_fast.optim.native build --cuda-arch "$ARCH" --jobs 16
stage gpu_tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_kernel_layernorm_modulate.py tests/test_kernel_rmsnorm_modulate.py tests/test_kernel_qk_norm_rope.py \
    tests/test_kernel_joint_embedding.py tests/test_kernel_attention.py tests/test_patch_dit.py tests/test_adamw_ema.py \
    tests/test_encoder_cuda_graph.py
# The SiT-XL/2 training step first among the benchmarks: it is the headline number (eager / per-block compile / ours).
stage bench_blocks_and_step 240 env BENCH_TRAIN_MODELS=SiT-XL/2 python3 -m pytest -q -s -p no:cacheprovider \
    --bench-profile=real --benchmark-json="$OUT/bench_step.json" benchmarks/bench_dit_block.py benchmarks/bench_train_step.py
stage bench_ops 150 python3 -m pytest -q -p no:cacheprovider --bench-profile=real --benchmark-json="$OUT/bench_ops.json" \
    benchmarks/bench_layernorm_modulate.py benchmarks/bench_rmsnorm_modulate.py benchmarks/bench_joint_embedding.py \
    benchmarks/bench_attention.py benchmarks/bench_optimizer.py
# JiT's fused qk-norm + RoPE (JiT-B/16 and JiT-H/16 heads, batch 128): a session of its own, so its table (with the
# `model` column) prints separately. Most of its time is torch.compile of the eager provider (2 shapes x 2 modes).
stage bench_qk_norm_rope 120 python3 -m pytest -q -p no:cacheprovider --bench-profile=real \
    --benchmark-json="$OUT/bench_qk_norm_rope.json" benchmarks/bench_qk_norm_rope.py

echo; echo "=== results ($(cat "$OUT/gpu.txt" | head -1))"
cat "$OUT/summary.txt"
grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 2
for f in bench_blocks_and_step bench_ops bench_qk_norm_rope; do echo "--- $f"; sed -n '/coredi benchmark/,$p' "$OUT/$f.log" | head -n 120; done
