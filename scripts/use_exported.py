"""Use an exported mmcl model WITHOUT mmcl: zero-shot classify images with plain transformers and
with sentence-transformers, and check that mmcl was never imported.

Run:  python scripts/use_exported.py EXPORT_DIR IMAGE [IMAGE ...] --labels "red apple,cat face,..."
(EXPORT_DIR is `<output_dir>/export` of a training run, or the output of `mmcl export`.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image


def with_transformers(folder: str, images: list[Image.Image], labels: list[str]) -> torch.Tensor | None:
    from transformers import AutoModel, AutoProcessor

    if not (Path(folder) / "config.json").is_file():
        return None  # no native transformers class for this model's pooling (see its model card)
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=[f"{label}" for label in labels], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits_per_image.softmax(dim=-1)  # (images, labels)


def with_sentence_transformers(folder: str, images: list[Image.Image], labels: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device="cpu")
    text = model.encode(labels, convert_to_tensor=True)  # unit norm
    image = model.encode(images, convert_to_tensor=True)
    scale = json.loads((Path(folder) / "mmcl_export.json").read_text())["logit_scale"]
    return (torch.tensor(scale).exp() * image @ text.T).softmax(dim=-1)


def show(name: str, probs: torch.Tensor, paths: list[str], labels: list[str]) -> None:
    print(f"== {name}")
    for path, row in zip(paths, probs):
        top = row.topk(min(3, len(labels)))
        print(f"  {Path(path).name:<40} " + "  ".join(f"{labels[i]} {v:.3f}" for v, i in zip(top.values, top.indices)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--labels", required=True)
    args = parser.parse_args()
    labels = [label.strip() for label in args.labels.split(",")]
    images = [Image.open(p).convert("RGB") for p in args.images]
    native = with_transformers(args.folder, images, labels)
    if native is not None:
        show("transformers (AutoModel + AutoProcessor)", native, args.images, labels)
    else:
        print("== transformers: no native class for this pooling (the model card says why)")
    show("sentence-transformers", with_sentence_transformers(args.folder, images, labels), args.images, labels)
    print(f"mmcl imported: {'mmcl' in sys.modules}")


if __name__ == "__main__":
    main()
