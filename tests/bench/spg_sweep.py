#!/usr/bin/env python
"""SPG against its baselines over a range of sparsities (the paper's Table 1 / Fig. 2 shape).

    python tests/bench/spg_sweep.py                       # 0.5 0.6 0.7 0.8 on the built-in setup
    python tests/bench/spg_sweep.py --sparsities 0.6 0.8 --steps 300 -- --data /data/LibriSpeech

For every sparsity it runs `train.py` with --method spg, then mixed (reading that SPG run's
per-matrix sparsities), then ump, all with the same steps and seed, writes each run's JSON
under --out, and prints one table: test WER per method and the MAPSSWE verdict against the
dense model. "Max lossless sparsity" is the highest sparsity whose test WER is not
significantly worse than dense (alpha = 0.05), the paper's criterion. Arguments after `--`
go to every train.py call unchanged. Each default run takes several minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import train  # noqa: E402

METHODS = ("spg", "mixed", "ump")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--steps", type=int, default=train.DEFAULT_STEPS)
    parser.add_argument("--split", default="test", help="split whose WER the table shows")
    parser.add_argument("--out", default=str(REPO / "runs" / "sweep"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results: dict[tuple[str, float], dict] = {}
    for sparsity in args.sparsities:
        for method in METHODS:
            stem = out / f"{method}-{sparsity:g}"
            call = ["--method", method, "--sparsity", str(sparsity), "--steps", str(args.steps),
                    "--out", f"{stem}.pt", "--json", f"{stem}.json"] + passthrough
            if method == "mixed":
                call += ["--mixed-from", str(out / f"spg-{sparsity:g}.pt")]
            print(f"\n##### train.py {' '.join(call)}", flush=True)
            train.main(call)
            results[method, sparsity] = json.loads(Path(f"{stem}.json").read_text())

    dense = next(iter(results.values()))["dense_wer"].get(args.split)
    print(f"\n=== {args.split} WER (dense {100 * dense:.2f}%); * = significantly worse than dense (MAPSSWE, alpha 0.05)")
    print(f"{'sparsity':>9}" + "".join(f"{m:>12}" for m in METHODS))
    lossless = {m: 0.0 for m in METHODS}
    for sparsity in args.sparsities:
        cells = []
        for method in METHODS:
            run = results[method, sparsity]
            worse = run["mapsswe"][args.split]["significant"] and \
                run["compressed_wer"][args.split] > run["dense_wer"][args.split]
            if not worse:
                lossless[method] = max(lossless[method], sparsity)
            cells.append(f"{100 * run['compressed_wer'][args.split]:.2f}%{'*' if worse else ' '}")
        print(f"{100 * sparsity:8.0f}%" + "".join(f"{c:>12}" for c in cells))
    print("max lossless sparsity: " + ", ".join(f"{m} {100 * s:.0f}%" for m, s in lossless.items()))
    (out / "summary.json").write_text(json.dumps(
        {f"{m}-{s:g}": {k: r[k] for k in ("compressed_wer", "dense_wer", "mapsswe", "sparsity", "seconds")}
         for (m, s), r in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
