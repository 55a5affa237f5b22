"""``python -m peft_lab.status <sweep dir>``: where each cell of a sweep stands.

Works from any shell, while the sweep runs, after it ended, and after the submitting
shell died (SLURM jobs live on). It only reads:

- ``<sweep>/.cells/manifest.json`` (written by the launchers: cells, run dirs, job ids, logs);
- each run dir: ``metrics.json`` (the run record: status, main metric), ``progress.json``
  (step k of N, resumed from) and ``checkpoint/state.json`` (last saved step);
- SLURM: ``squeue`` (live state of queued/running tasks) and ``sacct`` (final states and
  requeued attempts), when those commands answer; else submitit's result pickles.

States (``peft_lab.runfiles.Status``, the same words the launchers and the report use):
pending, running, requeued (waiting to run again after a preemption, timeout or
``scontrol requeue``), interrupted (stopped by a signal, or its process is gone; re-running
the sweep resumes it), completed, failed. Light: no torch, no submitit.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from peft_lab import runfiles as rf
from peft_lab.runfiles import Status

RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
REQUEUED = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "SUSPENDED", "STOPPED", "RESV_DEL_HOLD"}
WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "SUSPENDED", "STOPPED"}
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "REVOKED"}


# ----------------------------------------------------------------------------- SLURM


def _run(cmd: list[str], timeout: float = 15.0) -> Optional[str]:
    if not shutil.which(cmd[0]):
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0 and "Invalid job id" in proc.stderr:
        return ""  # squeue: none of these jobs is known any more (ended more than MinJobAge ago)
    return proc.stdout if proc.returncode == 0 else None


def squeue_states(array_ids: set[str]) -> Optional[dict[str, dict]]:
    """{task id: {state, reason}} for tasks still queued or running; None when squeue does not answer."""
    if not array_ids:
        return {}
    out = _run(["squeue", "-h", "-r", "-j", ",".join(sorted(array_ids)), "-o", "%i|%T|%r"])
    if out is None:
        return None
    states = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = {"state": parts[1].split()[0], "reason": parts[2]}
    return states


def sacct_states(array_ids: set[str]) -> Optional[dict[str, dict]]:
    """{task id: {state, requeues}} from accounting (every attempt, -D); None without accounting."""
    if not array_ids:
        return {}
    out = _run(["sacct", "-n", "-P", "-X", "-D", "-j", ",".join(sorted(array_ids)), "-o", "JobID,State,ExitCode"])
    if out is None:
        return None
    states: dict[str, dict] = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or "[" in parts[0]:  # "12_[3-11]": tasks not started yet (squeue lists them)
            continue
        entry = states.setdefault(parts[0], {"state": "", "requeues": 0, "exit_code": ""})
        state = parts[1].split()[0]  # "CANCELLED by 0"
        if state == "REQUEUED":
            entry["requeues"] += 1
        entry["state"], entry["exit_code"] = state, parts[2] if len(parts) > 2 else ""
    return states


def submitit_result(entry: dict) -> Optional[str]:
    """'success' / 'error' from the task's submitit result pickles (one per process: ``<job>_<rank>_result.pkl``;
    a cell of several processes has ``tasks`` of them); None while none of them says 'error' and one is missing."""
    log = entry.get("log")
    job = entry.get("job_id")
    if not log or not job:
        return None
    outcomes = []
    for rank in range(max(1, int(entry.get("tasks") or 1))):
        path = Path(log).with_name(f"{job}_{rank}_result.pkl")
        if not path.exists():
            outcomes.append(None)
            continue
        try:
            with path.open("rb") as f:
                outcomes.append(str(pickle.load(f)[0]))
        except Exception:  # unreadable (being written, or needs a module we do not have): it exists
            outcomes.append("unknown")
    if "error" in outcomes:
        return "error"
    return None if None in outcomes else outcomes[0]


# ----------------------------------------------------------------------------- run dirs


def progress(run_dir: Optional[Path], rec: Optional[rf.RunRecord]) -> dict:
    """Step reached (k) and total (N) from the run's progress file, the step its last attempt resumed
    from, and the step of the last checkpoint (where a requeued run will resume)."""
    out = {"step": None, "total": None, "resumed_from": None, "checkpoint_step": None}
    if run_dir is None:
        return out
    if rec is not None and rec.status == Status.completed:
        out.update(step=rec.steps, total=rec.total_steps or rec.steps, resumed_from=rec.resumed_from_step,
                   checkpoint_step=rec.steps)  # fmt: skip
        return out
    out["checkpoint_step"] = rf.checkpoint_step(run_dir)
    prog = rf.read_progress(run_dir)
    out.update(step=prog.get("step"), total=prog.get("total"), resumed_from=prog.get("resumed_from") or None)
    if rec is not None and rec.diverged_at_step is not None:
        out["step"] = rec.diverged_at_step  # where the loss stopped being a number
    if out["step"] is None:
        out["step"] = out["checkpoint_step"]
    return out


def _ran_since(run_dir: Path, rec: Optional[rf.RunRecord], submitted_at: Optional[float]) -> bool:
    """Did this cell's current job already run (so waiting again means requeued)? Its metrics.json or
    checkpoint is newer than the submission; without a submission time, whether either exists."""
    ckpt = rf.checkpoint_dir(run_dir) / rf.CHECKPOINT_STATE
    if submitted_at is None:
        return rec is not None or ckpt.exists()
    try:
        if time.mktime(time.strptime(rec.started_at, "%Y-%m-%dT%H:%M:%S")) >= submitted_at - 1:
            return True
    except (AttributeError, TypeError, ValueError, OverflowError):
        pass
    try:
        return ckpt.stat().st_mtime >= submitted_at
    except OSError:
        return False


# ----------------------------------------------------------------------------- cells


def discover(sweep_dir: Path) -> list[dict]:
    """Cells of a sweep without a manifest: run dirs holding metrics.json or .hydra/."""
    entries = []
    for d in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (d / rf.METRICS_FILE).exists() or (d / ".hydra").exists():
            entries.append({"name": d.name, "run_dir": str(d), "status": "pending", "job_id": "", "log": None})
    return entries


def cell_state(entry: dict, queue: Optional[dict], acct: Optional[dict], selection_only: bool = False) -> dict:
    """One cell's row: its ``Status`` (``state``), progress, metric, SLURM state and a note.
    ``selection_only``: a protocol run that is not (yet) a reported one shows its selection-split metric,
    never its test metric (the choice must not be made, nor seem made, on the test split)."""
    run_dir = Path(entry["run_dir"]) if entry.get("run_dir") else None
    rec = rf.read_record(run_dir) if run_dir else None
    job = entry.get("job_id") or ""
    prog = progress(run_dir, rec)
    row = {
        "cell": entry["name"],
        "state": Status.pending,
        "step": prog["step"],
        "total": prog["total"],
        "resumed_from": prog["resumed_from"],
        "metric": (f"{rec.main_metric} (selection)" if selection_only else rec.main_metric) if rec else None,
        "value": (rec.select_value if selection_only else rec.value) if rec else None,
        "job_id": job,
        "slurm_state": "",
        "requeues": 0,
        "log": entry.get("log")
        or (str(run_dir / rf.TRAIN_LOG) if run_dir and (run_dir / rf.TRAIN_LOG).exists() else ""),
        "run_dir": str(run_dir) if run_dir else "",
        "note": "",
    }
    rstatus = rec.status if rec else None
    error = (rec.error if rec else None) or ""
    if rstatus == Status.completed:
        row["state"] = Status.completed
        if entry.get("skipped"):
            row["note"] = "skipped (completed earlier)"
        return row
    if run_dir is None:  # the cell's config did not compose
        row.update(state=Status.failed, note=entry.get("error", ""))
        return row
    if job:
        q = (queue or {}).get(job)
        a = (acct or {}).get(job, {})
        row["requeues"] = a.get("requeues", 0)
        slurm = q["state"] if q else a.get("state", "")
        row["slurm_state"] = slurm
        if slurm in RUNNING and slurm != "RUNNING" and a.get("state") == "REQUEUED":
            row.update(state=Status.requeued, note="stopping; will run again")  # COMPLETING after a requeue
        elif slurm in RUNNING:
            row["state"] = Status.running
            if row["requeues"]:
                row["note"] = f"requeued {row['requeues']}x"
        elif slurm in WAITING:
            attempted = row["requeues"] > 0 or _ran_since(run_dir, rec, entry.get("submitted_at"))
            row["state"] = Status.requeued if slurm in REQUEUED or attempted else Status.pending
            if row["state"] == Status.requeued and prog["checkpoint_step"] is not None:
                row["step"] = prog["checkpoint_step"]  # where it will resume
            if q and q.get("reason") not in ("", "None", None):
                row["note"] = q["reason"]
        elif slurm in FAILED or slurm == "COMPLETED":  # COMPLETED without a completed record: no result
            row.update(state=Status.failed, note=error or f"SLURM state {slurm}")
        else:  # no SLURM answer (no client, no accounting, sacct lag): submitit's files
            result = submitit_result(entry)
            if result == "error" or rstatus == Status.failed:
                row.update(state=Status.failed, note=error or "task raised (see log)")
            elif result is not None:
                row.update(state=Status.failed, note="task ended without a completed record")
            elif queue is not None and acct is not None:
                row.update(state=Status.failed, note="not in the queue and no result")
            elif rstatus == Status.running:
                row["state"] = Status.running
        return row
    # local launcher (or no job id): the run dir and the processes
    if rstatus == Status.failed:
        row.update(state=Status.failed, note=error)
    elif rstatus == Status.interrupted:
        again = (
            "resume from its checkpoint" if prog["checkpoint_step"] is not None else "run it again (no checkpoint yet)"
        )
        row.update(state=Status.interrupted, note=f"re-run the sweep to {again}")
    elif rstatus == Status.running:
        alive = rf.pid_alive(rec.pid, rec.host or entry.get("host"), rec.started_at)
        if alive is False:
            row.update(state=Status.interrupted, note="its process is gone; re-run the sweep to resume")
        else:
            row["state"] = Status.running
    elif entry.get("status") == Status.failed.value:
        row.update(state=Status.failed, note=entry.get("error", ""))
    return row


def collect(sweep_dir: Path) -> dict:
    sweep_dir = Path(sweep_dir).absolute()
    manifest = rf.read_manifest(sweep_dir)
    entries = manifest.get("cells") or discover(sweep_dir)
    # every SLURM job the cells ran in: one array per launch, or several (more cells than MaxArraySize)
    array_ids = {str(e["job_id"]).split("_")[0] for e in entries if e.get("job_id")}
    queue = squeue_states(array_ids)
    acct = sacct_states(array_ids)
    protocol = rf.read_protocol(sweep_dir)
    reported = {Path(str(n)).name for arm in protocol.get("arms", []) for n in arm.get("stage2", [])}
    rows = [cell_state(e, queue, acct, bool(protocol) and e["name"] not in reported) for e in entries]
    submitter = rf.pid_alive(manifest.get("launcher_pid"), manifest.get("host"))
    for r in rows:
        r["state"] = Status(r["state"]).value  # plain words in the JSON output
    return {
        "sweep_dir": str(sweep_dir),
        "launcher": manifest.get("launcher", ""),
        "array_job_ids": sorted(array_ids, key=lambda j: (len(j), j)),  # numeric order
        "submitter_pid": manifest.get("launcher_pid"),
        "submitter_alive": submitter,
        "finished": manifest.get("finished"),
        "slurm_queue": bool(array_ids) and queue is not None,
        "slurm_accounting": bool(array_ids) and acct is not None,
        "cells": rows,
        "counts": {s.value: sum(r["state"] == s.value for r in rows) for s in Status},
    }


def render(info: dict) -> str:
    head = f"Sweep {info['sweep_dir']}"
    if info["launcher"]:
        head += f"  (launcher {info['launcher']}"
        if info["array_job_ids"]:
            ids = info["array_job_ids"]
            head += f", array job{'s' if len(ids) > 1 else ''} {', '.join(ids)}"
        if info["submitter_pid"]:
            alive = {True: "running", False: "done" if info["finished"] else "gone", None: "on another host"}[
                info["submitter_alive"]
            ]
            head += f", submitter pid {info['submitter_pid']} {alive}"
        head += ")"
    counts = ", ".join(f"{n} {s}" for s, n in info["counts"].items() if n)
    table_rows = []
    for r in info["cells"]:
        step = "-" if r["step"] is None else str(r["step"])
        if r["total"] is not None and r["step"] is not None:
            step = f"{r['step']}/{r['total']}"
        if r["resumed_from"]:
            step += f" (resumed from {r['resumed_from']})"
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        table_rows.append(
            {
                "cell": r["cell"],
                "state": r["state"],
                "step": step,
                "metric": r["metric"] or "",
                "value": value,
                "job": r["job_id"],
                "log": r["log"],
                "note": r["note"][:120],
            }
        )
    cols = ["cell", "state", "step", "metric", "value", "job", "log", "note"]
    if not any(r["job"] for r in table_rows):
        cols.remove("job")
    widths = {k: max([len(k)] + [len(r[k]) for r in table_rows]) for k in cols}
    lines = [head, f"{len(table_rows)} cells: {counts or 'none'}"]
    lines.append(" | ".join(k.ljust(widths[k]) for k in cols).rstrip())
    lines.append("-|-".join("-" * widths[k] for k in cols))
    lines += [" | ".join(r[k].ljust(widths[k]) for k in cols).rstrip() for r in table_rows]
    if info["submitter_alive"] is False and not info["finished"]:
        if info["launcher"] == "slurm":
            lines.append(
                "The submitting process is gone; its tasks run on. Once none is pending or running, re-run the "
                f"sweep command with hydra.sweep.dir={info['sweep_dir']} to write the summary (completed cells are "
                "skipped)."
            )
        else:
            lines.append(
                "The launcher is gone and nothing runs these cells now. Re-run the sweep command with "
                f"hydra.sweep.dir={info['sweep_dir']}: completed cells are skipped, interrupted ones resume."
            )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peft_lab.status",
        description="Where each cell of a sweep stands: pending / running / requeued / completed / failed, "
        "step, main metric and log; from the run dirs, the launcher's manifest and SLURM (squeue/sacct).",
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the state as JSON")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="print again every SECONDS until no cell waits")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(
            f"peft_lab: error: {args.sweep_dir} is not a directory. Fix: give a sweep dir (hydra.sweep.dir)",
            file=sys.stderr,
        )
        return 2
    if not rf.cells_dir(args.sweep_dir).is_dir() and not discover(args.sweep_dir):
        print(
            f"peft_lab: error: {args.sweep_dir} holds no sweep cells. Fix: give a sweep dir (hydra.sweep.dir)",
            file=sys.stderr,
        )
        return 2
    while True:
        info = collect(args.sweep_dir)
        print(json.dumps(info, indent=1) if args.json else render(info), flush=True)
        busy = sum(info["counts"][s.value] for s in (Status.pending, Status.running, Status.requeued))
        if not args.watch or not busy:
            return 0
        time.sleep(args.watch)
        print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
