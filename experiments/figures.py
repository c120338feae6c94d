"""Figures of the measured results, drawn from the results JSON files (matplotlib, a
notebook/experiment dependency only). The experiments call these to write the PNGs under results/
that the README shows; notebooks/06_results.ipynb calls the same functions to draw them inline.

    plot_wer_against_sparsity(experiment)  # results/spg_experiment.json -> WER vs sparsity, one line per method
    plot_allocation(experiment)            # SPG's learned per-matrix sparsity against global magnitude's
    ...                                    # and the structured experiment's, Whisper clustering's

The reports write their PNGs through write_spg_figures / write_structured_figures (and
whisper_cluster.py through plot_whisper_clustering); `python experiments/figures.py
results/<name>.json ...` calls the same functions on the committed JSON, so a figure can be
redrawn without the runs folder (the JSON holds the report's dict with its floats rounded to 5
significant digits: the same figure, to the pixel in all but the last digit of a label).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

LABELS = {"spg": "SPG (authors' balance, default)", "spg-mean": "SPG, earlier settings (mean CTC)",
          "ump": "UMP (uniform magnitude)", "gmp": "GMP (global magnitude)",
          "mixed": "mixed (SPG's sparsities, magnitude masks)"}
# the ablation arms (one ingredient of the default changed; at 70 % only, so not in the line plot)
ABLATION_LABELS = {"spg-slow": "SPG, thresholds at the weights' lr", "spg-mean-fast": "SPG, mean CTC + eta', fast thresholds",
                   "spg-on-off": "SPG, on/off controller + resets"}
# the six prunable matrices of a block, by the last part of their name (wav2vec2's, Whisper's)
SHORT_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "out", "intermediate_dense": "fc1",
               "output_dense": "fc2", "fc1": "fc1", "fc2": "fc2"}


def block_matrices(per_matrix: dict) -> list[str]:
    """The matrix names of block 0 without the "encoder.layers.0." prefix, in table order
    ("attention.q_proj", ... for wav2vec2; "self_attn.q_proj", ..., "fc2" for Whisper)."""
    prefix = "encoder.layers.0."
    return [name[len(prefix):] for name in per_matrix if name.startswith(prefix)]


def _pyplot():
    import matplotlib
    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg"):
        matplotlib.use("Agg")          # no display needed when an experiment writes a PNG
    import matplotlib.pyplot as plt
    return plt


def show(figure, dpi: int = 100) -> None:
    """Display `figure` in a notebook as a 256-colour PNG at `dpi`, then close it: about a third
    of the bytes of the inline backend's PNG, so notebook 6 (committed executed) keeps every
    figure at full resolution and stays under 1 MB."""
    import io

    from IPython.display import Image, display
    from PIL import Image as Picture
    drawn = io.BytesIO()
    figure.savefig(drawn, format="png", dpi=dpi)
    _pyplot().close(figure)
    small = io.BytesIO()
    Picture.open(drawn).convert("RGB").quantize(colors=256).save(small, format="PNG", optimize=True)
    display(Image(small.getvalue()))


def plot_wer_against_sparsity(experiment: dict, path: Optional[Path] = None, split: str = "wer_pooled"):
    """WER (mean ± s.d. over seeds) against sparsity, one line per arm, the dense model as a
    dashed line, and a ring around the points where no seed's run is significantly worse than
    dense (MAPSSWE, alpha 0.05, pooled dev+test: "lossless"); right, each arm's WER minus the
    GMP run's of the same seed (mean ± s.d. over the seeds both have). Written to `path` when given."""
    plt = _pyplot()
    dense = experiment["dense_wer_pooled"] if split == "wer_pooled" else experiment["dense_wer"]["test-unseen"]
    figure, (axes, against_gmp) = plt.subplots(1, 2, figsize=(12.5, 4.8), dpi=100,
                                               gridspec_kw={"width_ratios": (3, 2)})
    rows = experiment["summary"]
    any_lossless = False
    for index, arm in enumerate(LABELS):
        points = sorted((r["sparsity"], r[split]) for r in rows if r["arm"] == arm)
        if not points:
            continue
        offset = (index - 2) * 0.003           # a small horizontal offset so error bars do not overlap
        xs = [100 * (s + offset) for s, _ in points]
        ys = [100 * m for _, (m, _) in points]
        errors = [100 * sd for _, (_, sd) in points]
        line = axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=LABELS[arm], color=f"C{index}")
        if split == "wer_pooled":       # ring the points no seed made significantly worse than dense
            lossless = [(x, y) for (s, _), x, y in zip(points, xs, ys)
                        if not any(r["pooled_vs_dense"]["worse"] for r in experiment["runs"]
                                   if r["arm"] == arm and r["sparsity"] == s)]
            any_lossless = any_lossless or bool(lossless)
            if lossless:
                axes.scatter(*zip(*lossless), s=160, facecolors="none", edgecolors=line[0].get_color(), linewidths=1.5)
    axes.axhline(100 * dense, color="black", linestyle="--", linewidth=1, label=f"dense ({100 * dense:.2f}%)")
    where = "dev + test (seen speakers)" if split == "wer_pooled" else "test-unseen (held-out voices)"
    ring = "" if split != "wer_pooled" else "; ringed: no seed significantly worse than dense" if any_lossless \
        else "\nnone lossless: every run is significantly worse than dense (MAPSSWE, α = 0.05)"
    counts = sorted({r["n"] for r in rows if r["arm"] in LABELS})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    model = experiment.get("model", "the shipped model")
    axes.set_title(f"Unstructured pruning of {model}: WER on {where}\n"
                   f"{experiment['steps']} steps, batch {experiment['batch_size']}, mean ± s.d. over "
                   f"{seeds} seeds{ring}", fontsize=10)
    axes.set_xlabel("global sparsity of the prunable matrices (%)")
    axes.set_ylabel("word error rate (%)")
    axes.set_xticks([100 * s for s in experiment["sparsities"]])
    axes.grid(alpha=0.3)
    axes.legend(fontsize=9, loc="upper left", framealpha=0.9)
    plot_difference_to_gmp(experiment, against_gmp, split)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure


def plot_difference_to_gmp(experiment: dict, axes, split: str = "wer_pooled") -> None:
    """On `axes`: per sparsity, each arm's WER minus GMP's on the same seed (points), mean ± s.d."""
    import statistics
    by_key = {(r["arm"], r["sparsity"], r["seed"]): r[split] for r in experiment["runs"]}
    arms = [arm for arm in LABELS if arm != "gmp" and any(key[0] == arm for key in by_key)]
    for index, arm in enumerate(arms):
        xs, means, sds = [], [], []
        for sparsity in sorted(experiment["sparsities"]):
            differences = [100 * (by_key[arm, sparsity, seed] - by_key["gmp", sparsity, seed])
                           for seed in experiment["seeds"]
                           if (arm, sparsity, seed) in by_key and ("gmp", sparsity, seed) in by_key]
            if differences:
                xs.append(100 * sparsity + (index - len(arms) / 2) * 0.4)
                means.append(statistics.mean(differences))
                sds.append(statistics.stdev(differences) if len(differences) > 1 else 0.0)
        if xs:
            axes.errorbar(xs, means, yerr=sds, marker="o", linestyle="none", capsize=3, label=LABELS[arm],
                          color=f"C{list(LABELS).index(arm)}")
    axes.axhline(0, color=f"C{list(LABELS).index('gmp')}", linewidth=1)
    axes.set_title("WER minus GMP's, same seed (points; below 0: better than GMP)", fontsize=10)
    axes.set_xlabel("global sparsity of the prunable matrices (%)")
    axes.set_ylabel("ΔWER against GMP (points)")
    axes.set_xticks([100 * s for s in experiment["sparsities"]])
    axes.grid(alpha=0.3)


def plot_allocation(experiment: dict, sparsity: float = 0.7, path: Optional[Path] = None):
    """Block x matrix heat maps at `sparsity`: the per-matrix sparsity SPG learned (mean over
    seeds), global magnitude pruning's (the gmp run of seed 0) and their difference."""
    plt = _pyplot()
    runs = [r for r in experiment["runs"] if r["sparsity"] == sparsity]
    spg = [r["per_matrix_sparsity"] for r in runs if r["arm"] == "spg"]
    gmp = [r["per_matrix_sparsity"] for r in runs if r["arm"] == "gmp"][:1]
    if not spg or not gmp:
        raise ValueError(f"the experiment has no spg and gmp runs at sparsity {sparsity}")
    blocks = sorted({int(name.split(".")[2]) for name in spg[0]})

    matrices = block_matrices(spg[0])
    short = [SHORT_NAMES.get(m.rsplit(".", 1)[-1], m) for m in matrices]

    def grid(tables):
        return [[100 * sum(t[f"encoder.layers.{b}.{m}"] for t in tables) / len(tables) for m in matrices]
                for b in blocks]
    learned, magnitude = grid(spg), grid(gmp)
    difference = [[a - b for a, b in zip(ra, rb)] for ra, rb in zip(learned, magnitude)]
    figure, all_axes = plt.subplots(1, 3, figsize=(14, 1.6 + 0.55 * len(blocks)), dpi=100, layout="constrained")
    low = min(min(r) for r in learned + magnitude)
    high = max(max(r) for r in learned + magnitude)
    span = max(abs(v) for r in difference for v in r) or 1.0
    panels = ((f"SPG, learned (mean of {len(spg)} seeds)", learned, "viridis", low, high),
              ("global magnitude pruning", magnitude, "viridis", low, high),
              ("SPG − global magnitude (points)", difference, "coolwarm", -span, span))
    for axes, (title, values, colours, vmin, vmax) in zip(all_axes, panels):
        image = axes.imshow(values, cmap=colours, vmin=vmin, vmax=vmax, aspect="auto")
        axes.set_title(title, fontsize=11)
        axes.set_xticks(range(len(short)), short, fontsize=10)
        axes.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks], fontsize=10)
        for y, row in enumerate(values):
            for x, value in enumerate(row):
                axes.text(x, y, f"{round(value):d}", ha="center", va="center", fontsize=10,
                          color="white" if colours == "viridis" and value < (vmin + vmax) / 2 else "black")
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04).ax.tick_params(labelsize=9)
    correlation = [r["correlation_with_global_magnitude"] for r in runs if r["arm"] == "spg"]
    figure.suptitle(f"Per-matrix sparsity (%) at a {100 * sparsity:.0f}% global target; correlation of SPG's "
                    f"with global magnitude's {sum(correlation) / len(correlation):.2f} (mean over seeds)",
                    fontsize=11)
    if path is not None:
        figure.savefig(path)
    return figure


def plot_whisper_clustering(whisper: dict, path: Optional[Path] = None, dataset: str = "real"):
    """Whisper tiny.en without data or training: WER on real speech (`dataset`: "real" pools
    the 11 recordings, or one of them) against sparsity for clustering with each merge rule and
    structured magnitude pruning, FFN units compressed and every head kept, each point labelled
    with its WER. WER above 100 % (the decoder loops or emits junk) is drawn as a triangle at the
    100 % edge. The rows that also remove heads are not drawn (every one is at 98 % or more, so
    their lines lie on the 100 % edge): a note on the figure gives their range. The bias-fold,
    mixed-K and per-kind rows are in the table only."""
    plt = _pyplot()
    dense = 100 * whisper["dense"]["wer"][dataset]
    count = (sum(whisper["datasets"].get(name, 0) for name in ("librivox", "cards", "beckett"))
             if dataset == "real" else whisper["datasets"][dataset])

    def label_of(run: dict) -> str:
        label = "structured magnitude" if run["method"] == "magnitude" else f"clustering, merge {run['merge']}"
        return label + (", mixed K" if run["mixed"] else "")
    runs = [run for run in whisper["runs"] if not run.get("fold", False) and run["mixed"] in (False, True)]
    ffn = [run for run in runs if run.get("units", "heads+ffn") == "ffn"]
    heads = [100 * run["wer"][dataset] for run in whisper["runs"] if run.get("units", "heads+ffn") == "heads+ffn"]
    labels = sorted({label_of(run) for run in ffn})
    colours = dict(zip(labels, plt.cm.tab10.colors))
    figure, axes = plt.subplots(figsize=(8.5, 6.4), dpi=100, layout="constrained")
    groups: dict[str, list] = {}
    for run in ffn:
        groups.setdefault(label_of(run), []).append((run["sparsity"], 100 * run["wer"][dataset]))
    order = {label: index for index, label in enumerate(sorted(groups))}
    for label, points in sorted(groups.items()):
        points.sort()
        shift = 0.8 * (order[label] - (len(groups) - 1) / 2)   # a small offset: points at one sparsity stay apart
        xs = [100 * s + shift for s, _ in points]
        axes.plot(xs, [min(w, 100) for _, w in points], "-", color=colours[label], label=label)
        for x, (_, w) in zip(xs, points):
            axes.plot([x], [min(w, 100)], "^" if w > 100 else "o", color=colours[label], markersize=8)
            # the value beside its point; above 100 (all drawn at the edge) stacked one row per method
            axes.annotate(f"{w:,.0f}" if w >= 100 else f"{w:.1f}", (x, min(w, 100)),
                          xytext=(0, 8 + 12 * order[label]) if w >= 100 else (9, -4), textcoords="offset points",
                          ha="center" if w >= 100 else "left", fontsize=9.5, color=colours[label])
    axes.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"uncompressed ({dense:.1f}%)")
    axes.set_title(f"FFN units compressed, every head kept: WER on {count} real recordings", fontsize=11)
    axes.set_xlabel("sparsity of the FFN units (%)", fontsize=11)
    axes.set_xticks(sorted({round(100 * run["sparsity"]) for run in ffn}))
    axes.set_xlim(min(axes.get_xticks()) - 3, max(axes.get_xticks()) + 3)
    axes.set_ylim(0, 100 + 8 + 12 * len(groups) // 2 + 12)
    axes.set_yticks(range(0, 101, 20))
    axes.set_ylabel("word error rate (%); ▲ above 100, drawn at 100 with its value", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", bbox_to_anchor=(1, 0.07), fontsize=9.5, framealpha=0.95)   # above dense, below the lines
    if heads:
        sparsities = [100 * r["sparsity"] for r in whisper["runs"] if r.get("units", "heads+ffn") == "heads+ffn"]
        figure.supxlabel(f"Not drawn: the {len(heads)} rows that also remove heads (every rule and magnitude, each K "
                         f"and fold, {min(sparsities):.0f}–{max(sparsities):.0f}%)\nall score {min(heads):.0f}–"
                         f"{max(heads):,.0f}% WER on these recordings: whatever removes a head breaks the model "
                         "(the table has them).", fontsize=9.5, ha="left", x=0.01)
    figure.suptitle("Whisper tiny.en, data-free structured compression (no fine-tuning)", fontsize=11)
    if path is not None:
        figure.savefig(path)
    return figure


# --- the structured methods (experiments/structured_experiment.py) -------------------------------

RULE_LABELS = {"mean": "clustering, mean merge (paper)", "sum_out": "clustering, sum_out merge (ours)",
               "representative": "clustering, representative (ours)", "magnitude": "structured magnitude (baseline)"}
L0_LABELS = {"l0": "L0, defaults", "l0-heads-lr": "L0, head gates at lr 0.02", "l0-min-heads": "L0, min. 1 head per block",
             "l0-dims-only": "L0, dims only (no head gates)", "l0-short-ramp": "L0, target ramp over 10% of the steps"}


def plot_clustering_against_parameters(results: dict, path: Optional[Path] = None):
    """WER (dev + test) against the parameter count, the dense model as a dashed line in each
    panel. Left, no training (data-free): clustering with each merge rule and structured
    magnitude pruning at the same sizes (uniform K: circles joined by a line; variance-based
    mixed K: triangles, dotted). Right, after the recovery fine-tuning (squares, mean ± s.d.
    over seeds). Where the results hold no recovery run, the left panel alone and a note."""
    plt = _pyplot()
    recovery = results.get("recovery_summary") or []
    figure, all_axes = plt.subplots(1, 2 if recovery else 1, figsize=(13, 6.2) if recovery else (8.5, 6.6),
                                    dpi=100, squeeze=False, layout="constrained")
    free, tuned = all_axes[0][0], (all_axes[0][1] if recovery else None)
    dense = 100 * results["dense"]["pooled"]
    runs = [r for r in results["cluster"]["runs"] if not r["fold"]]
    colours = dict(zip(RULE_LABELS, ("tab:blue", "tab:orange", "tab:green", "black")))
    for rule, label in RULE_LABELS.items():
        for mix, marker, line in (("uniform", "o", "-"), ("mixed", "^", ":")):
            chosen = sorted((r for r in runs if r["mix"] == mix and (rule == "magnitude" or r["rule"] == rule)),
                            key=lambda r: r["params_total"])
            if rule == "magnitude":      # the same sizes in every rule's run: one point per sparsity
                chosen = list({r["sparsity"]: r for r in chosen}.values())
            key = "magnitude" if rule == "magnitude" else "clustered"
            if chosen:
                free.plot([r["params_total"] / 1e6 for r in chosen], [100 * r[key]["pooled"] for r in chosen],
                          marker=marker, linestyle=line, color=colours[rule], markersize=7,
                          label=f"{label}, {mix} K")
    steps = results.get("recovery_steps")
    if recovery:
        params = {r["sparsity"]: r["params_total"] for r in results["recovery"]["runs"]}
        for arm, rule in (("mean", "mean"), ("representative", "representative"), ("structured", "magnitude")):
            points = sorted((params[r["sparsity"]], r["wer_pooled"], r["n"]) for r in recovery if r["arm"] == arm)
            if points:
                tuned.errorbar([p / 1e6 for p, _, _ in points], [100 * m for _, (m, _), _ in points],
                               yerr=[100 * sd for _, (_, sd), _ in points], marker="s", linestyle="--", capsize=3,
                               markersize=7, color=colours[rule],
                               label=f"{RULE_LABELS[rule]}, uniform K ({points[0][2]} seeds)")
    model = results.get("model", "the shipped model")
    for axes in (free, tuned):
        if axes is None:
            continue
        axes.axhline(dense, color="crimson", linestyle="--", linewidth=1.2, label=f"dense ({dense:.2f}%)")
        axes.set_xlabel("parameters (millions)", fontsize=11)
        axes.set_ylabel("word error rate on dev + test (%)", fontsize=11)
        axes.tick_params(labelsize=10)
        axes.grid(alpha=0.3)
        axes.set_ylim(bottom=0)
    free.set_title("no training (data-free), k-means seed 0" + (
        "" if recovery else "\n(no recovery runs in these results: the recovery part was not run)"), fontsize=11)
    if tuned is not None:
        tuned.set_title(f"after {steps} steps of recovery fine-tuning, mean ± s.d. over seeds", fontsize=11)
    handles = {h.get_label(): h for axes in (free, tuned) if axes is not None
               for h in axes.get_legend_handles_labels()[0]}     # one legend: the dense line once
    figure.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=3 if recovery else 2,
                  fontsize=9.5, frameon=False)
    figure.suptitle(f"Structured compression of {model}: WER against size\nclustering (each merge rule) "
                    "against structured magnitude pruning at the same per-module sizes", fontsize=11)
    if path is not None:
        figure.savefig(path)
    return figure


def plot_l0_shapes(results: dict, path: Optional[Path] = None):
    """Left, the WER (dev + test, mean ± s.d. over seeds) of L0 with each gate setting beside
    structured magnitude pruning to the same per-block shape fine-tuned alike (hatched), the
    dense model as a dashed line; then what L0 keeps, per block (numbered from 0): heads,
    query/key and value dims (summed over heads) and FFN units, one line per gate setting
    (mean ± s.d. over seeds), at the experiment's sparsity."""
    import statistics
    plt = _pyplot()
    runs = [r for r in results["l0"]["runs"] if not r["arm"].startswith("structured-")]
    settings = [s for s in L0_LABELS if any(r["setting"] == s for r in runs)]
    figure, grid = plt.subplots(2, 3, figsize=(12, 8), dpi=100, layout="constrained")
    panels = [*grid[0], *grid[1][:2]]          # WER, heads, q/k dims; value dims, FFN units; the legend
    summary = {row["arm"]: row for row in results.get("l0_summary", [])}
    wer = panels[0]
    for position, setting in enumerate(settings):
        colour = f"C{list(L0_LABELS).index(setting)}"
        for offset, arm, hatch in ((-0.2, setting, None), (0.2, f"structured-{setting}", "//")):
            if arm not in summary:
                continue
            mean, sd = (100 * v for v in summary[arm]["wer_pooled"])
            wer.bar(position + offset, mean, width=0.38, yerr=sd, capsize=3, color=colour if hatch is None else "white",
                    edgecolor=colour, hatch=hatch, linewidth=1.2)
            wer.text(position + offset, mean + sd + 0.4, f"{mean:.1f}", ha="center", va="bottom", fontsize=8)
    dense = 100 * results["dense"]["pooled"]
    wer.axhline(dense, color="crimson", linestyle="--", linewidth=1.2)
    wer.set_xticks(range(len(settings)), [L0_LABELS[s].removeprefix("L0, ") for s in settings], rotation=30,
                   ha="right", fontsize=9)
    wer.set_ylabel("word error rate on dev + test (%)", fontsize=10)
    wer.set_ylim(0, 1.2 * max([dense] + [p.get_height() for p in wer.patches]))
    wer.set_title(f"WER: L0 (filled) against structured magnitude\nof the same shape (hatched); dense {dense:.2f}%"
                  " (dashed)", fontsize=10)
    wer.grid(alpha=0.3, axis="y")
    for index, (key, title) in enumerate((("heads", "heads kept (of 4)"), ("qk_dims", "query/key dims kept (of 256)"),
                                          ("v_dims", "value dims kept (of 256)"),
                                          ("ffn_units", "FFN units kept (of 1,024)")), start=1):
        axes = panels[index]
        for position, (setting, label) in enumerate(L0_LABELS.items()):
            chosen = [r["kept"][key] for r in runs if r["setting"] == setting and key in r["kept"]]
            if not chosen:
                continue
            offset = 0.07 * (position - 2)         # lines that coincide (e.g. at 0 heads) stay visible
            blocks = [b + offset for b in range(len(chosen[0]))]
            means = [statistics.mean(values) for values in zip(*chosen)]
            sds = [statistics.stdev(values) if len(chosen) > 1 else 0.0 for values in zip(*chosen)]
            axes.errorbar(blocks, means, yerr=sds, marker="o", capsize=3, color=f"C{position}",
                          label=f"{label} ({len(chosen)} seeds)")
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("block", fontsize=10)
        axes.set_xticks(list(range(len(runs[0]["kept"][key]))))
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
    handles, labels = panels[1].get_legend_handles_labels()
    grid[1][2].axis("off")
    grid[1][2].legend(handles, labels, loc="center", fontsize=10, frameon=False, title="gate setting (colour)",
                      title_fontsize=10)
    figure.suptitle(f"L0 at {100 * results['l0_sparsity']:.0f}% ({results['l0_steps']} steps), per gate setting: "
                    "its WER against structured magnitude pruning of the same shape,\nand what survives in each "
                    "block (mean ± s.d. over seeds)", fontsize=11)
    if path is not None:
        figure.savefig(path)
    return figure


# --- what each report writes, and the same from the committed JSON -------------------------------

def write_spg_figures(results: dict, results_path: Path) -> list[Path]:
    """spg_experiment.py's figures beside `results_path`: <stem>.png (WER against sparsity) and
    <stem>_allocation.png at the highest sparsity with both an spg and a gmp run."""
    results_path = Path(results_path)
    written = [results_path.with_name(results_path.stem + ".png")]
    plot_wer_against_sparsity(results, written[0])
    both = [s for s in sorted(results["sparsities"], reverse=True)
            if any(r["arm"] == "spg" and r["sparsity"] == s for r in results["runs"])
            and any(r["arm"] == "gmp" and r["sparsity"] == s for r in results["runs"])]
    if both:          # the allocation where it matters most
        written.append(results_path.with_name(results_path.stem + "_allocation.png"))
        plot_allocation(results, both[0], written[-1])
    return written


def write_structured_figures(results: dict, results_path: Path) -> list[Path]:
    """structured_experiment.py's figures beside `results_path`: <stem>_clustering.png when it
    has clustering runs, <stem>_l0.png when every L0 run has wav2vec2's gates (heads, q/k and
    value dims, FFN units; Whisper-CTC's L0 gates no dims, so its runs get no L0 figure)."""
    results_path = Path(results_path)
    written = []
    if results["cluster"]["runs"]:
        written.append(results_path.with_name(results_path.stem + "_clustering.png"))
        plot_clustering_against_parameters(results, written[-1])
    if results["l0"]["runs"] and all("qk_dims" in r["kept"] for r in results["l0"]["runs"]):
        written.append(results_path.with_name(results_path.stem + "_l0.png"))
        plot_l0_shapes(results, written[-1])
    return written


def redraw(results_path: Path) -> list[Path]:
    """The figures of one committed results JSON, as its report draws them."""
    results_path = Path(results_path)
    results = json.loads(results_path.read_text())
    if "summary" in results and "arms" in results:            # spg_experiment.py
        return write_spg_figures(results, results_path)
    if "l0" in results and "cluster" in results:             # structured_experiment.py
        return write_structured_figures(results, results_path)
    if results.get("model") == "whisper-tiny.en" and "runs" in results and "datasets" in results:
        plot_whisper_clustering(results, results_path.with_suffix(".png"))      # whisper_cluster.py
        return [results_path.with_suffix(".png")]
    return []


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        for figure_path in redraw(Path(argument)):
            print(f"{argument} -> {figure_path}")
