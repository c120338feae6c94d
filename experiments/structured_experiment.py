#!/usr/bin/env python
"""The structured methods against structured baselines of the same shape (issue 16).

    python experiments/structured_experiment.py            # every part below, then the report
    python experiments/structured_experiment.py --report   # only the report, from the runs so far
    python experiments/structured_experiment.py --parts l0 # one part

Parts (each run one `train.py` process, `--workers` at a time, resumable: see runner.py):
  l0        L0 at 70 %, 300 steps, seeds 0-2, four gate settings:
              l0            the defaults (every gate type at lr 0.1, initial drop rate 0.01)
              l0-heads-lr   the head gates at DPHuBERT's lr 0.02 (--gate-lr heads=0.02)
              l0-min-heads  at least one head per block (--min-heads 1)
              l0-dims-only  no head gates (--dims-only)
              l0-short-ramp the target reached over the first 10 % of the steps instead of 50 %
                            (--target-ramp 0.1, DPHuBERT's share): the test of why L0 loses to
                            its structured baseline (its gates reach the target late)
            and for each, `structured-<setting>`: magnitude pruning to that L0 run's own
            per-block sizes (heads, q/k and value dims, FFN units), fine-tuned with the same
            300 steps and seed (--method structured --structure-from <the L0 run>).
  cluster   data-free clustering at 30 % and 50 %: every merge rule (mean, sum_out,
            representative) with uniform K, variance-based mixed K ranked over all modules
            (the paper's) and per module kind (ours), with and without the exact bias fold
            (not for per-kind); each run also scores structured magnitude pruning at the same
            per-module sizes. One k-means seed (0): nothing else in these runs is random.
  recovery  --epochs 1 recovery (375 steps) at 30 % and 50 %, uniform K, seeds 0-2: clustering
            with `mean` and with `representative`, and structured magnitude pruning to the same
            sizes fine-tuned with the same 375 steps (--method structured).
Every training run uses train.py's settings for these methods (mean-reduced CTC, weight decay
0.01, clipping at 5, lr 2e-4 with 10 % warm-up and linear decay, batch 8). The report pools dev
and test (the seen voices) and shows test-unseen separately; MAPSSWE (alpha 0.05) per seed
between each method and its baseline of the same shape, and between the L0 settings and the
default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reporting import require_finished_runs  # noqa: E402
from runner import Job, run_jobs  # noqa: E402

PARTS = ("l0", "cluster", "recovery")
L0_SETTINGS = {"l0": [], "l0-heads-lr": ["--gate-lr", "heads=0.02"], "l0-min-heads": ["--min-heads", "1"],
               "l0-dims-only": ["--dims-only"], "l0-short-ramp": ["--target-ramp", "0.1"]}
L0_SPARSITY, L0_STEPS = 0.7, 300
RULES = ("mean", "sum_out", "representative")
MIXES = {"uniform": [], "mixed": ["--mixed"], "per-kind": ["--mixed", "--mixed-per-kind"]}
CLUSTER_SPARSITIES = (0.3, 0.5)
RECOVERY_RULES = ("representative", "mean")
RECOVERY_STEPS = 375                # --epochs 1: ceil(3,000 training utterances / batch 8)
SEEDS = (0, 1, 2)
POOLED = ("dev", "test")


def cluster_name(rule: str, mix: str, fold: bool, sparsity: float) -> str:
    return f"cluster-{rule}-{mix}{'-fold' if fold else ''}-{sparsity:g}"


def jobs_of(part: str, out: Path, seeds, common: list[str], l0_settings=tuple(L0_SETTINGS),
            l0_sparsity: float = L0_SPARSITY, sparsities=CLUSTER_SPARSITIES) -> list[Job]:
    """The runs of one part (see the module docstring); `l0_sparsity` is L0's target and
    `sparsities` the clustering and recovery levels. The recovery part includes the data-free
    `mean`, uniform-K run whose shape its baselines take, so it runs without the cluster part."""
    def seeded(seed: int) -> list[str]:
        return ["--seed", str(seed), *common]

    jobs: list[Job] = []
    if part == "l0":
        for seed in seeds:
            for setting in l0_settings:
                options = L0_SETTINGS[setting]
                source = out / f"{setting}-s{seed}"
                jobs.append(Job(source, ["--method", "l0", "--sparsity", f"{l0_sparsity:g}", "--steps", str(L0_STEPS),
                                         "--save-every", "100", *options, *seeded(seed)]))
                jobs.append(Job(out / f"structured-{setting}-s{seed}",
                                ["--method", "structured", "--sparsity", f"{l0_sparsity:g}", "--structure-from",
                                 f"{source}.pt", "--steps", str(L0_STEPS), "--save-every", "100", *seeded(seed)],
                                waits_for=Path(f"{source}.json"), after=source))
    elif part == "cluster":
        for sparsity in sparsities:
            for mix, mix_options in MIXES.items():
                for fold in (False, True):
                    if fold and mix == "per-kind":
                        continue
                    for rule in RULES:
                        jobs.append(Job(out / cluster_name(rule, mix, fold, sparsity),
                                        ["--method", "cluster", "--sparsity", f"{sparsity:g}", "--merge", rule,
                                         *mix_options, *(["--fold-bias"] if fold else []), *seeded(0)]))
    elif part == "recovery":          # the baseline first, then one rule after the other
        for sparsity in sparsities:
            shape = out / cluster_name("mean", "uniform", False, sparsity)
            jobs.append(Job(shape, ["--method", "cluster", "--sparsity", f"{sparsity:g}", "--merge", "mean",
                                    *seeded(0)]))
            for seed in seeds:
                jobs.append(Job(out / f"recovery-structured-{sparsity:g}-s{seed}",
                                ["--method", "structured", "--sparsity", f"{sparsity:g}", "--structure-from",
                                 f"{shape}.pt", "--steps", str(RECOVERY_STEPS), "--save-every", "100", *seeded(seed)],
                                waits_for=Path(f"{shape}.json"), after=shape))
        for rule in RECOVERY_RULES:
            for sparsity in sparsities:
                for seed in seeds:
                    jobs.append(Job(out / f"recovery-{rule}-{sparsity:g}-s{seed}",
                                    ["--method", "cluster", "--sparsity", f"{sparsity:g}", "--merge", rule,
                                     "--epochs", "1", "--save-every", "100", *seeded(seed)]))
    return jobs


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--l0-settings", nargs="+", choices=list(L0_SETTINGS), default=list(L0_SETTINGS),
                        help="the L0 gate settings to run (default all)")
    parser.add_argument("--l0-sparsity", type=float, default=L0_SPARSITY,
                        help="L0's target (default %(default)g)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(CLUSTER_SPARSITIES),
                        help="the clustering and recovery levels (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "runs" / "structured-experiment"))
    parser.add_argument("--results", default=str(REPO / "results" / "structured_experiment.json"))
    parser.add_argument("--spg-results", default=str(REPO / "results" / "spg_experiment.json"),
                        help="the SPG experiment, for its unstructured rows at L0's sparsity")
    parser.add_argument("--report", action="store_true", help="only the report, from the runs finished so far")
    args = parser.parse_args(argv)
    out = Path(args.out)
    common = ["--lr", "2e-4", "--dense-eval", str(out / "dense-decoding.json"), *passthrough]
    args.model = passthrough[passthrough.index("--model") + 1] if "--model" in passthrough else None
    args.train_options = passthrough

    def jobs(parts) -> list[Job]:       # each run once, though the cluster and recovery parts share one
        unique: dict[Path, Job] = {}
        for part in parts:
            for job in jobs_of(part, out, args.seeds, common, args.l0_settings, args.l0_sparsity, args.sparsities):
                unique.setdefault(job.stem, job)
        return list(unique.values())

    if not args.report:
        out.mkdir(parents=True, exist_ok=True)
        run_jobs(REPO, jobs(args.parts), args.workers)
    require_finished_runs(out, [job.stem for job in jobs(PARTS)])
    from structured_report import report
    report(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
