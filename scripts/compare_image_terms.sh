#!/usr/bin/env bash
# The image-image terms against InfoNCE alone on the emoji quickstart, equal steps, one after another
# on this machine: quickstart.yaml, loss_slip.yaml, loss_byol.yaml, loss_swav.yaml at the quickstart's batch (128) and
# at batch 32 (where negatives are few). Prints one table row per run from its metrics.json: held-out
# colour retrieval, line-art retrieval, zero-shot top-1, and the training wall time.
#   bash scripts/compare_image_terms.sh [OUT_DIR] [extra --key=value overrides ...]
set -euo pipefail
out=${1:-runs/compare_image_terms}
shift || true
mkdir -p "$out"
for batch in 128 32; do
    for config in quickstart loss_slip loss_byol loss_swav; do
        run="$out/${config}_b${batch}"
        [ -f "$run/metrics.json" ] || mmcl train "configs/$config.yaml" --train.output_dir="$run" \
            --train.per_device_batch_size="$batch" --train.progress_bar=false --hub.export=false "$@" \
            > "$run.log" 2>&1
    done
done
python - "$out" <<'EOF'
import json, pathlib, sys
keys = ["val/image_to_text_R@1", "val/image_to_text_R@5", "val/text_to_image_R@1", "lineart/image_to_text_R@1",
        "zs_emoji/top1", "train/wall_s"]
print("| run | " + " | ".join(keys) + " |")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    m = json.loads(path.read_text())
    print(f"| {path.parent.name} | " + " | ".join(f"{m[k]:.3f}" if k != "train/wall_s" else f"{m[k]:.0f}"
                                              for k in keys) + " |")
EOF
