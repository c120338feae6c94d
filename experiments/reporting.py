"""Small helpers the experiments' reports share: dev + test pooled, mean ± s.d. over seeds,
compact JSON numbers, the refusal to report when no run has finished."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

NO_RUNS = 2     # exit status of a report that found no finished run (and wrote nothing)


def require_finished_runs(out: Path, stems) -> None:
    """Exit with status NO_RUNS and one line naming `out` unless one of the runs `stems`
    (<out>/<name>, the run's JSON is <stem>.json) has finished: a report of no runs would
    overwrite the committed results with empty tables."""
    if not any(Path(f"{stem}.json").is_file() for stem in stems):
        print(f"no finished runs in {out}: nothing to report, no results written", file=sys.stderr)
        sys.exit(NO_RUNS)

POOLED = ("dev", "test")        # the built-in corpus's seen voices, pooled in every report


def pooled_decoding(decoding: dict, splits=POOLED) -> tuple[list[str], list[str]]:
    """(references, hypotheses) of the `splits` (default POOLED) of one run's {split: decoding}."""
    references, hypotheses = [], []
    for split in splits:
        references += decoding[split]["references"]
        hypotheses += decoding[split]["hypotheses"]
    return references, hypotheses


def mean_sd(values) -> tuple[float, float]:
    """(mean, sample s.d.) of the values that are not None or nan; (nan, nan) when none are."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rounded(value, digits: int = 5):
    """Floats to `digits` significant digits, recursively (keeps the results files small)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    return value


def add_holm(comparisons: list[dict], splits=("pooled", "test-unseen")) -> None:
    """Holm's correction over one table's tests, per split: each comparison's {split: {"p": ...}}
    gains p_holm and significant_holm (alpha 0.05)."""
    from spg.wer import holm
    for split in splits:
        adjusted, rejected = holm([c[split]["p"] for c in comparisons], alpha=0.05)
        for c, p_holm, significant in zip(comparisons, adjusted, rejected):
            c[split].update(p_holm=p_holm, significant_holm=significant)
