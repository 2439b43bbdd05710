"""Applications of a trained model: zero-shot predict, embed and search (`predict`), the local web
demo (`demo`), and WiSE-FT's weight-space mix of a pretrained and a fine-tuned model (`wise_ft`)."""
