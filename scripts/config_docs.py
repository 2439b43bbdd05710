"""Write docs/configuration.md from the config dataclasses (tests/test_docs.py checks it is current).

Run:  python scripts/config_docs.py
"""

from pathlib import Path

from mmcl.cli.train import config_markdown

if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    path.write_text(config_markdown() + "\n", encoding="utf-8")
    print(f"wrote {path}")
