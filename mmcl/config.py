"""Typed configuration: these dataclasses are the single source of truth; YAML files and
`--section.key=value` overrides map onto them (`mmcl.config_loader`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """Something the user gave is wrong: a config key or value, a file, a column, a model folder.
    The message names it and says what would be right; the CLI prints it as one line."""


class StopError(RuntimeError):
    """A run stopped for a reason the user can act on (a lost process, non-finite steps, a full
    disk, forgetting): the command line prints it as one line and exits with status 1."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text (shown by `mmcl train --help` and `mmcl eval --help`)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


Pooling = Literal["pooler", "cls", "mean"]
TOWERS = ("text", "vision")
BACKBONE_PREFIX = "backbone:"  # model.vision_model: backbone:NAME (mmcl/backbones.py)
BACKBONE_MODEL_TYPE = "mmcl_backbone"  # model.vision_config: {model_type: mmcl_backbone, backbone: NAME}


@dataclass
class LoraSpec:
    """LoRA adapters on one tower, through peft: the tower's own weights freeze and a rank-`r`
    update (scaled by `alpha / r`) trains beside each targeted linear layer. At the end of the run
    the updates are merged in, so the saved model is a plain one."""

    r: int = option(8, "rank of each update")
    alpha: float = option(16.0, "the update is scaled by alpha / r")
    dropout: float = option(0.0, "dropout on the adapters' input")
    target_modules: list[str] | str | None = option(
        None, "module names (a list), a regex, or all-linear; empty: peft's default for the tower's model type, "
              "else all-linear")


@dataclass
class ModelConfig:
    """The dual encoder: two Hugging Face towers, a projection each, a learned temperature.

    A tower comes from a pretrained folder / Hub id (`text_model`, `vision_model`) or, when that
    is empty, from a config dict (`text_config`, `vision_config`, with `model_type`) at random init.
    `init_from` instead starts from a whole CLIP-format checkpoint (`CLIPModel`,
    `VisionTextDualEncoderModel` or an mmcl folder) and ignores the tower keys.
    """

    text_model: str | None = option(None, "text tower: a folder, a Hub id or pkg:NAME/dir")
    text_config: dict[str, Any] = option(help="random-init text tower config, with model_type", factory=dict)
    vision_model: str | None = option(None, "vision tower: a folder, a Hub id, pkg:NAME/dir or backbone:NAME")
    vision_config: dict[str, Any] = option(help="random-init vision tower config, with model_type", factory=dict)
    init_from: str | None = option(None, "start from a CLIPModel, SiglipModel, VisionTextDualEncoderModel or mmcl folder")
    # With a random-init text tower and no tokenizer, a byte-level BPE tokenizer of
    # `tokenizer_vocab_size` is trained on the training captions (seconds).
    tokenizer: str | None = option(None, "tokenizer folder / Hub id; empty: the text tower's own")
    tokenizer_vocab_size: int = option(4000, "vocabulary of the tokenizer trained for a random-init text tower "
                                             "(byte-level: at least 261, its 256 bytes and 5 special tokens)")
    image_processor: str | None = option(None, "image processor folder / Hub id; empty: the vision tower's own")
    image_size: int = option(224, "side of a built (not loaded) image processor's output")
    max_text_length: int = option(32, "captions are truncated to this many tokens")
    text_padding: Literal["longest", "max_length"] = option(
        "longest", "pad captions to the batch's longest, or to max_text_length (SigLIP pools the last position: "
                   "fine-tune SigLIP models with max_length)")
    text_pooling: Pooling = option("pooler", "pooler (the tower's own) | cls | mean (attention-masked)")
    vision_pooling: Pooling = option("pooler", "pooler | cls | mean")
    projection_dim: int = option(512, "width of the shared embedding space")
    init_temperature: float = option(0.07, "logit_scale starts at ln(1 / init_temperature)")
    max_logit_scale: float = option(100.0, "logit_scale is clamped to ln(this) after every step")
    # `unlock_*_layers` keeps the last N blocks (and what follows them: final norm, pooler)
    # trainable inside a locked tower (or one with LoRA adapters).
    lock_vision: bool = option(False, "freeze the vision tower (LiT)")
    lock_text: bool = option(False, "freeze the text tower")
    unlock_vision_layers: int = option(0, "in a locked vision tower, train its last N blocks")
    unlock_text_layers: int = option(0, "in a locked text tower, train its last N blocks")
    lora: dict[str, LoraSpec] = option(help="LoRA adapters per tower (text, vision; the peft extra), e.g. "
                                            "{text: {r: 8}}; a tower with adapters is locked", factory=dict)
    # Activation checkpointing: keep only each block's input, recompute the rest in backward
    text_activation_checkpointing: bool = option(False, "text tower: less activation memory, its forward run twice")
    vision_activation_checkpointing: bool = option(False, "vision tower: less activation memory, its forward run twice")
    activation_checkpointing_policy: Literal["full", "selective"] = option(
        "full", "where a tower checkpoints: full keeps only each block's input; selective also keeps its matmul and "
                "attention outputs and recomputes only norms, activations, casts and sums (less memory saved, "
                "little time lost)")
    attn_implementation: str | None = option(
        "auto", "attention kernel of both towers (transformers' attn_implementation): auto | sdpa | eager | ...; "
                "auto: eager on CPU under bf16 (half the step time of SDPA there), else SDPA (mmcl/training/auto.py)")
    trust_remote_code: bool = option(False, "let transformers run code shipped with a Hub model")
    trust_backbone: bool = option(False, "let a model folder (init_from) name a backbone in your own code, which "
                                         "is then imported (a config's own backbone is always trusted)")

    def vision_backbone(self) -> str | None:
        """The backbone (mmcl/backbones.py) the vision tower is, by `vision_model: backbone:NAME` or a
        `vision_config` of model_type mmcl_backbone; None for any other tower."""
        if self.vision_model:
            return self.vision_model.removeprefix(BACKBONE_PREFIX) if self.vision_model.startswith(BACKBONE_PREFIX) \
                else None
        if self.vision_config.get("model_type") == BACKBONE_MODEL_TYPE:
            return str(self.vision_config.get("backbone", ""))
        return None


@dataclass
class SourceSpec:
    """Where one split of image–caption data comes from, and which columns hold what.

    `dataset`: `builtin:emoji` (the offline OpenMoji set), a Hub dataset name, a `save_to_disk`
    folder, an `imagefolder` with metadata.csv/jsonl, a csv/tsv/jsonl/parquet file whose image
    column holds paths (resolved relative to the file), or (streaming) WebDataset shards.
    """

    dataset: str = option("", "builtin:emoji, a Hub dataset, a folder or a csv/jsonl/parquet file")
    split: str = option("train", "the split to read")
    dataset_config: str | None = option(None, "the Hub dataset's config name")
    image_column: str = option("image", "the column holding images (or paths to them)")
    caption_column: str = option("caption", "the column holding captions (a string or a list)")


@dataclass
class DataConfig:
    """Where training and validation pairs come from (see `SourceSpec` for the accepted forms)."""

    train: str = option("builtin:emoji", "training data (see SourceSpec)")
    validation: str | None = option(None, "held-out data for retrieval eval 'val'; null: hold out "
                                          "data.validation_share of `train`")
    validation_share: float = option(0.05, "with no data.validation: this share of the training images (seeded by "
                                           "train.seed, all rows of one image together) is held out as 'val'; 0: "
                                           "no 'val'")
    train_split: str = option("train", "split of `train`")
    validation_split: str = option("validation", "split of `validation`")
    dataset_config: str | None = option(None, "the Hub dataset's config name")
    image_column: str = option("image", "the column holding images (or paths to them)")
    caption_column: str = option("caption", "the column holding captions (a string or a list)")
    num_workers: int = option(0, "processes decoding images (threads when streaming); 0: the main process")
    max_image_bytes: int = option(64 * 2**20, "an image file larger than this is skipped unread (as a corrupt "
                                              "one); only regular files are read, never pipes or devices")
    streaming: bool = option(False, "stream `train` (WebDataset shards, a Hub dataset, parquet/jsonl)")
    shuffle_buffer: int = option(1000, "streaming: examples in the shuffle buffer")
    cache_dir: str | None = option(None, "where built-in datasets and tokenizers trained on captions are cached; "
                                         "default ~/.cache/mmcl")
    emoji_image_size: int = option(64, "side of the built-in emoji images, in pixels")
    max_validation_samples: int | None = option(None, "evaluate 'val' on at most this many rows")
    augment: Literal["none", "light", "strong"] = option(
        "none", "training image augmentation preset (mmcl/data/augment.py): light = crop + mild jitter; strong "
                "adds edge drawings, grayscale, colour jitter and blur")
    augment_options: dict[str, Any] = option(
        help="override the preset's fields, e.g. {grayscale: 0.5, scale: [0.3, 1.0], flip: true}", factory=dict)
    batch_sampler: Literal["random", "cluster"] = option(
        "random", "cluster: each batch from a few k-means clusters of image embeddings (hard in-batch negatives)")
    cluster_model: str | None = option(None, "cluster: the model whose image embeddings are clustered")
    num_clusters: int = option(32, "cluster: k of k-means")
    clusters_per_batch: int = option(2, "cluster: clusters each batch is drawn from")

    def train_source(self) -> SourceSpec:
        return SourceSpec(self.train, self.train_split, self.dataset_config, self.image_column, self.caption_column)

    def validation_source(self) -> SourceSpec:
        return SourceSpec(self.validation or "", self.validation_split, self.dataset_config, self.image_column,
                          self.caption_column)


@dataclass
class TrainConfig:
    """The loop: batch, steps, optimizer and schedule, precision, logging, evaluation cadence,
    checkpoints and resume."""

    output_dir: str = option("runs/quickstart", "where checkpoints, logs, the final model and metrics go")
    seed: int = option(42, "seeds weights, data order and augmentation")
    per_device_batch_size: int = option(64, "pairs per process per micro-batch; the global batch is x processes")
    # Each micro-batch's contrastive loss only sees its own (gathered) batch.
    gradient_accumulation_steps: int = option(1, "averages gradients over micro-batches; adds NO negatives")
    max_steps: int = option(1000, "optimizer steps")
    learning_rate: float = option(5e-4, "peak learning rate")
    weight_decay: float = option(0.1, "AdamW decay; not applied to 1-D parameters or logit_scale")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.98, "AdamW beta2")
    adam_epsilon: float = option(1e-6, "AdamW epsilon")
    warmup_steps: int = option(100, "linear warmup steps")
    lr_scheduler: Literal["cosine", "constant"] = option("cosine", "after warmup")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm; null: no clipping")
    optim: Literal["auto", "adamw_torch", "adamw_torch_fused"] = option(
        "auto", "AdamW as torch's multi-tensor (foreach) or fused kernel: the same update; auto: fused, except with "
                "sharded parameters")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "autocast precision; auto: bf16 where the device has bf16 arithmetic (AVX512-BF16 or AMX CPUs, "
                "Ampere+ GPUs), else no (fp32)")
    deterministic: bool = option(False, "torch's deterministic algorithms (GPU runs repeat bit for bit, slower: "
                                        "docs/training.md); CPU runs with the same seed repeat without it")
    log_every: int = option(10, "log loss, lr, temperature, grad norm, samples/s every N steps")
    eval_every: int = option(200, "evaluate 'val' every N steps; 0: only at the end")
    checkpoint_every: int = option(200, "checkpoint every N steps; 0: none in between")
    checkpoint_every_minutes: float = option(0.0, "also checkpoint when this many minutes passed since the last "
                                                  "one; 0: off (SIGTERM / SIGINT / SIGUSR1 always checkpoint and stop)")
    keep_last: int = option(2, "checkpoints kept")
    resume: str | None = option(None, "'latest' or a checkpoint folder")
    overwrite_output_dir: bool = option(False, "start over in an output_dir that holds an earlier run: removes what "
                                               "that run wrote (checkpoints, logs, models), nothing else")
    max_bad_steps: int = option(10, "a non-finite loss or gradient norm skips that update; this many in a row "
                                    "stop the run (with a checkpoint of the last good state)")
    find_unused_parameters: bool = option(False, "DDP: a tower has parameters its pooling never uses (slower)")
    collective_timeout_s: int = option(1800, "multi-process: a process waits this long for the others in a "
                                             "collective before the job fails (a hung, not dead, process)")
    report_to: list[str] | str = option(
        "auto", "trackers besides logs/metrics.jsonl (always written: mmcl plot and resume read it): a list or "
                "comma-separated names of Accelerate's trackers (tensorboard, wandb, mlflow, comet_ml, trackio, aim, "
                "clearml, dvclive, swanlab, all), auto (tensorboard when installed), none or jsonl (the file only)")
    progress_bar: bool = option(True, "show a progress bar")


@dataclass
class LossConfig:
    """The contrastive loss (mmcl/losses) and what it adds to the batch: a cache for batches larger
    than memory, hard negatives, a queue of negatives from earlier steps, an image–image term."""

    name: Literal["clip", "siglip"] = option(
        "clip", "clip: symmetric InfoNCE over the global batch; siglip: pairwise sigmoid loss with a learned bias")
    init_logit_bias: float = option(-10.0, "siglip: the learned bias starts here (SigLIP: -10, with "
                                           "model.init_temperature 0.1)")
    cache_chunk: int = option(0, "GradCache: embed the batch N rows at a time, so the batch can exceed memory "
                                 "(same step as the full batch); 0: off")
    hard_negative_column: str | None = option(None, "a column of captions (a list per row, e.g. from `mmcl data "
                                                    "mine-negatives`) added to that row's candidates")
    queue_size: int = option(0, "MoCo-style: keep this many earlier image and text embeddings as extra negatives")
    momentum: float = option(0.99, "queue: embeddings come from an EMA copy of the model with this momentum; "
                                   "0: from the model itself (detached)")
    image_ssl_weight: float = option(0.0, "SLIP: add this weight x SimCLR's loss on two augmented views of each image")
    image_ssl_temperature: float = option(0.1, "SLIP: the NT-Xent temperature")
    image_ssl_dim: int = option(256, "SLIP / BYOL: output width of the image-image MLP head (BYOL's projector)")
    byol_weight: float = option(0.0, "BYOL: add this weight x BYOL's loss: each of two augmented views of an image, "
                                     "through the image-image head and a predictor, regresses the other view's "
                                     "projection by an EMA target copy (no negatives)")
    byol_momentum: float = option(0.99, "BYOL: the target's EMA rate at the first step; it rises to 1 on a cosine "
                                        "over train.max_steps")
    byol_predictor_hidden: int = option(512, "BYOL: hidden width of the predictor MLP")
    swav_weight: float = option(0.0, "SwAV: add this weight x each swapped-prediction term: an image's two views "
                                     "predict each other's Sinkhorn assignment to learned prototypes, and an "
                                     "image and its caption predict each other's")
    swav_prototypes: int = option(64, "SwAV: prototypes per space (image views; the joint image-text space)")
    swav_temperature: float = option(0.1, "SwAV: softmax temperature of the predicted assignment")
    swav_epsilon: float = option(0.02, "SwAV: Sinkhorn's entropy weight (smaller: harder assignments). The paper's "
                                       "0.05 let a small tower's views drift together on the toy emoji set "
                                       "(spread 0.049 -> 0.033 in 30 steps); 0.02 spread them (-> 0.069)")
    swav_iterations: int = option(3, "SwAV: Sinkhorn-Knopp iterations")
    swav_freeze_steps: int = option(0, "SwAV: the prototypes get no update for this many optimizer steps")
    swav_queue_size: int = option(0, "SwAV: the last this many images (over all processes) join the Sinkhorn "
                                     "step, for small batches; 0: none")


@dataclass
class EvalSpec(SourceSpec):
    """One named evaluation: a dataset and a task. Its metrics are logged as `<name>/<metric>`.

    task: `retrieval` (image<->text R@k over every caption of every image) or `zero_shot`
    (classify each image among class names turned into prompts).
    Class names come from `class_names` (a list, a comma-separated string or a file), else from the
    `label_column`: its ClassLabel names, or its distinct strings (sorted).
    """

    split: str = option("validation", "the split to read")
    task: Literal["retrieval", "zero_shot"] = option("retrieval", "retrieval | zero_shot")
    image_id_column: str | None = option(None, "retrieval: rows sharing this id are one image")
    label_column: str = option("label", "zero_shot: the column with each image's class")
    class_names: str | list[str] | None = option(None, "zero_shot: a list, 'a,b,c' or a file, one per line")
    templates: str = option("auto", "zero_shot prompts: auto (what the model recommends from the style of its "
                                    "training captions, else simple) | simple | ensemble | name | a file")
    per_class_prompts: str | None = option(None, "zero_shot: a JSON file {class name: [prompt, ...]}")
    every: int = option(0, "during training: every N steps (0: only at the end)")
    max_samples: int | None = option(None, "evaluate on at most this many rows")
    confusion_matrix: str | None = option(None, "zero_shot: draw the confusion matrix to this PNG")


@dataclass
class EvalConfig:
    """Evaluation during and after training: the named sets, retrieval's k, the best model, retention."""

    batch_size: int = option(256, "evaluation batch size")
    retrieval_ks: list[int] = option(help="the k of each R@k", factory=lambda: [1, 5, 10])
    chunk_size: int = option(1024, "retrieval scores this many queries at once: memory O(chunk x N)")
    # e.g. sets: {zs_emoji: {task: zero_shot, dataset: builtin:emoji, label_column: name, every: 200}}
    sets: dict[str, EvalSpec] = option(help="named evaluations run during and after training", factory=dict)
    best_metric: str | None = option(None, "keep <output_dir>/best by this metric, e.g. val/image_to_text_R@1")
    best_mode: Literal["max", "min"] = option("max", "whether a larger best_metric is better")
    # Fine-tuning a pretrained model: what it must keep, e.g. retention: [keep/top1] with a
    # `keep` set on data outside the fine-tuning task. Measured before the first step.
    retention: list[str] = option(help="metrics (<set>/<metric>, larger is better) whose drop from step 0 is "
                                       "logged as retention/<set>/<metric> = value / step-0 value", factory=list)
    stop_if_retention_below: float | None = option(None, "stop the run (with a checkpoint) when a retention "
                                                         "metric falls below this fraction of its step-0 value")


@dataclass
class HubConfig:
    """Publishing. `export` writes `<output_dir>/export`: the model as transformers (CLIPModel /
    VisionTextDualEncoderModel where the pooling allows) and sentence-transformers load it, with a
    model card. `push` uploads that folder to `repo_id`; the token comes from HF_TOKEN or the Hub
    login, never from this config."""

    export: bool = option(True, "write <output_dir>/export for transformers / sentence-transformers")
    push: bool = option(False, "upload the export to hub.repo_id")
    repo_id: str | None = option(None, "user/name or org/name")
    private: bool = option(False, "create the repo private")
    revision: str | None = option(None, "branch to push to")
    commit_message: str | None = option(None, "the commit message")
    license: str | None = option(None, "the card's Hub licence id (e.g. apache-2.0); default: the training data's "
                                       "where mmcl knows it (the built-in emoji: cc-by-sa-4.0), else none")
    datasets: list[str] | None = option(None, "the card's training datasets (Hub ids); default: data.train when "
                                              "it is one")
    language: list[str] | None = option(None, "the card's languages of the captions (e.g. [en])")
    base_model: list[str] | None = option(None, "the card's base models (Hub ids); default: model.init_from, else "
                                                "the towers' Hub ids")


@dataclass
class Config:
    """A whole run: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
