"""The README's figures: every image it shows exists under results/, is a PNG under the size
limit, and every PNG under results/ is shown (no stale figures). Pixels are not compared: the
figures are drawn by experiments/figures.py from the results JSON they sit beside."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_FIGURE_BYTES = 200_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def readme_images() -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", (REPO / "README.md").read_text())


def test_every_readme_figure_exists_and_is_a_small_png():
    images = readme_images()
    assert images, "the README shows no figure"
    for image in images:
        path = REPO / image
        assert path.is_file(), f"README shows {image}, which does not exist"
        assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{image} is not a PNG"
        assert path.stat().st_size < MAX_FIGURE_BYTES, f"{image} is {path.stat().st_size:,} bytes"


def test_every_figure_under_results_is_shown_with_its_data():
    shown = {str(Path(image)) for image in readme_images()}
    for path in sorted((REPO / "results").glob("*.png")):
        name = str(path.relative_to(REPO))
        assert name in shown, f"{name} is not shown in the README"
        # <stem>.png or <stem>_<what>.png beside <stem>.json
        candidates = [path.with_suffix(".json"), path.with_name(path.stem.rsplit("_", 1)[0] + ".json")]
        assert any(c.is_file() for c in candidates), \
            f"{name} has no results JSON ({' or '.join(c.name for c in candidates)}) it was drawn from"
