"""predict / embed / search on a tiny saved model and a folder of images."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmcl.cli import main
from tests.conftest import save_tiny_model

COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "black": (0, 0, 0)}


@pytest.fixture(scope="module")
def model_and_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    save_tiny_model(root / "model", "a photo of a red green blue black square")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for name, color in COLORS.items():
        Image.new("RGB", (20, 20), color).save(images / ("sub" if name == "black" else ".") / f"{name}.png")
    (images / "broken.png").write_text("not an image")
    (images / "metadata.csv").write_text("file_name,caption\n" + "\n".join(
        f"{'sub/' if n == 'black' else ''}{n}.png,a {n} square" for n in COLORS))
    return root / "model", images


def test_predict_prints_and_writes_top_k(model_and_folder, tmp_path, capsys):
    model, images = model_and_folder
    out = tmp_path / "pred.json"
    assert main(["predict", str(model), str(images), "--labels", "red,green,blue,black", "--top-k", "2",
                 "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 5  # recursive, sorted; the broken file is reported, not fatal
    broken = [r for r in rows if r["image"].endswith("broken.png")][0]
    assert broken["error"] == "unreadable image"
    good = [r for r in rows if "top" in r]
    assert all(len(r["top"]) == 2 and r["top"][0]["prob"] >= r["top"][1]["prob"] for r in good)
    assert abs(sum(t["prob"] for t in good[0]["top"])) <= 1.0 + 1e-6
    assert "red.png" in capsys.readouterr().out


def test_search_caches_embeddings_and_draws_a_sheet(model_and_folder, tmp_path, capsys):
    model, images = model_and_folder
    from mmcl.apps.predict import load_for_inference, search

    bundle, accelerator = load_for_inference(str(model))
    first, cached_first = search(bundle, accelerator, str(images), ["a red square", "blue"], top_k=3)
    second, cached_second = search(bundle, accelerator, str(images), ["a red square", "blue"], top_k=3)
    assert (cached_first, cached_second) == (False, True) and first == second
    assert len(first[0]["matches"]) == 3
    assert main(["search", str(model), str(images), "green", "--sheet", str(tmp_path / "sheet.png")]) == 0
    assert Image.open(tmp_path / "sheet.png").size[0] > 100


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_embed_a_dataset_folder(model_and_folder, tmp_path, suffix):
    model, images = model_and_folder
    out = tmp_path / f"emb{suffix}"
    assert main(["embed", str(model), str(images), "--output", str(out)]) == 0
    if suffix == ".npz":
        data = np.load(out)
        assert data["image_embeds"].shape == (4, 8) and data["text_embeds"].shape == (4, 8)
        listed = sorted(line.split(",")[0] for line in (images / "metadata.csv").read_text().splitlines()[1:])
        assert sorted(Path(i).relative_to(images).as_posix() for i in data["ids"]) == listed  # sources, not rows
        assert np.allclose(np.linalg.norm(data["text_embeds"], axis=1), 1.0, atol=1e-5)
    else:
        table = pq.read_table(out)
        assert table.num_rows == 4 and len(table.column("image_embeds")[0]) == 8
