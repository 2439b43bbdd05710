"""Image<->text retrieval Recall@k as a Hugging Face `evaluate` metric (wraps mmcl.evaluation.metrics).

Load it offline by path: ``mmcl.evaluation.hf_evaluate.load_metric("retrieval")``.
"""

import evaluate
import torch

from mmcl.evaluation.hf_evaluate import metric_info
from mmcl.evaluation.metrics import retrieval_metrics

_DESCRIPTION = """
Image->text and text->image retrieval Recall@k, median and mean rank, with several captions per
image (an image query is a hit at k if any of its captions is in its top k). Similarity is the
float32 dot product of L2-normalised embeddings; ties go to the lower candidate index.
"""

_KWARGS_DESCRIPTION = """
The streamed rows are captions; the images are passed whole to `compute`, because their number
differs from the number of captions.

Args:
    text_embeds: one embedding (D floats) per caption; accumulate with `add_batch`/`compute`.
    text_to_image: per caption, the int index of its image in `image_embeds`.
    image_embeds: (N_img, D) array/tensor/list of image embeddings, keyword of `compute` only.
    ks: Recall@k to report (default (1, 5, 10)).
    chunk_size: queries scored at once (memory O(chunk_size * N)), default 1024.
Returns:
    dict with `image_to_text_R@{k}`, `text_to_image_R@{k}` (fractions) and
    `{image_to_text,text_to_image}_{median,mean}_rank` (1-based).
Example:
    >>> metric = load_metric("retrieval")
    >>> metric.add_batch(text_embeds=[[1.0, 0.0], [0.0, 1.0]], text_to_image=[0, 1])
    >>> metric.compute(image_embeds=[[1.0, 0.0], [0.0, 1.0]], ks=(1,))["text_to_image_R@1"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Retrieval(evaluate.Metric):
    """Recall@k and rank statistics for image<->text retrieval."""

    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, {"text_embeds": "float32 list", "text_to_image": "int64"})

    def _compute(self, text_embeds, text_to_image, image_embeds=None, ks=(1, 5, 10), chunk_size=1024) -> dict:
        if image_embeds is None:
            raise ValueError("retrieval needs image_embeds=(N_img, D) passed to compute()")
        images = torch.as_tensor(image_embeds, dtype=torch.float32)  # (N_img, D)
        texts = torch.tensor(text_embeds, dtype=torch.float32).reshape(len(text_embeds), -1)  # (N_txt, D)
        return retrieval_metrics(
            images, texts, torch.tensor(text_to_image, dtype=torch.long), ks=tuple(ks), chunk_size=chunk_size
        )
