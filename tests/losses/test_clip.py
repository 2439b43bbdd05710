import math

import torch
import torch.nn.functional as F

from mmcl.losses import ClipLoss
from mmcl.towers.model import DualEncoderOutput


def clip(images, texts, logit_scale, image_ids=None, text_ids=None):
    return ClipLoss()(DualEncoderOutput(images, texts, logit_scale), image_ids, text_ids)


def naive_clip_loss(images, texts, logit_scale):
    """CLIP's loss written out with loops: -log softmax of each positive, both directions."""
    n = images.shape[0]
    scale = math.exp(logit_scale)
    sims = [[scale * float(images[i] @ texts[j]) for j in range(n)] for i in range(n)]
    i2t = sum(-(sims[i][i] - math.log(sum(math.exp(s) for s in sims[i]))) for i in range(n)) / n
    cols = [[sims[i][j] for i in range(n)] for j in range(n)]
    t2i = sum(-(cols[j][j] - math.log(sum(math.exp(s) for s in cols[j]))) for j in range(n)) / n
    return (i2t + t2i) / 2


def test_matches_naive_reference():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07))
    got = clip(images, texts, scale)
    assert abs(got.item() - naive_clip_loss(images, texts, scale.item())) < 1e-5


def test_perfect_alignment_gives_low_loss_and_is_symmetric():
    eye = torch.eye(6)
    scale = torch.tensor(math.log(100.0))
    assert clip(eye, eye, scale).item() < 1e-3
    a, b = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    assert torch.allclose(clip(a, b, scale), clip(b, a, scale))


def test_gradient_reaches_embeddings_and_temperature():
    a = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_()
    scale = torch.tensor(2.0, requires_grad=True)
    clip(a, b, scale).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0 and scale.grad != 0


def naive_masked_loss(images, texts, logit_scale, image_ids, text_ids):
    """Loops: for pair i, drop every other column whose image or caption equals pair i's."""
    n = images.shape[0]
    scale = math.exp(logit_scale)
    total = 0.0
    for direction in ("i2t", "t2i"):
        for i in range(n):
            keep = [j for j in range(n) if j == i or (image_ids[j] != image_ids[i] and text_ids[j] != text_ids[i])]
            if direction == "i2t":
                scores = {j: scale * float(images[i] @ texts[j]) for j in keep}
            else:
                scores = {j: scale * float(texts[i] @ images[j]) for j in keep}
            total += -(scores[i] - math.log(sum(math.exp(s) for s in scores.values())))
    return total / (2 * n)


def test_duplicates_in_a_batch_are_not_negatives():
    torch.manual_seed(1)
    images = F.normalize(torch.randn(8, 5, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(8, 5, dtype=torch.float64), dim=-1)
    image_ids = torch.tensor([0, 1, 0, 3, 4, 5, 6, 3])  # rows 0/2 and 3/7: the same image
    text_ids = torch.tensor([10, 11, 12, 13, 11, 15, 16, 17])  # rows 1/4: the identical caption
    scale = torch.tensor(2.5)
    got = clip(images, texts, scale, image_ids, text_ids).item()
    want = naive_masked_loss(images, texts, scale.item(), image_ids.tolist(), text_ids.tolist())
    assert abs(got - want) < 1e-6
    # with all ids distinct the mask changes nothing
    distinct = torch.arange(8)
    assert torch.allclose(clip(images, texts, scale, distinct, distinct + 100), clip(images, texts, scale))
    assert abs(got - clip(images, texts, scale).item()) > 1e-3  # and here it does


def test_pair_ids_from_the_data_pipeline(tmp_path):
    import datasets
    from PIL import Image

    from mmcl.config import ModelConfig
    from mmcl.data.pairs import PairCollator, PairDataset, PairRecipe
    from mmcl.towers.build import build_image_processor, train_tokenizer

    Image.new("RGB", (6, 6), "red").save(tmp_path / "a.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())  # the same file twice
    Image.new("RGB", (6, 6), "blue").save(tmp_path / "b.png")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / n) for n in ("a.png", "copy.png", "b.png")],
                                     "caption": ["red square", "a copy", "red square"]})
    data = PairDataset(ds, "image", "caption", PairRecipe(build_image_processor(ModelConfig(image_size=4))))
    batch = PairCollator(train_tokenizer(["red square a copy"], 60), 8)([data[i] for i in range(3)])
    image_ids, text_ids = batch["image_ids"].tolist(), batch["text_ids"].tolist()
    assert image_ids[0] == image_ids[1] != image_ids[2]
    assert text_ids[0] == text_ids[2] != text_ids[1]
