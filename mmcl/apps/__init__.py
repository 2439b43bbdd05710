"""Applications of a trained model: zero-shot predict, embed, search (`apps.predict`)."""
