"""WiSE-FT: alpha 0 and 1 give the two inputs bit for bit, 0.5 the hand-computed average, and the
mix is an mmcl folder that loads and embeds; another architecture or tokenizer is a clear error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmcl.cli import main
from mmcl.config import ConfigError
from mmcl.config_loader import load_config
from mmcl.towers.model import DualEncoder
from mmcl.apps.wise_ft import wise_ft
from tests.conftest import save_tiny_model


@pytest.fixture
def two_models(tmp_path):
    """A tiny model and a "fine-tuned" copy: every float weight moved by noise."""
    pretrained = save_tiny_model(tmp_path / "pretrained", "a red heart and a blue square")
    finetuned = tmp_path / "finetuned"
    shutil.copytree(pretrained, finetuned)
    torch.manual_seed(1)
    weights = {k: v + torch.randn_like(v) * 0.1 if v.is_floating_point() else v
               for k, v in load_file(pretrained / "model.safetensors").items()}
    save_file(weights, str(finetuned / "model.safetensors"), metadata={"format": "pt"})
    return pretrained, finetuned


def test_alpha_0_and_1_are_the_inputs_and_one_half_is_the_average(tmp_path, two_models):
    pretrained, finetuned = two_models
    a, b = load_file(pretrained / "model.safetensors"), load_file(finetuned / "model.safetensors")
    for alpha, expected in ((0.0, a), (1.0, b)):
        mixed = load_file(wise_ft(pretrained, finetuned, alpha, tmp_path / f"mix{alpha}") / "model.safetensors")
        assert mixed.keys() == expected.keys()
        assert all(torch.equal(mixed[k], expected[k]) for k in mixed), alpha
    assert main(["wise-ft", str(pretrained), str(finetuned), str(tmp_path / "half"), "--alpha", "0.5"]) == 0
    half = load_file(tmp_path / "half" / "model.safetensors")
    for name, value in half.items():
        by_hand = (a[name].double() + b[name].double()) / 2 if value.is_floating_point() else a[name]
        assert torch.allclose(value.double(), by_hand, rtol=1e-6, atol=1e-7), name  # float32 rounding
    model = DualEncoder.from_pretrained(tmp_path / "half")  # a plain mmcl folder: loads and embeds
    ids = torch.tensor([[2, 7, 9, 3]])
    assert model(pixel_values=torch.randn(1, 3, 16, 16), input_ids=ids).text_embeds.shape == (1, 8)
    assert (tmp_path / "half" / "tokenizer.json").is_file()


def test_another_architecture_or_tokenizer_is_named(tmp_path, two_models):
    pretrained, finetuned = two_models
    other = save_tiny_model(tmp_path / "other", "a red heart and a blue square", vocab_size=280)
    shutil.copy(pretrained / "tokenizer.json", other / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"differ at tensor text_model\.embeddings\.word_embeddings\.weight: "
                                          r"pretrained \(\d+, 32\) float32, fine-tuned \(\d+, 32\) float32"):
        wise_ft(pretrained, other, 0.5, tmp_path / "bad")
    record = json.loads((finetuned / "tokenizer.json").read_text())  # another truncation length: one vocabulary
    record["truncation"] = {"direction": "Right", "max_length": 7, "strategy": "LongestFirst", "stride": 0}
    (finetuned / "tokenizer.json").write_text(json.dumps(record))
    wise_ft(pretrained, finetuned, 0.5, tmp_path / "truncated")
    record = json.loads((finetuned / "tokenizer.json").read_text())  # two tokens' ids swapped: another vocabulary
    vocab = record["model"]["vocab"]
    vocab["Ġheart"], vocab["Ġred"] = vocab["Ġred"], vocab["Ġheart"]
    (finetuned / "tokenizer.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"other tokenizers \(2 tokens differ, e.g. 'Ġ(heart|red)': id \d+ vs \d+\)"):
        wise_ft(pretrained, finetuned, 0.5, tmp_path / "bad")
    with pytest.raises(ConfigError, match="0 <= alpha <= 1"):
        wise_ft(pretrained, pretrained, 1.5, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_sweep_evaluates_each_mix_and_draws_the_trade_off(tmp_path, two_models, emoji_cache, small_emoji, capsys):
    """--alpha 0,0.5,1 --eval CONFIG: the ends score as the two models evaluated on their own, the
    middle as the alpha-0.5 folder; the JSON and the curve are written."""
    from mmcl.evaluation.evaluators import evaluate_model
    from mmcl.evaluation.evaluators import eval_specs

    pretrained, finetuned = two_models
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"data: {{validation: {small_emoji}, validation_split: train, cache_dir: {emoji_cache}, emoji_image_size: 16}}\n"
        "eval:\n  best_metric: val/image_to_text_R@5\n  retention: [keep/top1]\n"
        "  sets: {keep: {task: zero_shot, dataset: 'builtin:emoji', label_column: name, max_samples: 64}}\n")
    out = tmp_path / "sweep"
    assert main(["wise-ft", str(pretrained), str(finetuned), str(out), "--alpha", "0,0.5,1", "--eval", str(config),
                 "--eval.batch_size=32"]) == 0
    record = json.loads((out / "wise_ft_sweep.json").read_text())
    assert (record["target"], record["retention"]) == ("val/image_to_text_R@5", "keep/top1")
    assert [row["alpha"] for row in record["rows"]] == [0.0, 0.5, 1.0]
    assert (out / "wise_ft_curve.png").stat().st_size > 10_000
    wise_ft(pretrained, finetuned, 0.5, tmp_path / "half")
    loaded = load_config(str(config), [f"--model.init_from={finetuned}"])
    specs = eval_specs(loaded.data, loaded.eval)
    for row, model in zip(record["rows"], (pretrained, tmp_path / "half", finetuned)):
        for name, spec in specs.items():
            alone = evaluate_model(str(model), spec, cache_dir=emoji_cache)
            assert row[f"{name}/top1" if name == "keep" else f"{name}/image_to_text_R@5"] == pytest.approx(
                alone["top1" if name == "keep" else "image_to_text_R@5"], abs=1e-9), (row["alpha"], name)
    capsys.readouterr()
    assert main(["wise-ft", str(pretrained), str(finetuned), str(out), "--alpha", "0,1", "--eval", str(config),
                 "--target", "nope/R@1"]) == 2
    assert "--target nope/R@1: give <set>/<metric> with <set> one of the config's evaluations (val, keep)" in \
        capsys.readouterr().err
