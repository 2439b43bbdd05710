"""Training: `setup` builds a run, `loop` trains it."""
