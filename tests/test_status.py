"""`python -m peft_lab.status` on sweep dirs laid out as the launchers leave them (no training, no SLURM).

The same command against a real SLURM is in test_slurm.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from peft_lab import status


def _cell(
    sweep: Path, name: str, metrics: dict | None = None, progress: dict | None = None, ckpt_step: int | None = None
) -> dict:
    run_dir = sweep / name
    run_dir.mkdir(parents=True)
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if progress:
        (run_dir / "progress.json").write_text(json.dumps(progress))
    if ckpt_step is not None:
        (run_dir / "checkpoint").mkdir()
        (run_dir / "checkpoint" / "state.json").write_text(json.dumps({"step": ckpt_step, "epoch": 0, "micro": 0}))
    return {"name": name, "run_dir": str(run_dir), "status": "pending", "job_id": "", "log": None}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_local_sweep_states_and_progress(tmp_path):
    sweep = tmp_path / "sweep"
    host = socket.gethostname()
    lines = {"step": 10, "total": 60, "resumed_from": 0}
    resumed = {"step": 34, "total": 60, "resumed_from": 30}  # the first attempt's last checkpoint was 30
    done = {"status": "completed", "steps": 6, "main_metric": "accuracy", "main_metric_value": 0.75}
    entries = [
        _cell(sweep, "a=completed", done),
        _cell(sweep, "b=running", {"status": "running", "pid": __import__("os").getpid()}, lines),
        _cell(sweep, "c=interrupted", {"status": "running", "pid": _dead_pid()}, lines, ckpt_step=10),
        _cell(sweep, "d=failed", {"status": "failed", "error": "UserError: bad"}),
        _cell(sweep, "e=pending"),
        _cell(sweep, "f=resumed", {"status": "running", "pid": __import__("os").getpid()}, resumed, ckpt_step=30),
    ]
    entries[0]["status"] = "skipped"
    for e in entries:
        e.update(launcher="local", host=host)
    manifest = {"launcher": "local", "host": host, "launcher_pid": _dead_pid(), "finished": False, "cells": entries}
    (sweep / ".cells").mkdir()
    (sweep / ".cells" / "manifest.json").write_text(json.dumps(manifest))

    info = status.collect(sweep)
    rows = {r["cell"]: r for r in info["cells"]}
    assert {n: r["state"] for n, r in rows.items()} == {
        "a=completed": "completed",
        "b=running": "running",
        "c=interrupted": "interrupted",
        "d=failed": "failed",
        "e=pending": "pending",
        "f=resumed": "running",
    }
    assert (rows["a=completed"]["step"], rows["a=completed"]["value"]) == (6, 0.75)
    assert (rows["b=running"]["step"], rows["b=running"]["total"]) == (10, 60)
    assert (rows["f=resumed"]["step"], rows["f=resumed"]["resumed_from"]) == (34, 30)
    assert "process is gone" in rows["c=interrupted"]["note"] and rows["d=failed"]["note"] == "UserError: bad"
    assert info["submitter_alive"] is False

    proc = subprocess.run([sys.executable, "-m", "peft_lab.status", str(sweep)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "6 cells: 1 pending, 2 running, 1 interrupted, 1 completed, 1 failed" in proc.stdout
    assert "34/60 (resumed from 30)" in proc.stdout and "0.7500" in proc.stdout
    assert "The launcher is gone and nothing runs these cells now" in proc.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "peft_lab.status", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "peft_lab: error:" in bad.stderr


def test_slurm_states_map_to_cell_states(tmp_path):
    """squeue/sacct answers (as parsed) -> pending / running / requeued / completed / failed."""
    sweep = tmp_path / "sweep"

    def state(queue, acct, metrics=None, ckpt=None, name="x", submitted_at=None):
        entry = _cell(sweep, name, metrics, ckpt_step=ckpt)
        entry.update(job_id="7_3", log=str(sweep / ".submitit" / "7_3" / "7_3_0_log.err"), submitted_at=submitted_at)
        return status.cell_state(entry, queue, acct)

    running = {"status": "running", "pid": 1}
    assert state({"7_3": {"state": "PENDING", "reason": "Resources"}}, {}, name="p")["state"] == "pending"
    assert state({"7_3": {"state": "RUNNING", "reason": "None"}}, {}, running, name="r")["state"] == "running"
    requeued = state(
        {"7_3": {"state": "PENDING", "reason": "BeginTime"}},
        {"7_3": {"state": "PENDING", "requeues": 1}},
        running,
        ckpt=250,
        name="q",
    )
    assert (requeued["state"], requeued["step"], requeued["note"]) == ("requeued", 250, "BeginTime")
    # a failed cell submitted again: its old metrics.json predates the new job, so it is pending, not requeued
    old_failure = {"status": "failed", "error": "E", "started_at": "2020-01-01T00:00:00"}
    waiting = {"7_3": {"state": "PENDING", "reason": "Priority"}}
    assert state(waiting, {}, old_failure, name="again", submitted_at=time.time())["state"] == "pending"
    assert (
        state(
            waiting,
            None,
            {**old_failure, "status": "running", "started_at": _now()},
            name="ran",
            submitted_at=time.time() - 60,
        )["state"]
        == "requeued"
    )
    stopping = state({"7_3": {"state": "COMPLETING", "reason": "None"}}, {"7_3": {"state": "REQUEUED", "requeues": 1}})
    assert stopping["state"] == "requeued"
    again = state(
        {"7_3": {"state": "RUNNING", "reason": "None"}}, {"7_3": {"state": "RUNNING", "requeues": 1}}, name="g"
    )
    assert (again["state"], again["note"]) == ("running", "requeued 1x")
    assert state({}, {"7_3": {"state": "CANCELLED", "requeues": 0}}, running, name="c")["state"] == "failed"
    assert (
        state({}, {"7_3": {"state": "FAILED", "requeues": 0}}, {"status": "failed", "error": "E"}, name="f")["note"]
        == "E"
    )
    done = {"status": "completed", "steps": 6}
    assert state({}, {"7_3": {"state": "COMPLETED", "requeues": 0}}, done, name="d")["state"] == "completed"
    # sacct lag right after the end, or no SLURM client at all: submitit's result file decides
    assert state(None, None, running, name="n")["state"] == "running"
    assert state({}, {}, running, name="gone")["state"] == "failed"


def test_one_status_vocabulary_for_an_interrupted_run(tmp_path):
    """A run stopped by a signal is `interrupted` in its record, in status, in the report and in the sweep summary."""
    from peft_lab import report, runfiles, sweep

    sw = tmp_path / "sweep"
    rec = runfiles.RunRecord(status=runfiles.Status.interrupted, method="lora", dataset="sst2", model="tiny",
                             main_metric="accuracy", config={"method": {"name": "lora"}})  # fmt: skip
    run_dir = sw / "method=lora"
    rec.save(run_dir)
    entry = {"name": run_dir.name, "run_dir": str(run_dir), "status": "pending", "job_id": "", "log": None}
    assert status.cell_state(entry, None, None)["state"] == "interrupted"
    _, _, cells = report.aggregate(report.load_runs(sw))
    assert cells[("lora", "sst2")].status == "interrupted"
    cell = sweep.Cell(0, ["method=lora"], run_dir=run_dir)
    sweep._collect(cell, -15, sw)  # the cell's process ended by SIGTERM after writing "interrupted"
    assert cell.status == runfiles.Status.interrupted
    assert "1 interrupted" in sweep.write_summary(sw, [cell])


def test_several_array_jobs_and_multi_process_tasks(tmp_path):
    """A sweep split into several array jobs (more cells than MaxArraySize) is one sweep to status: every
    array is asked about and named; a cell of two processes is failed when either rank's result says so."""
    import pickle

    sweep = tmp_path / "sweep"
    done = {"status": "completed", "steps": 6, "main_metric": "accuracy", "main_metric_value": 0.5}
    entries = []
    for i, job in enumerate(["12_0", "12_1", "13_0", "13_1", "9"]):
        entry = _cell(sweep, f"seed={i}", done)
        entry.update(job_id=job, log=str(sweep / ".submitit" / job / f"{job}_0_log.err"))
        entries.append(entry)
    manifest = {"launcher": "slurm", "host": socket.gethostname(), "launcher_pid": _dead_pid(), "finished": True,
                "array_job_id": "9", "array_job_ids": ["9", "12", "13"], "cells": entries}  # fmt: skip
    (sweep / ".cells").mkdir()
    (sweep / ".cells" / "manifest.json").write_text(json.dumps(manifest))
    info = status.collect(sweep)
    assert info["array_job_ids"] == ["9", "12", "13"] and info["counts"]["completed"] == 5
    assert "array jobs 9, 12, 13" in status.render(info)

    # no SLURM answer: the result files of both ranks decide
    folder = tmp_path / ".submitit" / "20_1"
    folder.mkdir(parents=True)
    entry = {"job_id": "20_1", "log": str(folder / "20_1_0_log.err"), "tasks": 2}

    def result(rank: int, outcome: str) -> None:
        (folder / f"20_1_{rank}_result.pkl").write_bytes(pickle.dumps((outcome, None)))

    assert status.submitit_result(entry) is None
    result(0, "success")
    assert status.submitit_result(entry) is None  # rank 1 still running
    assert status.submitit_result({**entry, "tasks": 1}) == "success"
    result(1, "error")
    assert status.submitit_result(entry) == "error"
    result(1, "success")
    assert status.submitit_result(entry) == "success"
