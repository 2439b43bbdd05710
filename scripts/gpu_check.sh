#!/usr/bin/env bash
# The GPU check of issue 10: a ViT-B/32-shaped model (configs/gpu_check_vit_b32.yaml, random init,
# synthetic data, bf16) trained for a fixed number of steps on ONE GPU with each launch config:
# DDP, FSDP2, then DeepSpeed ZeRO-2 and ZeRO-3 when deepspeed is installed. Prints one JSON line per
# launch: samples/s, peak memory (GiB), GFLOPs per sample and MFU (see scripts/gpu_check.py).
# Run:      bash scripts/gpu_check.sh            (about 4 minutes on an H100/H200; <= 8)
#           STEPS=50 BATCH=512 bash scripts/gpu_check.sh
#           SMOKE=1 bash scripts/gpu_check.sh     (no GPU: a tiny model, 2 CPU processes, 2 steps:
#                                                  checks that the script itself runs)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-30}
BATCH=${BATCH:-256}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore
if [[ "${SMOKE:-0}" == 1 ]]; then
    export OMP_NUM_THREADS=1
    launches="multi_gpu_cpu fsdp2_cpu"
    extra=(--config configs/debug_tiny.yaml --steps 2 --warmup 1 --batch 16 --model.text_config.vocab_size=500
           --train.mixed_precision=no)
    nproc=()
else
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    launches="multi_gpu fsdp2"
    if python -c "import deepspeed" 2>/dev/null; then
        launches="$launches deepspeed_zero2 deepspeed_zero3"
    else
        echo "deepspeed is not installed: skipping the ZeRO-2 / ZeRO-3 runs (pip install deepspeed)"
    fi
    extra=(--steps "$STEPS" --batch "$BATCH")
    nproc=(--num_processes 1)
fi
for launch in $launches; do
    echo "== $launch"
    timeout 300 accelerate launch --config_file "configs/accelerate/$launch.yaml" "${nproc[@]}" \
        scripts/gpu_check.py "${extra[@]}" 2>&1 | grep -E '^\{|Error|error' || echo "$launch: FAILED"
done
