"""The GPU check script (tests/gpu/check.py) at toy size on the CPU, so that it cannot rot
between the rare sessions that have a GPU (issue 18)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_section_on_cpu_at_toy_size(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(REPO / "tests" / "gpu" / "check.py"), "--device", "cpu", "--quick",
                             "--out", str(out), "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "7 passed, 0 failed"
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == ["logits", "methods", "resume", "torchrun", "forward", "ratios", "default"]
    assert all(section["ok"] for section in sections.values())
    assert sections["logits"]["max_abs_diff_fp32"] <= 1e-4
    runs = sections["methods"]["runs"]
    assert set(runs) == {"dense-0", "spg-0.6", "ump-0.6", "mixed-0.6", "cluster-0.3", "cluster-0.5", "l0-0.7",
                         "whisper"}
    for name in ("spg-0.6", "ump-0.6", "mixed-0.6", "l0-0.7"):
        assert abs(runs[name]["sparsity"] - runs[name]["target"]) <= 0.01, name
    assert sections["resume"]["max_abs_weight_diff_vs_uninterrupted"] == 0       # bit-identical on the CPU
    assert sections["torchrun"]["backend"] == "gloo"
    assert {"batch1-fp32", "batch1-bf16", "batch2-fp32", "batch2-bf16"} <= set(sections["forward"])
    assert all(sections["forward"][key]["ours_ms"] > 0 for key in ("batch1-fp32", "batch2-bf16"))
    assert sections["ratios"]["spg_step_over_plain_step"] > 0
    assert sections["default"]["skipped"] == "--quick"
