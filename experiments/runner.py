"""Run many `train.py` processes, a few at a time, resumably: the job runner of the experiments.

A job is a name, a command and, optionally, a file it waits for (another job's checkpoint).
Every job writes <name>.json when it finishes; a job whose JSON exists is skipped, one with a
resume state (<name>.pt.state) gets --resume, and its output goes to <name>.log (appended).
Each process gets one OpenMP thread: on 2 cores two single-thread runs give about twice the
throughput of one two-thread run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm


@dataclass
class Job:
    stem: Path                       # <out>/<name>; writes <stem>.json, .pt, .log
    options: list[str]               # train.py options beyond --out, --json and --resume
    waits_for: Optional[Path] = None  # start only once this file exists (e.g. another job's .pt)
    after: Optional[Path] = None     # ... and that job's JSON (so a failure there fails this one)


def train_command(repo: Path, job: Job) -> list[str]:
    command = [sys.executable, str(repo / "train.py"), "--out", f"{job.stem}.pt", "--json", f"{job.stem}.json",
               *job.options]
    if Path(f"{job.stem}.pt.state").exists():
        command.append("--resume")
    return command


def run_jobs(repo: Path, jobs: list[Job], workers: int, desc: str = "runs", threads: int = 1) -> list[Job]:
    """Run every job whose JSON does not exist yet, `workers` at a time with `threads` OpenMP
    threads each, each after the file it waits for exists. Returns the jobs that failed (or
    whose prerequisite failed)."""
    pending = [job for job in jobs if not Path(f"{job.stem}.json").exists()]
    running: dict[int, tuple[Job, subprocess.Popen, object]] = {}
    failed: list[Job] = []
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc=desc, unit="run")
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    failed_stems: set[Path] = set()
    while pending or running:
        for key in list(running):
            job, process, log = running[key]
            if process.poll() is not None:
                log.close()
                del running[key]
                if process.returncode != 0:
                    failed.append(job)
                    failed_stems.add(job.stem)
                    bar.write(f"FAILED ({process.returncode}): {job.stem}.log")
                bar.update(1)
        for job in list(pending):
            if len(running) >= workers:
                break
            if job.after is not None and job.after in failed_stems:
                pending.remove(job)
                failed.append(job)
                failed_stems.add(job.stem)
                bar.write(f"SKIPPED (needs {job.after.name}, which failed): {job.stem.name}")
                bar.update(1)
                continue
            if job.waits_for is not None and not job.waits_for.exists():
                continue
            command = train_command(repo, job)
            log = open(f"{job.stem}.log", "a")
            log.write("\n$ " + " ".join(command) + "\n")
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
            running[id(job)] = (job, process, log)
            pending.remove(job)
            bar.set_postfix_str(f"started {job.stem.name}")
        if pending and not running and all(job.waits_for is not None and not job.waits_for.exists()
                                           for job in pending):
            bar.write("waiting for files no job writes: " + ", ".join(str(job.waits_for) for job in pending))
            failed += pending
            break
        time.sleep(2)
    bar.close()
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(job.stem.name for job in failed))
    return failed
