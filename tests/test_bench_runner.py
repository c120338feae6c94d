"""The experiments' job runner (tests/bench/runner.py) and the structured experiment's job graph:
finished jobs are skipped, a job waits for the file it needs, a failure fails the jobs that
need it, and each structured baseline is pruned to the shape of the run it is judged against."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "bench"))

import structured_experiment  # noqa: E402
from runner import Job, run_jobs  # noqa: E402

FAKE_TRAIN = '''
import json, sys, time
args = sys.argv[1:]
out, record = args[args.index("--out") + 1], args[args.index("--json") + 1]
if "--fail" in args:
    sys.exit(3)
with open(out, "w") as f:
    f.write("model")
with open(record, "w") as f:
    json.dump({"args": args, "time": time.time()}, f)
'''


def test_runner_orders_skips_and_propagates_failures(tmp_path):
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    out = tmp_path / "runs"
    out.mkdir()
    (out / "done.json").write_text("{}")
    jobs = [Job(out / "second", ["--from", str(out / "first.pt")], waits_for=out / "first.json", after=out / "first"),
            Job(out / "first", []),
            Job(out / "done", ["--fail"]),                                   # finished before: skipped
            Job(out / "broken", ["--fail"]),
            Job(out / "needs-broken", [], waits_for=out / "broken.json", after=out / "broken")]
    failed = run_jobs(tmp_path, jobs, workers=2)
    assert sorted(job.stem.name for job in failed) == ["broken", "needs-broken"]
    assert (out / "first.json").exists() and (out / "second.json").exists()
    assert (out / "done.json").read_text() == "{}"
    import json
    first, second = (json.loads((out / f"{n}.json").read_text()) for n in ("first", "second"))
    assert second["time"] >= first["time"] and "--resume" not in second["args"]


def test_structured_baselines_take_the_shape_of_the_run_they_are_judged_against(tmp_path):
    jobs = {job.stem.name: job for part in structured_experiment.PARTS
            for job in structured_experiment.jobs_of(part, tmp_path, [0, 1], ["--lr", "2e-4"])}
    for setting in structured_experiment.L0_SETTINGS:
        for seed in (0, 1):
            baseline, source = jobs[f"structured-{setting}-s{seed}"], jobs[f"{setting}-s{seed}"]
            options = baseline.options
            assert options[options.index("--structure-from") + 1] == f"{source.stem}.pt"
            assert baseline.waits_for == Path(f"{source.stem}.json") and baseline.after == source.stem
            for flag in ("--steps", "--seed", "--lr"):     # the same budget and seed as the L0 run
                assert options[options.index(flag) + 1] == source.options[source.options.index(flag) + 1]
    recovery = jobs["recovery-structured-0.5-s1"].options
    assert recovery[recovery.index("--steps") + 1] == str(structured_experiment.RECOVERY_STEPS) == str(-(-3000 // 8))
    assert recovery[recovery.index("--structure-from") + 1].endswith("cluster-mean-uniform-0.5.pt")
    assert len([name for name in jobs if name.startswith("cluster-")]) == 2 * 3 * 5
