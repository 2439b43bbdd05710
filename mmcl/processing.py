"""The tokenizer and image processor that go with a dual encoder, loaded or built."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerFast

from .config import ModelConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(captions: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A lower-casing BERT-style WordPiece tokenizer trained on `captions` (seconds).

    [SEP] gets id 3, not 2: CLIP's text pooling takes a legacy path when eos_token_id == 2.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   bos_token="[CLS]", eos_token="[SEP]")


def _source(cfg: ModelConfig, explicit: str | None, tower: str | None) -> str | None:
    return explicit or tower or cfg.init_from


def build_tokenizer(cfg: ModelConfig, captions: Iterable[str] | None = None) -> Any:
    """The configured tokenizer; or, for a random-init text tower, one trained on `captions`."""
    source = _source(cfg, cfg.tokenizer, cfg.text_model)
    if source:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if captions is None:
        raise ValueError("a random-init text tower needs model.tokenizer or captions to train one on")
    return train_wordpiece(captions, cfg.tokenizer_vocab_size)


def build_image_processor(cfg: ModelConfig) -> Any:
    """The vision tower's image processor, or a plain resize + normalise to `image_size`."""
    source = _source(cfg, cfg.image_processor, cfg.vision_model)
    if source:
        return AutoImageProcessor.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    from transformers import ViTImageProcessorPil  # the PIL backend: no torchvision needed

    size = cfg.image_size
    return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def fit_text_config(cfg: ModelConfig, tokenizer: Any) -> None:
    """Make a random-init text tower's config agree with a tokenizer it was not built for."""
    if cfg.text_model or cfg.init_from:
        return
    cfg.text_config["vocab_size"] = len(tokenizer)
    cfg.text_config.setdefault("pad_token_id", tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        cfg.text_config["eos_token_id"] = tokenizer.eos_token_id
        cfg.text_config.setdefault("bos_token_id", tokenizer.bos_token_id)


def load_processors(directory: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The (tokenizer, image processor) saved beside a model."""
    return (AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code),
            AutoImageProcessor.from_pretrained(str(directory), trust_remote_code=trust_remote_code))
