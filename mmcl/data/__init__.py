"""Image–caption data: `sources` (what a dataset reference means, and loading it), `images`
(decoding one image cell), `pairs` (map-style training pairs), `streaming` (streamed training
pairs), `augment`, `emoji` (the built-in set), `rows` / `check` / `convert` (`mmcl data`)."""
