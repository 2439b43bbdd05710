#!/usr/bin/env bash
# The GPU check of issue 10: a ViT-B/32-shaped model (configs/gpu_check_vit_b32.yaml, random init,
# synthetic data, bf16) trained for a fixed number of steps on ONE GPU with each launch config:
# DDP, FSDP2, then DeepSpeed ZeRO-2 and ZeRO-3 when deepspeed is installed. Prints one JSON line per
# launch: samples/s, peak memory (GiB), GFLOPs per sample and MFU (see scripts/gpu_check.py). Then the
# real loop: `mmcl train` of the same model on the built-in emoji set drawn at 224 px (PNG decoding in
# data.num_workers processes), whose log lines carry MFU and the data-wait share; the last line and the
# run's metrics.json figures are printed.
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
    loop=(configs/debug_tiny.yaml --train.max_steps=4 --train.log_every=2 --data.num_workers=1)
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
    loop=(configs/gpu_check_vit_b32.yaml --data.emoji_image_size=224 --train.max_steps="$((STEPS * 2))"
          --train.log_every=10 --data.num_workers="${WORKERS:-8}")
fi
for launch in $launches; do
    echo "== $launch"
    timeout 300 accelerate launch --config_file "configs/accelerate/$launch.yaml" "${nproc[@]}" \
        scripts/gpu_check.py "${extra[@]}" 2>&1 | grep -E '^\{|Error|error' || echo "$launch: FAILED"
done
echo "== mmcl train (the real loop: MFU and data wait as its log has them)"
out=$(mktemp -d)
timeout 400 mmcl train "${loop[@]}" --data.train=builtin:emoji --data.validation=null --data.validation_share=0 '--eval.sets={}' \
    --train.checkpoint_every=0 --hub.export=false --train.output_dir="$out" --train.progress_bar=false 2>&1 \
    | grep -E "^(auto|throughput|warning):" || echo "mmcl train: FAILED"
python - "$out" <<'PY'
import json, sys
log = [json.loads(line) for line in open(f"{sys.argv[1]}/logs/metrics.jsonl")]
last = [entry for entry in log if "train/mfu" in entry][-1]
metrics = json.load(open(f"{sys.argv[1]}/metrics.json"))
keys = ("train/samples_per_s", "train/tflops", "train/mfu", "train/data_wait")
print(json.dumps({"last_log_line": {k: round(last[k], 4) for k in keys if k in last},
                  "run": {k: round(metrics[k], 4) for k in ("train/tflops", "train/mfu", "train/data_wait") if k in metrics}}))
PY
