"""The experiments' job runner (experiments/runner.py) and the structured experiments' job graphs:
finished jobs are skipped, a job waits for the file it needs, a failure fails the jobs that
need it, and each structured baseline is pruned to the shape of the run it is judged against
(also on Whisper); the data-free Whisper table pairs every clustering row with magnitude
pruning at the same sizes."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

import structured_experiment  # noqa: E402
import whisper_cluster  # noqa: E402
import whisper_structured  # noqa: E402
from runner import Job, run_jobs  # noqa: E402
from spg.wer import mapsswe  # noqa: E402

FAKE_TRAIN = '''
import json, os, sys, time
args = sys.argv[1:]
out, record = args[args.index("--out") + 1], args[args.index("--json") + 1]
if "--fail" in args:
    sys.exit(3)
with open(out, "w") as f:
    f.write("model")
with open(record, "w") as f:
    json.dump({"args": args, "time": time.time(), "threads": os.environ.get("OMP_NUM_THREADS")}, f)
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
    assert first["threads"] == second["threads"] == "1"            # one OpenMP thread per run by default
    assert run_jobs(tmp_path, [Job(out / "two-threads", [])], workers=1, threads=2) == []
    assert json.loads((out / "two-threads.json").read_text())["threads"] == "2"


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


def test_whisper_structured_baselines_take_the_shape_and_budget_of_their_l0_run(tmp_path):
    jobs = {job.stem.name: job for job in whisper_structured.jobs_of(tmp_path, {0.1: (0, 2), 0.3: (1,)})}
    assert sorted(jobs) == ["l0-0.1-s0", "l0-0.1-s2", "l0-0.3-s1", "structured-0.1-s0", "structured-0.1-s2",
                            "structured-0.3-s1"]
    for name in ("0.1-s0", "0.1-s2", "0.3-s1"):
        baseline, source = jobs[f"structured-{name}"], jobs[f"l0-{name}"]
        assert baseline.options[baseline.options.index("--structure-from") + 1] == f"{source.stem}.pt"
        assert baseline.after == source.stem
        for flag in ("--model", "--steps", "--batch-size", "--lr", "--seed", "--sparsity"):
            assert baseline.options[baseline.options.index(flag) + 1] == source.options[source.options.index(flag) + 1]


def test_whisper_cluster_rows_each_have_a_same_size_magnitude_row_and_mapsswe_pairs_them():
    specs = whisper_cluster.row_specs()
    keys = [whisper_cluster.key_of(spec) for spec in specs]
    assert len(set(keys)) == len(keys) == 3 * (3 * 3 + 3 + 2) + 3 * 4      # heads+ffn and FFN-only rows
    magnitude = {(s["mixed"], s["fold"], s["sparsity"], s["units"]) for s in specs if s["method"] == "magnitude"}
    assert all((s["mixed"], s["fold"], s["sparsity"], s["units"]) in magnitude for s in specs)
    # hand-made decodings: clustering makes 3 more word errors than magnitude on one utterance
    references = {"librivox": ["a b c d"] * 6, "cards": ["x y"], "beckett": ["z"], "builtin-test": ["p q r"] * 6}

    def row(method, hypotheses):
        spec = next(s for s in specs if s["method"] == method and s["sparsity"] == 0.1 and s["units"] == "ffn")
        wer = {name: sum(h != r for h, r in zip(hyps, references[name])) / len(references[name])
               for name, hyps in hypotheses.items()}
        return {**spec, "kept": {"ffn_units": [3]}, "hypotheses": hypotheses, "wer": {**wer, "real": wer["librivox"]}}
    same = {name: list(refs) for name, refs in references.items()}
    worse = {**same, "librivox": ["a e f g", "a b e f", "e b c d", "a e c f", "e f g d", "a b c d"]}
    result = {"references": references, "runs": [row("cluster", worse), row("magnitude", same)]}
    whisper_cluster.add_mapsswe(result)
    tests = result["runs"][0]["mapsswe"]
    assert set(tests) == {"real", "builtin-test"} and "mapsswe" not in result["runs"][1]
    assert tests["builtin-test"]["p_value"] == 1.0 and not tests["builtin-test"]["significant"]
    pooled = [sum((decoding[name] for name in ("librivox", "cards", "beckett")), [])
              for decoding in (references, worse, same)]
    assert tests["real"]["p_value"] == mapsswe(*pooled).p_value < 0.05
    assert tests["real"]["significant"] and tests["real"]["better"] == "magnitude"
