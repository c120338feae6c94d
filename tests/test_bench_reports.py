"""The experiments' report commands never destroy results (issue 26): `--report` with no
finished run (a fresh clone has no runs folder; or an empty one) says so in one line naming
the folder it looked in, exits 2 and writes nothing: the committed results file stays
byte-identical and no runs folder is created."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REPORTS = {"whisper_structured.py": "whisper_structured.json", "spg_experiment.py": "spg_experiment.json",
           "structured_experiment.py": "structured_experiment.json"}


@pytest.mark.parametrize("script", sorted(REPORTS))
@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_report_without_runs_refuses_and_writes_nothing(tmp_path, script, folder):
    results = REPO / "results" / REPORTS[script]          # the default --results: the committed file
    before = results.read_bytes()
    runs = tmp_path / "runs"
    if folder == "empty":
        runs.mkdir()
    done = subprocess.run([sys.executable, str(REPO / "experiments" / script), "--report", "--out", str(runs)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"no finished runs in {runs}: nothing to report, no results written"], done.stderr
    assert done.stdout == ""
    assert results.read_bytes() == before
    assert runs.exists() == (folder == "empty") and (folder == "missing" or not any(runs.iterdir()))
    assert sorted(p.name for p in tmp_path.iterdir()) == (["runs"] if folder == "empty" else [])


def test_the_structured_report_marks_raw_and_holm_decisions():
    """Holm over one table's tests (spg.wer.holm) changes the marks it should and no others:
    p 0.01, 0.04, 0.03 over 3 tests adjust to 0.03, 0.06, 0.06."""
    sys.path.insert(0, str(REPO / "experiments"))
    import structured_report
    tests = [{split: {"p": p, "significant": p < 0.05, "first_better": better}
              for split in ("pooled", "test-unseen")} for p, better in ((0.01, True), (0.04, False), (0.03, True))]
    structured_report.add_holm(tests)
    assert [t["pooled"]["p_holm"] for t in tests] == pytest.approx([0.03, 0.06, 0.06])
    assert structured_report.marks(tests) == "+-+ (Holm +==)"
