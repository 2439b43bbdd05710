"""`mmcl demo MODEL [--images FOLDER] [--port 7860]`: a local web page (gradio, the optional `demo`
extra) over any model mmcl loads. Zero-shot: an uploaded or picked image and typed labels give the
labels' probabilities as bars. Search (with `--images`): a text gives the folder's best-matching
images as a grid with their scores, the folder's embeddings cached as `mmcl search` caches them.

It runs offline: gradio's telemetry is off, nothing is shared, and the page is served on
127.0.0.1 only unless `--host` says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..evaluation.zero_shot import load_class_names
from .predict import folder_embeddings, list_images, load_for_inference, predict, text_embeddings

EXAMPLE_LABELS = "red heart, smiling face, cat, car, tree"  # class names: the templates add "a photo of a ..."
TEMPLATE_CHOICES = ("auto", "name", "simple", "ensemble")


def import_gradio() -> Any:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before the import: no telemetry, no update check
    try:
        import gradio
    except ImportError as err:
        raise ConfigError('mmcl demo needs gradio: pip install "mmcl[demo]"') from err
    return gradio


def unreadable_reason(path: str) -> str:
    """Why mmcl's decoder refuses an image file, in a few words."""
    from ..data.images import load_image

    try:
        load_image(path)
    except Exception as err:  # what the decoder says: a truncated file, not an image, too large, ...
        return f"{type(err).__name__}: {err}"[:300]
    return "its decoded pixels could not be prepared for the model"


def build_demo(model: str, images: str | None = None) -> Any:
    """The page as a `gradio.Blocks`; the model is loaded, and the folder embedded (or its cached
    embeddings read), once here."""
    gr = import_gradio()
    if images:
        list_images([images])  # no folder, or no images in it: fail before the model loads
    bundle, accelerator = load_for_inference(model)
    paths, embeds, _ = folder_embeddings(bundle, accelerator, Path(images)) if images else ([], None, False)

    def classify(image: str | None, labels: str, templates: str = "auto") -> dict[str, float]:
        if not image:
            raise gr.Error("upload or pick an image")
        names = load_class_names(labels.replace("\n", ","))  # as `mmcl predict --labels`
        if len(names) < 2:
            raise gr.Error("type at least two labels, separated by commas")
        row = predict(bundle, accelerator, [Path(image)], names, templates, top_k=len(names))[0]
        if "error" in row:
            raise gr.Error(f"{Path(image).name}: cannot read this image ({unreadable_reason(image)})")
        return {top["label"]: top["prob"] for top in row["top"]}

    def find(query: str, top_k: float) -> list[tuple[str, str]]:
        if not query.strip():
            raise gr.Error("type a text to search for")
        scores = (text_embeddings(bundle, accelerator, [query.strip()]) @ embeds.T)[0]  # cosine: both normalised
        top = scores.topk(min(int(top_k), len(paths)))
        return [(str(paths[i]), f"{float(v):.3f}  {paths[i].name}") for v, i in zip(top.values, top.indices)]

    with gr.Blocks(title=f"mmcl demo: {model}") as demo:
        gr.Markdown(f"### mmcl demo\nModel: `{model}`")
        with gr.Tab("Zero-shot"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", image_mode=None, label="image")  # the file as uploaded:
                    # mmcl composites transparency on white itself, as `mmcl predict` does
                    labels = gr.Textbox(label="labels (comma-separated)", value=EXAMPLE_LABELS)
                    templates = gr.Dropdown(list(TEMPLATE_CHOICES), value="auto", label=(
                        f"prompts (auto: this model's, {bundle.templates or 'simple'}; name: the bare label; simple: "
                        "a photo of a <label>.; ensemble: 20 phrasings averaged)"))
                    classify_button = gr.Button("Classify", variant="primary")
                probabilities = gr.Label(label="zero-shot probabilities", num_top_classes=10)
            if images:
                gr.Examples(examples=[[str(p)] for p in list_images([images])[:8]], inputs=[image],
                            label="pick an image of the folder")
            classify_button.click(classify, [image, labels, templates], probabilities)
        if images:
            with gr.Tab("Search"):
                query = gr.Textbox(label="text", placeholder="a red heart")
                top_k = gr.Slider(1, 48, value=12, step=1, label="images shown")
                search_button = gr.Button("Search", variant="primary")
                grid = gr.Gallery(label="best matches", columns=6, object_fit="contain", height="auto")
                search_button.click(find, [query, top_k], grid)
                query.submit(find, [query, top_k], grid)
    return demo


def serve(model: str, images: str | None, host: str, port: int) -> None:
    demo = build_demo(model, images)
    allowed = [str(Path(images).resolve())] if images else None  # the grid shows the folder's own files
    demo.launch(server_name=host, server_port=port, share=False, allowed_paths=allowed, inbrowser=False,
                show_error=True)  # an image it cannot read says why, not a bare "Error"
