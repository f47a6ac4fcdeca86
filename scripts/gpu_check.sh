#!/usr/bin/env bash
# The GPU check, one command (< 540 s on one H100/H200, install included): see scripts/gpu_check.py for the stages,
# the time budget and what comes back ($OUT/results.md, summary.txt, gpu_check_logs.tar.gz; the headline tables and
# the stage summary printed last; exit status 1 when a stage failed or was cut off).
#
#     bash scripts/gpu_check.sh                          # everything, in order of value
#     bash scripts/gpu_check.sh --stages train_step      # a rerun of one stage (env and install always run)
#     bash scripts/gpu_check.sh --cpu-smoke              # the same stages with tiny shapes on a CPU
exec python3 "$(dirname "$0")/gpu_check.py" "$@"
