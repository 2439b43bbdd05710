"""The front door stays short and true: the README maps every module, fits in one sitting, and
docs/configuration.md is the config dataclasses as they are now."""

from tests.conftest import REPO

README = REPO / "README.md"


def test_the_readme_map_names_every_module():
    text = README.read_text(encoding="utf-8")
    missing = []
    for path in sorted((REPO / "mmcl").rglob("*.py")):
        relative = path.relative_to(REPO / "mmcl")
        if relative.name in ("__init__.py", "__main__.py"):
            continue
        folders = [f"{'/'.join(relative.parts[:i])}/" for i in range(2, len(relative.parts))]  # e.g. evaluation/hf_evaluate/
        if f"`{relative.as_posix()}`" not in text and not any(f"`{folder}`" in text for folder in folders):
            missing.append(relative.as_posix())
    assert missing == [], f"add these to README.md's map: {missing}"


def test_the_readme_fits_in_one_sitting():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 350
    paragraph, longest, fenced = 0, 0, False
    for line in lines:
        fenced ^= line.startswith("```")
        prose = line.strip() and not fenced and not line.startswith(("|", "#", "```"))
        paragraph = paragraph + 1 if prose else 0
        longest = max(longest, paragraph)
    assert longest <= 15


def test_the_configuration_page_is_current():
    from mmcl.cli.train import config_markdown

    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == config_markdown() + "\n", "run: python scripts/config_docs.py"
