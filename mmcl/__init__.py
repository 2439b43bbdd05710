"""mmcl: train, evaluate and publish CLIP-style image–text models on the Hugging Face stack."""

__version__ = "0.2.0"
