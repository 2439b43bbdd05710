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


def with_transformers(folder: str, images: list[Image.Image], labels: list[str]) -> tuple[str, torch.Tensor]:
    """Native class when the export has one; otherwise each tower with AutoModel, pooled and
    projected as the export's sentence-transformers configs say (plain transformers + torch)."""
    from transformers import AutoModel, AutoProcessor

    root = Path(folder)
    scale = torch.tensor(json.loads((root / "mmcl_export.json").read_text())["logit_scale"]).exp()
    if (root / "config.json").is_file():  # a native class, or the remote code an export ships without one
        remote = (root / "modeling_mmcl.py").is_file()
        model = AutoModel.from_pretrained(folder, trust_remote_code=remote).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=remote)
        inputs = processor(text=labels, images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            return type(model).__name__, model(**inputs).logits_per_image.softmax(dim=-1)
    text = tower_embeddings(root, "text", labels)
    image = tower_embeddings(root, "image", images)
    return "AutoModel per tower + pooling + projection", (scale * image @ text.T).softmax(dim=-1)


def tower_embeddings(root: Path, side: str, inputs: list) -> torch.Tensor:
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    tower_dir = root / f"{side}_0_Transformer"
    tower = AutoModel.from_pretrained(tower_dir).eval()
    if side == "text":
        batch = AutoTokenizer.from_pretrained(tower_dir)(inputs, padding=True, truncation=True, return_tensors="pt")
    else:
        batch = AutoImageProcessor.from_pretrained(tower_dir)(inputs, return_tensors="pt")
    mode = json.loads((root / f"{side}_1_Pooling" / "config.json").read_text())["pooling_mode"]
    with torch.no_grad():
        hidden = tower(**batch).last_hidden_state  # (B, T, H)
        if mode == "mean":
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
        else:  # cls: the first token
            pooled = hidden[:, 0]
        projection = load_file(root / f"{side}_2_Dense" / "model.safetensors")["linear.weight"]  # (D, H)
        return torch.nn.functional.normalize(pooled @ projection.T, dim=-1)


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
    route, probs = with_transformers(args.folder, images, labels)
    show(f"transformers ({route})", probs, args.images, labels)
    show("sentence-transformers", with_sentence_transformers(args.folder, images, labels), args.images, labels)
    print(f"mmcl imported: {'mmcl' in sys.modules}")


if __name__ == "__main__":
    main()
