"""Towers, the second stage: the dual encoder (`model`), building it from `ModelConfig` with its
tokenizer, image processor, freezing, LoRA and speed options (`build`, `lora`), vision backbones
beyond AutoModel (`backbones`, `efficientnet`), and loading any saved image–text model for use
(`inference.load_encoder`)."""
