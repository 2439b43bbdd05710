"""Streaming from WebDataset shards: no duplicates or gaps across processes, bad examples
skipped, and exact resume."""

import io
import json
import shutil
import tarfile

import pytest
from PIL import Image
from safetensors.torch import load_file

from mmcl.config import DataConfig, ModelConfig

from mmcl.config_loader import load_config
from mmcl.data.pairs import PairCollator, PairRecipe
from mmcl.towers.build import build_image_processor, train_tokenizer
from mmcl.data.sources import load_stream
from mmcl.data.streaming import StreamingPairs
from tests.conftest import DEBUG_CONFIG

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]


def write_shards(folder, n_shards=4, per_shard=12, bad=()):
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:02d}{i:04d}"
                buffer = io.BytesIO()
                ext = "jpg" if i % 7 == 6 else "png"  # shards mixing formats, past the first samples
                Image.new("RGB", (8, 8), (20 * i, 60 * s, 7 * i)).save(buffer, format="PNG" if ext == "png" else "JPEG")
                image = b"not a png" if key in bad else buffer.getvalue()
                caption = {"caption": [f"{WORDS[i % 8]} {WORDS[s]} {key}"]}
                for name, payload in ((f"{key}.{ext}", image), (f"{key}.json", json.dumps(caption).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return folder


def stream(folder, rank, world, batch=4, workers=0):
    cfg = DataConfig(train=str(folder), streaming=True, num_workers=workers, shuffle_buffer=8)
    tokenizer = train_tokenizer(WORDS + ["0 1 2 3 4 5 6 7 8 9"], 100)
    recipe = PairRecipe(build_image_processor(ModelConfig(image_size=8)))
    return StreamingPairs(load_stream(cfg.train_source()), cfg, recipe, PairCollator(tokenizer, 16), batch, seed=0,
                          rank=rank, world_size=world)


def images_of(pairs, n_batches):
    """The image ids (a hash of each distinct image's bytes) of the first n batches."""
    it = iter(pairs)
    return [i for _ in range(n_batches) for i in next(it)["image_ids"].tolist()]


@pytest.mark.parametrize("n_shards, world", [(4, 2), (3, 2)])  # whole shards, or every world-th example
def test_processes_read_disjoint_parts_that_cover_the_stream(tmp_path, n_shards, world):
    folder = write_shards(tmp_path / "shards", n_shards=n_shards)
    total = n_shards * 12
    seen = [images_of(stream(folder, rank, world, batch=2, workers=2), total // world // 2) for rank in range(world)]
    flat = [i for part in seen for i in part]
    assert len(flat) == total and len(set(flat)) == total  # every image once: no duplicates, no gaps


def test_bad_examples_are_skipped_and_counted(tmp_path):
    folder = write_shards(tmp_path / "shards", n_shards=1, bad={"000003", "000005"})
    batch = next(iter(stream(folder, 0, 1, batch=10)))
    assert batch["pixel_values"].shape[0] == 10
    assert sorted(s.source.split("#")[1] for s in batch["skipped"]) == ["000003", "000005"]


def test_stream_resume_equals_uninterrupted(tmp_path, emoji_cache):
    """4 + resume + 4 steps from WebDataset shards (crossing an epoch) = 8 uninterrupted steps."""
    folder = write_shards(tmp_path / "shards", n_shards=2, per_shard=20, bad={"010007"})
    common = [f"--data.train={folder}", "--data.streaming=true", "--data.validation=null", "--data.validation_share=0",
              "--data.shuffle_buffer=16", "--train.max_steps=8", "--train.checkpoint_every=4",
              "--train.per_device_batch_size=12", "--train.keep_last=0", "--train.progress_bar=false",
              f"--data.cache_dir={emoji_cache}", "--model.image_size=16"]
    from mmcl.training.loop import train

    full = tmp_path / "full"
    metrics = train(load_config(DEBUG_CONFIG, [f"--train.output_dir={full}", *common]))
    assert metrics["train/skipped_images"] == 1.0
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    shutil.copytree(full / "processor", resumed / "processor")
    train(load_config(DEBUG_CONFIG, [f"--train.output_dir={resumed}", *common, "--train.resume=latest"]))
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-6, name


def test_named_columns_stream_like_a_hub_dataset(tmp_path, emoji_cache, small_emoji):
    """The Hub-streaming path (named image / caption columns, an Image() feature) on a local
    parquet file: what a streamed Hub dataset yields, offline."""
    import datasets

    from mmcl.training.loop import train

    parquet = tmp_path / "pairs.parquet"
    datasets.load_from_disk(small_emoji).to_parquet(str(parquet))
    config = load_config(DEBUG_CONFIG, [f"--train.output_dir={tmp_path / 'run'}", f"--data.train={parquet}",
                                        "--data.streaming=true", "--data.validation=null", "--data.validation_share=0", "--train.max_steps=3",
                                        "--train.checkpoint_every=0", "--hub.export=false", f"--data.cache_dir={emoji_cache}"])
    metrics = train(config)
    assert metrics["train/steps"] == 3.0 and metrics["train/skipped_images"] == 0.0


def test_which_sources_stream(tmp_path):
    """A folder of images streams as datasets' imagefolder (as a Hub name would); a csv or the
    built-in set is a clear error, not an attempt to reach the Hub."""
    from mmcl.config import ConfigError, SourceSpec

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "imgs" / "red.png")
    assert list(next(iter(load_stream(SourceSpec(str(tmp_path / "imgs")))))) == ["image"]
    (tmp_path / "pairs.csv").write_text("image,caption\nimgs/red.png,red\n")
    for name in (str(tmp_path / "pairs.csv"), "builtin:emoji"):
        with pytest.raises(ConfigError, match="is read map-style; set data.streaming: false"):
            load_stream(SourceSpec(name))
