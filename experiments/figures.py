"""Figures of the measured results, drawn from the results JSON files (matplotlib, a
notebook/experiment dependency only). The experiments call these to write the PNGs under results/
that the README shows; notebooks/06_results.ipynb calls the same functions to draw them inline.

    plot_wer_against_sparsity(experiment)  # results/spg_experiment.json -> WER vs sparsity, one line per method
    plot_allocation(experiment)            # SPG's learned per-matrix sparsity against global magnitude's
"""

from __future__ import annotations

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
    axes.legend(fontsize=8, loc="upper left", framealpha=0.9)
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
    figure, all_axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=100)
    low = min(min(r) for r in learned + magnitude)
    high = max(max(r) for r in learned + magnitude)
    span = max(abs(v) for r in difference for v in r) or 1.0
    panels = ((f"SPG, learned (mean of {len(spg)} seeds)", learned, "viridis", low, high),
              ("global magnitude pruning", magnitude, "viridis", low, high),
              ("SPG − global magnitude (points)", difference, "coolwarm", -span, span))
    for axes, (title, values, colours, vmin, vmax) in zip(all_axes, panels):
        image = axes.imshow(values, cmap=colours, vmin=vmin, vmax=vmax, aspect="auto")
        axes.set_title(title, fontsize=9)
        axes.set_xticks(range(len(short)), short)
        axes.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks])
        for y, row in enumerate(values):
            for x, value in enumerate(row):
                axes.text(x, y, f"{value:.0f}", ha="center", va="center", fontsize=7,
                          color="white" if colours == "viridis" and value < (vmin + vmax) / 2 else "black")
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    correlation = [r["correlation_with_global_magnitude"] for r in runs if r["arm"] == "spg"]
    figure.suptitle(f"Per-matrix sparsity (%) at a {100 * sparsity:.0f}% global target; correlation of SPG's "
                    f"with global magnitude's {sum(correlation) / len(correlation):.2f} (mean over seeds)",
                    fontsize=10)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure


def plot_whisper_clustering(whisper: dict, path: Optional[Path] = None, dataset: str = "real"):
    """Whisper tiny.en without data or training: WER on real speech (`dataset`: "real" pools
    the 11 recordings, or one of them) against sparsity for clustering (each
    merge rule, uniform or mixed K) and structured magnitude pruning. Left: heads and FFN
    units compressed; right: FFN units only. WER above 100 % (the decoder loops or emits junk)
    is drawn as a triangle at the 100 % edge. The bias-fold and per-kind rows are in the table only."""
    plt = _pyplot()
    dense = 100 * whisper["dense"]["wer"][dataset]
    count = (sum(whisper["datasets"].get(name, 0) for name in ("librivox", "cards", "beckett"))
             if dataset == "real" else whisper["datasets"][dataset])
    scopes = {"heads+ffn": "heads and FFN units", "ffn": "FFN units only"}

    def label_of(run: dict) -> str:
        label = "structured magnitude" if run["method"] == "magnitude" else f"clustering, merge {run['merge']}"
        return label + (", mixed K" if run["mixed"] else "")
    runs = [run for run in whisper["runs"] if not run.get("fold", False) and run["mixed"] in (False, True)]
    labels = sorted({label_of(run) for run in runs})
    colours = dict(zip(labels, plt.cm.tab10.colors))           # one colour per method in both panels
    figure, all_axes = plt.subplots(1, 2, figsize=(11, 4.0), dpi=100, sharey=True)
    for axes, (scope, title) in zip(all_axes, scopes.items()):
        groups: dict[str, list] = {}
        for run in runs:
            if run.get("units", "heads+ffn") == scope:
                groups.setdefault(label_of(run), []).append((run["sparsity"], 100 * run["wer"][dataset]))
        for label, points in sorted(groups.items()):
            points.sort()
            xs = [100 * s for s, _ in points]
            axes.plot(xs, [min(w, 100) for _, w in points], "-", color=colours[label], label=label)
            for x, (_, w) in zip(xs, points):
                axes.plot([x], [min(w, 100)], "^" if w > 100 else "o", color=colours[label], markersize=7)
        axes.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"uncompressed ({dense:.1f}%)")
        axes.set_title(f"{title}: WER on {count} real recordings", fontsize=9)
        axes.set_xlabel("sparsity of the compressed modules (%)")
        axes.set_xticks(sorted({100 * run["sparsity"] for run in runs}))
        axes.set_ylim(0, 108)
        axes.grid(alpha=0.3)
    all_axes[0].set_ylabel("word error rate (%); ▲ = above 100")
    handles = {h.get_label(): h for axes in all_axes for h in axes.get_lines() if not h.get_label().startswith("_")}
    figure.legend(list(handles.values()), list(handles), fontsize=8, loc="lower center", ncol=3)
    figure.suptitle("Whisper tiny.en, data-free structured compression (no fine-tuning)", fontsize=10)
    figure.tight_layout(rect=(0, 0.14, 1, 1))
    if path is not None:
        figure.savefig(path)
    return figure


# --- the structured methods (experiments/structured_experiment.py) -------------------------------

RULE_LABELS = {"mean": "clustering, mean merge (paper)", "sum_out": "clustering, sum_out merge (ours)",
               "representative": "clustering, representative (ours)", "magnitude": "structured magnitude (baseline)"}
L0_LABELS = {"l0": "L0, defaults", "l0-heads-lr": "L0, head gates at lr 0.02", "l0-min-heads": "L0, min. 1 head per block",
             "l0-dims-only": "L0, dims only (no head gates)", "l0-short-ramp": "L0, target ramp over 10% of the steps"}


def plot_clustering_against_parameters(results: dict, path: Optional[Path] = None):
    """WER (dev + test) against the parameter count: data-free clustering with each merge rule
    and structured magnitude pruning at the same sizes (uniform K: circles joined by a line;
    variance-based mixed K: triangles), and after --epochs 1 recovery (squares, mean ± s.d.
    over seeds), with the dense model."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.8), dpi=100)
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
                axes.plot([r["params_total"] / 1e6 for r in chosen], [100 * r[key]["pooled"] for r in chosen],
                          marker=marker, linestyle=line, color=colours[rule],
                          label=f"{label}, {'uniform' if mix == 'uniform' else 'mixed'} K, no training")
    recovery = results.get("recovery_summary") or []
    params = {r["sparsity"]: r["params_total"] for r in results["recovery"]["runs"]}
    for arm, rule in (("mean", "mean"), ("representative", "representative"), ("structured", "magnitude")):
        points = sorted((params[r["sparsity"]], r["wer_pooled"]) for r in recovery if r["arm"] == arm)
        if points:
            axes.errorbar([p / 1e6 for p, _ in points], [100 * m for _, (m, _) in points],
                          yerr=[100 * sd for _, (_, sd) in points], marker="s", linestyle="--", capsize=3,
                          color=colours[rule], label=f"{RULE_LABELS[rule].split(' (')[0]}, after 375 steps of recovery")
    if runs:
        axes.scatter([runs[0]["params_dense"] / 1e6], [100 * results["dense"]["pooled"]], marker="*", s=150,
                     color="crimson", zorder=5, label=f"dense ({100 * results['dense']['pooled']:.2f}%)")
    axes.set_title(f"Structured compression of {results.get('model', 'the shipped model')}: WER on dev + test "
                   "against size\n"
                   "clustering (each merge rule) vs structured magnitude pruning at the same per-module sizes",
                   fontsize=10)
    axes.set_xlabel("parameters (millions)")
    axes.set_ylabel("word error rate (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper right", framealpha=0.9)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure


def plot_l0_shapes(results: dict, path: Optional[Path] = None):
    """What L0 keeps, per block: heads, query/key and value dims (summed over heads) and FFN units, one line
    per gate setting (mean ± s.d. over seeds), at the experiment's sparsity."""
    import statistics
    plt = _pyplot()
    runs = [r for r in results["l0"]["runs"] if not r["arm"].startswith("structured-")]
    figure, panels = plt.subplots(1, 4, figsize=(12, 3.8), dpi=100)
    for index, (key, title) in enumerate((("heads", "heads kept (of 4)"), ("qk_dims", "query/key dims kept (of 256)"),
                                          ("v_dims", "value dims kept (of 256)"),
                                          ("ffn_units", "FFN units kept (of 1,024)"))):
        axes = panels[index]
        for position, (setting, label) in enumerate(L0_LABELS.items()):
            chosen = [r["kept"][key] for r in runs if r["setting"] == setting and key in r["kept"]]
            if not chosen:
                continue
            offset = 0.07 * (position - 2)         # lines that coincide (e.g. at 0 heads) stay visible
            blocks = [b + offset for b in range(1, len(chosen[0]) + 1)]
            means = [statistics.mean(values) for values in zip(*chosen)]
            sds = [statistics.stdev(values) if len(chosen) > 1 else 0.0 for values in zip(*chosen)]
            axes.errorbar(blocks, means, yerr=sds, marker="o", capsize=3, label=f"{label} ({len(chosen)} seeds)")
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("block")
        axes.set_xticks(list(range(1, 7)))
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    figure.suptitle(f"L0 at {100 * results['l0_sparsity']:.0f}% ({results['l0_steps']} steps): what survives in each "
                    "block, per gate setting (mean ± s.d. over seeds)", fontsize=10)
    figure.tight_layout(rect=(0, 0.12, 1, 0.95))
    if path is not None:
        figure.savefig(path)
    return figure
