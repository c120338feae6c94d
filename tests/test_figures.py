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


# --- the figures' panels against the JSON they are drawn from (matplotlib, drawn in memory) -----

import json  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(REPO / "experiments"))


def results(name: str) -> dict:
    return json.loads((REPO / "results" / name).read_text())


@pytest.fixture
def figures():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    import figures as module
    yield module
    plt.close("all")


@pytest.mark.parametrize("name", ["structured_experiment.json", "whisper_ctc_structured_experiment.json"])
def test_clustering_figure_splits_data_free_and_recovery(figures, name):
    structured = results(name)
    figure = figures.plot_clustering_against_parameters(structured)
    recovery = structured["recovery_summary"]
    assert len(figure.axes) == (2 if recovery else 1)
    dense = 100 * structured["dense"]["pooled"]
    for axes in figure.axes:      # the dense model: a horizontal line in every panel
        lines = [line for line in axes.get_lines() if line.get_label().startswith("dense")]
        assert len(lines) == 1 and list(lines[0].get_ydata()) == pytest.approx([dense, dense])
    free = figure.axes[0]
    assert free.get_title().startswith("no training")
    uniform_mean = sorted((r["params_total"], 100 * r["clustered"]["pooled"]) for r in structured["cluster"]["runs"]
                          if r["rule"] == "mean" and r["mix"] == "uniform" and not r["fold"])
    line = next(line for line in free.get_lines() if line.get_label() == "clustering, mean merge (paper), uniform K")
    assert list(line.get_ydata()) == pytest.approx([w for _, w in uniform_mean])
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert sum(label.startswith("dense") for label in legend) == 1
    if recovery:
        tuned = figure.axes[1]
        assert "recovery" in tuned.get_title()
        for arm, label in (("structured", "structured magnitude"), ("mean", "clustering, mean merge")):
            bars = next(c for c in tuned.containers if c.get_label().startswith(label))   # errorbar's
            assert list(bars.lines[0].get_ydata()) == pytest.approx(
                [100 * r["wer_pooled"][0] for r in sorted(recovery, key=lambda r: -r["sparsity"]) if r["arm"] == arm])
        assert sum(label.endswith("(3 seeds)") for label in legend) == 3
    else:
        assert "no recovery runs" in free.get_title()


def test_l0_figure_has_the_wer_panel_and_blocks_from_zero(figures):
    structured = results("structured_experiment.json")
    figure = figures.plot_l0_shapes(structured)
    assert len(figure.axes) == 6          # WER, heads, q/k dims, value dims, FFN units; the legend's
    wer = figure.axes[0]
    summary = {row["arm"]: row["wer_pooled"][0] for row in structured["l0_summary"]}
    expected = [100 * summary[arm] for setting in structured["l0_settings"]
                for arm in (setting, f"structured-{setting}")]
    assert [bar.get_height() for bar in wer.patches] == pytest.approx(expected)
    assert [line.get_ydata()[0] for line in wer.get_lines() if len(line.get_xdata()) == 2 and
            line.get_xdata()[0] == 0] == pytest.approx([100 * structured["dense"]["pooled"]])
    for axes in figure.axes[1:5]:
        assert axes.get_xlabel() == "block"
        assert [t.get_text() for t in axes.get_xticklabels()] == [str(b) for b in range(6)]


def test_whisper_cluster_figure_drops_the_heads_panel_and_labels_its_points(figures):
    whisper = results("whisper_cluster.json")
    figure = figures.plot_whisper_clustering(whisper)
    assert len(figure.axes) == 1
    axes = figure.axes[0]
    ffn = [100 * r["wer"]["real"] for r in whisper["runs"] if r["units"] == "ffn"]
    labels = sorted(text.get_text() for text in axes.texts)
    assert labels == sorted(f"{w:,.0f}" if w >= 100 else f"{w:.1f}" for w in ffn)
    heads = [100 * r["wer"]["real"] for r in whisper["runs"] if r["units"] == "heads+ffn"]
    note = figure.get_supxlabel()
    assert f"the {len(heads)} rows that also remove heads" in note
    assert f"{min(heads):.0f}–{max(heads):,.0f}% WER" in note and min(heads) >= 98


def test_allocation_cell_text_is_readable(figures):
    figure = figures.plot_allocation(results("spg_experiment.json"), 0.8)
    assert all(text.get_fontsize() >= 9 for axes in figure.axes for text in axes.texts)


def test_redraw_writes_the_figures_the_readme_shows(figures, tmp_path):
    written = []
    for path in sorted((REPO / "results").glob("*.json")):
        (tmp_path / path.name).write_text(path.read_text())
        written += [p.name for p in figures.redraw(tmp_path / path.name)]
    assert sorted(written) == sorted(p.name for p in (REPO / "results").glob("*.png"))
