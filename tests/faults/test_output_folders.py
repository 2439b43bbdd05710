"""Nothing is destroyed that mmcl did not write: wise-ft and export refuse a folder of the user's
files (and a file in a folder's place) unless told to --overwrite; a new training run does not mix
into an earlier run's checkpoints; a resume refuses another run's tokenizer."""

import json

import pytest

from mmcl.apps.wise_ft import wise_ft
from mmcl.cli import main
from mmcl.config import ConfigError
from mmcl.training.loop import train
from tests.conftest import save_tiny_model
from tests.test_train import debug_config


def notes_folder(path):
    path.mkdir(parents=True)
    (path / "notes.md").write_text("my notes")
    for i in range(3):
        (path / f"photo{i}.jpg").write_bytes(b"\xff\xd8 not really")
    return sorted(p.name for p in path.iterdir())


def test_wise_ft_and_export_refuse_the_users_folder_and_files(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model", "a red square")
    before = notes_folder(tmp_path / "mine")
    with pytest.raises(ConfigError, match=r"mine holds files mmcl did not write \(notes.md, photo0.jpg, photo1.jpg, "
                                          r"\.\.\. \(4 entries\)\); .* or pass --overwrite"):
        wise_ft(model, model, 0.5, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == before
    assert main(["export", str(model), str(tmp_path / "mine")]) == 2
    assert "mine holds files mmcl did not write" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("keep me")
    assert main(["export", str(model), str(tmp_path / "a_file")]) == 2
    assert (tmp_path / "a_file").read_text() == "keep me" and not list(tmp_path.glob(".old-*"))
    # what mmcl wrote it may replace; the user's folder only when told
    wise_ft(model, model, 0.5, tmp_path / "mixed")
    wise_ft(model, model, 0.25, tmp_path / "mixed")
    assert json.loads((tmp_path / "mixed" / "mmcl_info.json").read_text())["wise_ft"]["alpha"] == 0.25
    assert main(["wise-ft", str(model), str(model), str(tmp_path / "mine"), "--overwrite"]) == 0
    assert (tmp_path / "mine" / "model.safetensors").is_file() and not (tmp_path / "mine" / "notes.md").exists()


def test_a_new_run_does_not_mix_into_an_earlier_runs_folder(tmp_path, emoji_cache, small_emoji):
    common = [f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", "--train.max_steps=2",
              "--train.checkpoint_every=1"]
    out = tmp_path / "run"
    train(debug_config(out, emoji_cache, *common))
    (out / "my_notes.md").write_text("the user's file in the run folder")
    with pytest.raises(ConfigError, match=r"holds the checkpoints of an earlier run \(up to step-00000002\): "
                                          r"continue it with --train.resume=latest, or start over"):
        train(debug_config(out, emoji_cache, *common))
    train(debug_config(out, emoji_cache, *common, "--train.overwrite_output_dir=true", "--train.max_steps=1"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]  # the earlier run's are gone
    assert (out / "my_notes.md").is_file()  # and nothing else
    # a folder of the user's own files is not a run folder
    notes_folder(tmp_path / "mine")
    with pytest.raises(ConfigError, match="mine holds files mmcl did not write"):
        train(debug_config(tmp_path / "mine", emoji_cache, *common))


def test_a_resume_refuses_another_runs_tokenizer(tmp_path, emoji_cache, small_emoji):
    common = [f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", "--train.max_steps=2",
              "--train.checkpoint_every=2"]
    out = tmp_path / "run"
    train(debug_config(out, emoji_cache, *common))
    tokenizer = json.loads((out / "processor" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (out / "processor" / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConfigError, match="the tokenizer or image processor in .*processor is not the one"):
        train(debug_config(out, emoji_cache, *common, "--train.resume=latest"))
