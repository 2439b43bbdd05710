"""`mmcl data mine-negatives`: the blocked search equals a brute-force one, twins are never negatives,
and the command writes a self-contained folder that reads back as training data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from accelerate import Accelerator

from mmcl.towers.build import build_image_processor
from mmcl.towers.inference import load_encoder
from mmcl.cli import main
from mmcl.config import ConfigError, ModelConfig, SourceSpec
from mmcl.data.mining import hard_negatives, mine_negatives
from mmcl.data.pairs import PairDataset, PairRecipe
from mmcl.data.sources import load_pairs
from tests.conftest import save_tiny_model


def naive(embeds: torch.Tensor, image_ids: list[int], captions: list[list[str]], k: int) -> list[list[int]]:
    """The rules one by one over the full N x N table (float64, python loops): per row, all other rows
    by descending cosine, passing over itself, its image, its own captions and captions already taken."""
    e = embeds.double().tolist()
    picked = []
    for i in range(len(e)):
        sims = [sum(a * b for a, b in zip(e[i], e[j])) for j in range(len(e))]
        chosen, taken = [], set()
        for j in sorted(range(len(e)), key=lambda j: -sims[j]):
            caption = captions[j][0]
            if len(chosen) == k:
                break
            if j == i or image_ids[j] == image_ids[i] or caption in captions[i] or caption in taken:
                continue
            chosen.append(j)
            taken.add(caption)
        picked.append(chosen)
    return picked


def random_rows(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, list[int], list[list[str]]]:
    """Random unit embeddings with every kind of twin: shared image ids, a caption equal to another
    row's, a row with two captions, and many rows with one same first caption."""
    g = torch.Generator().manual_seed(seed)
    embeds = F.normalize(torch.randn(n, 6, generator=g), dim=1)
    image_ids = list(range(100, 100 + n))
    image_ids[17] = image_ids[5]
    image_ids[21] = image_ids[22] = image_ids[20]
    captions = [[f"c{i}"] for i in range(n)]
    captions[8] = ["c3"]
    captions[10] = ["c10", "c11"]
    for i in range(30, 36):
        captions[i] = ["same", f"other {i}"]
    return embeds, image_ids, captions


@pytest.mark.parametrize("block_size", [1, 7, 40, 100])
@pytest.mark.parametrize("k", [1, 3, 39])
def test_blocked_search_equals_the_brute_force_one(block_size, k):
    embeds, image_ids, captions = random_rows()
    expected = naive(embeds, image_ids, captions, k)
    assert hard_negatives(embeds, torch.tensor(image_ids), captions, k, block_size) == expected
    if k == 39:  # more than there are: each row gets all rows that qualify, and no more
        assert all(len(row) < k for row in expected)


def test_search_goes_further_down_the_ranking_past_a_crowd_of_equal_captions():
    """Row 0's 20 nearest images share one caption: its second negative lies below the first top-k."""
    g = torch.Generator().manual_seed(1)
    crowd = F.normalize(torch.tensor([1.0, 0, 0, 0]) + 0.01 * torch.randn(20, 4, generator=g), dim=1)
    far = F.normalize(torch.tensor([0.0, 1, 0, 0]) + 0.3 * torch.randn(19, 4, generator=g), dim=1)
    embeds = torch.cat([torch.tensor([[1.0, 0, 0, 0]]), crowd, far])
    captions = [["query"]] + [["crowd"]] * 20 + [[f"far {i}"] for i in range(19)]
    ids = torch.arange(40)
    picked = hard_negatives(embeds, ids, captions, 2, block_size=8)
    assert picked == naive(embeds, ids.tolist(), captions, 2)
    assert len(picked[0]) == 2 and picked[0][0] in range(1, 21) and picked[0][1] >= 21


def test_twins_are_never_negatives_even_when_they_are_the_nearest():
    base = F.normalize(torch.randn(6, 5, generator=torch.Generator().manual_seed(2)), dim=1)
    embeds = torch.cat([base[:1], base[:1], base[:1] * 0.9 + base[1:2] * 0.1, base[2:]])  # rows 0-2 alike
    embeds = F.normalize(embeds, dim=1)
    image_ids = torch.tensor([7, 7, 8, 9, 10, 11, 12])  # rows 0 and 1: the same image bytes
    captions = [["a red apple", "an apple"], ["a shiny apple"], ["an apple"], ["d"], ["e"], ["f"], ["g"]]
    picked = hard_negatives(embeds, image_ids, captions, 3, block_size=2)
    assert 1 not in picked[0] and 0 not in picked[1]  # the same image
    assert 2 not in picked[0]  # its caption is one of row 0's captions
    for row, negatives in enumerate(picked):
        assert row not in negatives
        assert not {captions[j][0] for j in negatives} & set(captions[row])  # never its own caption
    assert all(len(negatives) == 3 for negatives in picked)


# --- the command ------------------------------------------------------------------------------------
def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A CSV of 11 rows: 8 distinct images, one duplicated file (same bytes, other caption), one row
    whose caption repeats another's, and one truncated image."""
    root = tmp_path_factory.mktemp("mine")
    rows = []
    for i in range(8):
        noise(i).save(root / f"img{i}.png")
        rows.append((f"img{i}.png", f"noise number {i}"))
    (root / "copy.png").write_bytes((root / "img0.png").read_bytes())
    rows.append(("copy.png", "the same noise again"))
    rows.append(("img5.png", "noise number 1"))  # caption twin of row 1 (and image twin of row 5)
    data = (root / "img7.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    rows.append(("cut.png", "a broken file"))
    (root / "pairs.csv").write_text("image,caption\n" + "\n".join(f"{f},{c}" for f, c in rows) + "\n")
    save_tiny_model(root / "model", " ".join(c for _, c in rows))
    return root, rows


def test_the_command_writes_a_self_contained_folder_with_the_column(pairs, tmp_path, capsys):
    root, rows = pairs
    out = tmp_path / "mined"
    code = main(["data", "mine-negatives", str(root / "pairs.csv"), "--model", str(root / "model"),
                 "--out", str(out), "--k", "3", "--block-size", "4", "--batch-size", "4"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(printed) == 1
    assert "10 of 11 rows written, 1 skipped (truncated 1)" in printed[0] and "column 'hard_negatives'" in printed[0]
    ds = load_pairs(SourceSpec(str(out)))
    assert len(ds) == 10 and ds.column_names == ["image", "caption", "hard_negatives"]
    assert all(cell["bytes"] for cell in ds["image"])  # embedded: no path left to break
    captions = ds["caption"]
    for row, negatives in enumerate(ds["hard_negatives"]):
        assert len(negatives) == 3 and len(set(negatives)) == 3 and set(negatives) <= set(captions)
        assert captions[row] not in negatives
    by_caption = dict(zip(captions, ds["hard_negatives"]))
    assert "the same noise again" not in by_caption["noise number 0"]  # the same bytes
    assert "noise number 0" not in by_caption["the same noise again"]
    assert "noise number 5" not in by_caption["noise number 1"]  # row 9 is img5 under row 1's caption
    processor = build_image_processor(ModelConfig(image_size=16))
    assert PairDataset(ds, "image", "caption", PairRecipe(processor))[9]["skipped"] == []  # reads as training reads it


def test_mistakes_are_one_line_errors(pairs, tmp_path, capsys):
    root, _ = pairs
    csv, model = str(root / "pairs.csv"), str(root / "model")
    cases = [(["--model", str(tmp_path / "nope")], "no such model folder"),
             (["--model", model, "--caption-column", "text"], "no column 'text'"),
             (["--model", model, "--column", "caption"], "already has a column 'caption'")]
    for extra, expected in cases:
        assert main(["data", "mine-negatives", csv, "--out", str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mmcl data mine-negatives: error: ") and expected in err[0], err
    with pytest.raises(ConfigError, match="k must be at least 1"):
        mine_negatives(SourceSpec(csv), load_encoder(model), Accelerator(cpu=True), tmp_path / "out", k=0)
    assert not (tmp_path / "out").exists()
