"""Data, the first stage: image–caption datasets from a reference to batches. `sources` (what a
dataset reference means, and loading it), `images` (decoding one image cell safely), `pairs` (the
`PairRecipe`, map-style training pairs and their collator), `streaming` (streamed pairs),
`loader` (the training loader or stream and `TrainBatches`), `augment`, `embed` (batch embedding
through a loaded model), `clusters` and `mining` (hard negatives), `emoji` (the built-in set), and
`rows` / `check` / `convert` (`mmcl data`). Nothing here loads a model: tools that need one take it
loaded."""
