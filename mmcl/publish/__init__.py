"""Publishing a trained model: `export` (a folder transformers and sentence-transformers load
without mmcl), `card` (the model card), `push` (an allow-listed upload to the Hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..artifacts import EXPORT_DIR, FINAL_DIR, METRICS_NAME, write_json
from ..config import HubConfig


def publish_run(output_dir: str | Path, hub: HubConfig, metrics: dict[str, float],
                say: Callable[[str], None] = print) -> Path | None:
    """After training: export `<output_dir>/final` to `<output_dir>/export` with a model card,
    and push it when `hub.push`. Returns the export folder (None when `hub.export` is off)."""
    if not hub.export:
        return None
    from .export import export_model
    from .push import ensure_model_card, push_with_config

    output_dir = Path(output_dir)
    export_dir = output_dir / EXPORT_DIR
    report = export_model(output_dir / FINAL_DIR, export_dir)
    write_json(export_dir / METRICS_NAME, metrics)  # for the card; never uploaded
    ensure_model_card(export_dir, hub.repo_id, model_name=hub.repo_id or output_dir.name)
    kind = report.native_class or (f"{report.remote_code_class} with trust_remote_code, sentence-transformers"
                                   if report.remote_code_class else "sentence-transformers only")
    say(f"exported to {export_dir} ({kind})")
    if hub.push:
        say(f"pushed to the Hub: {push_with_config(export_dir, hub)}")
    return export_dir
