"""The notebooks' prose against the code defaults and the committed results it quotes.

Nothing is executed: each test reads the .ipynb JSON (and, where a sentence describes a printed
figure, the stored output of the cell that prints it) and checks the words and numbers against
spg's constants and results/*.json. Cells are found by what they say, not by their position, so
adding a cell does not break these tests.
"""

import ast
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spg.compress import l0, self_pinching  # noqa: E402
from spg.compress.clustering import cluster_compress  # noqa: E402

NOTEBOOKS = REPO / "notebooks"
RESULTS = REPO / "results"
NUMBER_WORDS = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def cells(name: str) -> list[dict]:
    return json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def find(name: str, kind: str, *needles: str) -> tuple[int, dict]:
    """The one cell of `kind` in notebook `name` whose source holds every needle."""
    found = [(i, c) for i, c in enumerate(cells(name))
             if c["cell_type"] == kind and all(n in source(c) for n in needles)]
    assert len(found) == 1, f"{name}: {len(found)} {kind} cells hold {needles}"
    return found[0]


def printed(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))


def flat(text: str) -> str:
    """Markdown with its line breaks as spaces."""
    return re.sub(r"\s+", " ", text)


def results(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def test_every_code_cell_parses():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for index, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] == "code":
                ast.parse(source(cell), filename=f"{path.name} cell {index}")


def test_ctc_title_matches_the_printed_argmax():
    _, code = find("01_model_and_loader.ipynb", "code", "frame-wise arg-max", "title=")
    assert "one spike per character" not in source(code)
    argmax = printed(code).splitlines()[1]
    _, text = find("01_model_and_loader.ipynb", "markdown", "## Greedy CTC decoding")
    runs = re.findall(r"`([A-Z]{2,})`", source(text))
    assert runs and all(run in argmax for run in runs), (runs, argmax)


def test_threshold_learning_rate_text_matches_default_threshold_lr():
    _, text = find("02_self_pinching_gates.ipynb", "markdown", "## A short real SPG run")
    words = flat(source(text))
    assert "our default too" not in words and "2e-3" not in words
    assert "default_threshold_lr(lr, steps)" in words
    travel, cap = re.search(r"is ([\d.]+) / steps, at most ([\de.-]+) and never below the weights' lr", words).groups()
    assert float(travel) == self_pinching.THRESHOLD_TRAVEL and float(cap) == self_pinching.THRESHOLD_LR_MAX
    _, code = find("02_self_pinching_gates.ipynb", "code", "threshold_lr=default_threshold_lr(")
    lr, steps = re.search(r"default_threshold_lr\(([\de.-]+), (\d+)\)", source(code)).groups()
    assert f"TrainConfig(steps={steps}" in source(code) and f"lr={lr}" in source(code)
    used = self_pinching.default_threshold_lr(float(lr), int(steps))
    quoted = re.search(rf"Here that is [\d.]+ / {steps} = ([\d.]+), capped at ([\de.-]+): (\d+)× the weights' "
                       rf"{re.escape(lr)}", words)
    assert quoted, words
    assert float(quoted.group(1)) == pytest.approx(self_pinching.THRESHOLD_TRAVEL / int(steps))
    assert float(quoted.group(2)) == used and int(quoted.group(3)) == round(used / float(lr))
    long_steps = int(re.search(r"from ([\d,]+) steps at lr", words).group(1).replace(",", ""))
    assert self_pinching.default_threshold_lr(float(lr), long_steps) == float(lr)
    assert self_pinching.default_threshold_lr(float(lr), long_steps - 1) > float(lr)


def test_clustering_rules_are_attributed_as_the_code_does():
    doc = flat(cluster_compress.__doc__)
    assert re.search(r'"mean" \(the centroid, the paper\'s\)', doc) and re.search(r'"sum_out" \([^)]*; ours\)', doc)
    _, text = find("03_parameter_clustering.ipynb", "markdown", "## WER before and after")
    words = flat(source(text))
    assert "paper's two merge rules" not in words
    assert "The paper's merge rule is `mean`" in words and "The others are ours: `sum_out`" in words
    _, earlier = find("03_parameter_clustering.ipynb", "markdown", "### `mean` against `sum_out`")
    assert "`sum_out` (ours, not in the paper)" in flat(source(earlier))


def test_clustering_demo_warns_with_the_measured_numbers():
    _, text = find("03_parameter_clustering.ipynb", "markdown", "## WER before and after")
    words = flat(source(text))
    quoted = re.search(r"mean with mixed K ([\d.]+)% against ([\d.]+)% for magnitude at the same mixed sizes, "
                       r"significantly worse \(MAPSSWE p = ([\de.-]+)\), and also behind magnitude at the uniform "
                       r"sizes used here \(([\d.]+)%\)", words)
    assert quoted, words
    runs = {(r["sparsity"], r["mix"], r["fold"], r["rule"]): r
            for r in results("structured_experiment.json")["cluster"]["runs"]}
    mixed, uniform = runs[(0.3, "mixed", False, "mean")], runs[(0.3, "uniform", False, "mean")]
    test = mixed["clustered_vs_magnitude"]["pooled"]
    assert test["significant"] and not test["first_better"]
    assert float(quoted.group(1)) == round(100 * mixed["clustered"]["pooled"], 2)
    assert float(quoted.group(2)) == round(100 * mixed["magnitude"]["pooled"], 2)
    assert float(quoted.group(3)) == float(f"{test['p']:.2g}")
    assert float(quoted.group(4)) == round(100 * uniform["magnitude"]["pooled"], 2)
    assert mixed["clustered"]["pooled"] > uniform["magnitude"]["pooled"]
    # the demo's own numbers as the text quotes them: mixed-K clustering ahead of magnitude at the
    # uniform sizes (two different shapes, what a reader could misread), behind magnitude at its
    # own mixed sizes (the same-size comparison, which agrees with the measured table)
    _, demo = find("03_parameter_clustering.ipynb", "code", '"cluster mean, mixed K"', "evaluate_corpus")
    wer = {line.split(" WER ")[0].strip(): float(line.split(" WER ")[1].split("%")[0])
           for line in printed(demo).splitlines() if " WER " in line}
    assert wer["structured magnitude, mixed K"] < wer["cluster mean, mixed K"] < wer["structured magnitude"]
    on_demo = re.search(r"On these 40, mean with mixed K \(([\d.]+)%\) is ahead of magnitude at the \*uniform\* "
                        r"sizes \(([\d.]+)%\), .*against magnitude at its own mixed sizes \(([\d.]+)%\), the "
                        r"comparison that counts, it is behind", words)
    assert on_demo, words
    assert [float(value) for value in on_demo.groups()] == [
        wer["cluster mean, mixed K"], wer["structured magnitude"], wer["structured magnitude, mixed K"]]
    # "no clustering rule beats structured magnitude" on the whole corpus
    _, measured = find("03_parameter_clustering.ipynb", "markdown", "## Measured on the whole corpus")
    assert "no clustering rule beats structured magnitude" in flat(source(measured))
    for run in runs.values():
        test = run["clustered_vs_magnitude"]["pooled"]
        assert not (test["significant"] and test["first_better"])
        if run["rule"] in ("mean", "sum_out"):
            assert test["significant"]


def test_l0_panels_and_settings_match_the_code_and_results():
    _, code = find("04_hard_concrete_pruning.ipynb", "code", "deterministic_masks()", "subplots(1, 3")
    assert '(axes[0], query, "query/key dims' in source(code) and '(axes[1], value, "value dims' in source(code)
    assert 'axes[2].barh' in source(code)
    _, text = find("04_hard_concrete_pruning.ipynb", "markdown", "## Which heads and dimensions survive")
    words = flat(source(text))
    assert re.search(r"\*\*Left\*\*: the query/key dimensions", words)
    assert re.search(r"\*\*Middle\*\*: the value dimensions", words)
    assert re.search(r"\*\*Right\*\*: the FFN neurons", words)

    structured = results("structured_experiment.json")
    settings = structured["l0_settings"]
    _, measured = find("04_hard_concrete_pruning.ipynb", "markdown", "## Measured: what L0 keeps")
    words = flat(source(measured))
    assert f"with {NUMBER_WORDS[len(settings)]} gate settings" in words
    assert all(f"(`{name}`)" in words for name in settings)
    assert f"L0 to {100 * structured['l0_sparsity']:.0f}% for {structured['l0_steps']} steps" in words
    assert f"{len(structured['seeds'])} seeds each" in words
    assert settings["l0-heads-lr"] == ["--gate-lr", "heads=0.02"] and "learning rate 0.02" in words
    assert f"instead of {l0.GATE_LR:g}" in words
    ramp = float(settings["l0-short-ramp"][1])
    assert f"ramped over {100 * ramp:.0f}% of the steps instead of {100 * l0.TARGET_WARMUP_FRACTION:.0f}%" in words
    printed_arms = [line.split()[0] for line in printed(find("04_hard_concrete_pruning.ipynb", "code",
                                                             "l0_summary")[1]).splitlines()[1:] if line.strip()]
    assert [arm for arm in printed_arms if not arm.startswith("structured-")] == list(settings)


def test_micro_macro_text_matches_the_printed_figures():
    _, code = find("05_wer_and_significance.ipynb", "code", "mean sentence WER")
    output = printed(code)
    toy = re.search(r"toy: corpus WER ([\d.]+), mean sentence WER ([\d.]+)", output).groups()
    real = re.search(r"real: corpus WER ([\d.]+), mean sentence WER ([\d.]+)", output).groups()
    _, text = find("05_wer_and_significance.ipynb", "markdown", "On the real outputs the two averages")
    words = flat(source(text))
    if real[0] == real[1]:
        assert f"equal to four digits ({real[0]} both)" in words
    else:
        assert "equal" not in words.split("## MAPSSWE")[0]
    assert f"as in the toy pair ({toy[0]} against {toy[1]})" in words
    assert toy[0] != toy[1]


def test_lossless_rings_are_described_as_the_results_have_them():
    experiment = results("spg_experiment.json")
    none_lossless = all(run["pooled_vs_dense"]["worse"] for run in experiment["runs"])
    assert none_lossless == all(value == 0 for seeds in experiment["max_lossless"].values() for value in seeds)
    _, text05 = find("05_wer_and_significance.ipynb", "markdown", "Notebook 6's sweep plot")
    _, text06 = find("06_results.ipynb", "markdown", "## WER against sparsity")
    for words in (flat(source(text05)), flat(source(text06))):
        assert ("no ring" in words) == none_lossless, words
    assert f"below {100 * min(experiment['sparsities']):.0f}%, the lowest sparsity measured" in flat(source(text06))


def test_whisper_finetune_legend_matches_the_significance_in_the_json():
    rows = results("whisper_finetune.json")["rows"]
    tests = [test for row in rows for test in row["mapsswe"].values()]
    _, code = find("06_results.ipynb", "code", "whisper_finetune.json", "fig.legend")
    legend = source(code).split("fig.legend", 1)[1]
    labels = re.findall(r'label="([^"]+)"', legend)
    assert ("significantly worse than uncompressed" in labels) == any(t["significant"] and t["worse"] for t in tests)
    assert ("significantly better than uncompressed" in labels) == \
        any(t["significant"] and not t["worse"] for t in tests)
    assert ("no significant difference" in labels) == any(not t["significant"] for t in tests)
    assert "no significant difference from uncompressed" not in labels or all(not t["significant"] for t in tests)

    _, text = find("06_results.ipynb", "markdown", "## Whisper fine-tuning")
    words = flat(source(text))
    fine_tuned = [row for row in rows if not row["name"].endswith("-noft") and row["name"] != "dense"]
    assert all(row["mapsswe"]["real"]["worse"] for row in fine_tuned)
    assert all(row["mapsswe"]["test"]["significant"] and not row["mapsswe"]["test"]["worse"] for row in fine_tuned)
    low, high = re.search(r"p between ([\de.+-]+) and ([\de.+-]+)", words).groups()
    p_values = [row["mapsswe"]["test"]["p_value"] for row in fine_tuned]
    assert (float(low), float(high)) == (float(f"{min(p_values):.1g}"), float(f"{max(p_values):.1g}"))
    dense = next(row for row in rows if row["name"] == "dense")
    assert f"at {100 * dense['wer']['test']:.0f}% WER" in words


def test_testbed_claims_quote_the_summed_regime_json():
    """06's summary of the papers' claims quotes the summed-regime recovery and L0 tables as the
    JSON has them, and the signs it states (mean worse, representative level, L0 worse on every
    seed) are the JSON's per-seed MAPSSWE marks."""
    _, text = find("06_results.ipynb", "markdown", "### What the testbed says about each paper's claim")
    words = flat(source(text))
    summed = results("whisper_ctc_structured_summed.json")
    recovery = {row["arm"]: row for row in summed["recovery_summary"]}
    l0_rows = {row["arm"]: row for row in summed["l0_summary"]}
    pct = lambda row: f"{100 * row['wer_pooled'][0]:.2f}"  # noqa: E731
    assert (f"`mean` stays significantly worse than magnitude of the same size on every seed "
            f"({pct(recovery['mean'])} against {pct(recovery['structured'])}%) and `representative` is level with it "
            f"({pct(recovery['representative'])}%)") in words
    assert f"on every seed ({pct(l0_rows['l0'])} against {pct(l0_rows['structured-l0'])}%)" in words
    assert f"its gates end at {100 * l0_rows['l0']['sparsity_before_calibration'][0]:.0f}% expected sparsity" in words
    marks = lambda tests: {(c["pooled"]["significant"], c["pooled"]["first_better"]) for c in tests}  # noqa: E731
    by_arm = lambda arm: [c for c in summed["recovery"]["comparisons"] if c["first"] == arm]  # noqa: E731
    assert marks(by_arm("mean")) == {(True, False)} and {s for s, _ in marks(by_arm("representative"))} == {False}
    assert marks(summed["l0"]["comparisons"]) == {(True, False)} and len(summed["l0"]["comparisons"]) == 3
