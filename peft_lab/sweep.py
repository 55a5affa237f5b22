"""Sweeps: each cell in its own process or SLURM array task, completed cells skipped, a summary at the end.

``launch_local`` is what the ``cluster=local`` launcher runs. Every cell is a fresh
``python -m peft_lab.cell`` process, so seeds, CUDA peak-memory counters and
patched modules cannot leak from one cell to the next, and a crash (even a
segfault or an out-of-memory kill) ends only that cell.

``launch_slurm`` is what ``cluster=slurm`` runs: the cells that still need to run go
out as ONE array job (hydra-submitit-launcher's ``SlurmLauncher``), the submitting
process waits for every task and never raises on a failed one. Both launchers share
the rest: deterministic run dirs (``prepare_cells``), skipping completed cells, the
manifest that ``python -m peft_lab.status`` reads, and the summary / failure report
(``finish_sweep``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from peft_lab.metrics import write_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CELLS_DIR = ".cells"
MANIFEST_FILE = "manifest.json"  # <sweep>/.cells/manifest.json: every cell, its run dir, job id and log


@dataclass
class Cell:
    idx: int
    overrides: list[str]
    run_dir: Optional[Path] = None
    status: str = "pending"  # pending | skipped | completed | failed
    error: str = ""
    log_path: Optional[Path] = None
    wall_s: float = 0.0
    metrics: dict = field(default_factory=dict)
    job_id: str = ""  # SLURM: <array job>_<task>
    meta: dict = field(default_factory=dict)  # method / dataset / model / seed, for the report's missing cells

    @property
    def name(self) -> str:
        return self.run_dir.name if self.run_dir else " ".join(self.overrides)


def read_metrics(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def is_completed(run_dir: Path) -> bool:
    return read_metrics(run_dir).get("status") == "completed"


def prepare_cells(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> tuple[Path, list]:
    """Each cell's deterministic run dir, derived as Hydra's own launchers do (``load_sweep_config`` +
    ``hydra.sweep.subdir``); cells whose metrics.json says completed are marked skipped."""
    config = launcher.config
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    (sweep_dir / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    if config.get("logger") is not None and config.logger.get("backend") == "wandb":
        from peft_lab import tracking

        tracking.pin_group(sweep_dir, config.logger.get("group"))
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    cells = []
    for offset, overrides in enumerate(job_overrides):
        cell = Cell(initial_job_idx + offset, list(overrides))
        try:
            sweep_cfg = launcher.hydra_context.config_loader.load_sweep_config(config, cell.overrides)
            cell.run_dir = sweep_dir / str(sweep_cfg.hydra.sweep.subdir)
            cell.meta = {
                "method": str(sweep_cfg.method.name),
                "dataset": str(sweep_cfg.dataset.name),
                "model": str(sweep_cfg.model.name),
                "seed": int(sweep_cfg.seed),
            }
        except Exception as err:  # a bad override in one cell fails that cell only
            cell.status, cell.error = "failed", f"config error: {err}".replace("\n", " ")
        cells.append(cell)
    for cell in cells:
        if cell.status == "pending" and is_completed(cell.run_dir):
            cell.status, cell.metrics = "skipped", read_metrics(cell.run_dir)
    return sweep_dir, cells


def log_plan(sweep_dir: Path, cells: list, how: str) -> None:
    pending = sum(c.status == "pending" for c in cells)
    skipped = sum(c.status == "skipped" for c in cells)
    log.info(f"Sweep {sweep_dir}: {len(cells)} cells, {skipped} already completed (skipped), {pending} to run, {how}")


def write_manifest(sweep_dir: Path, cells: list, launcher: str, **extra: Any) -> None:
    """Record every cell (run dir, launcher, job id, log) for ``python -m peft_lab.status``.

    Entries of an earlier launch into the same sweep dir that this launch does not cover are kept.
    """
    old = read_manifest(sweep_dir)
    entries = {e["name"]: e for e in old.get("cells", [])}
    stamp = {"launcher": launcher, "host": socket.gethostname(), "launcher_pid": os.getpid()}
    for c in cells:
        prev = entries.get(c.name, {})
        same_job = bool(c.job_id) and prev.get("job_id") == c.job_id
        submitted = prev.get("submitted_at") if same_job else (extra.get("submitted_at") if c.job_id else None)
        entries[c.name] = {
            "idx": c.idx,
            "name": c.name,
            "overrides": c.overrides,
            **(c.meta or {k: prev[k] for k in ("method", "dataset", "model", "seed") if k in prev}),
            "run_dir": str(c.run_dir) if c.run_dir else None,
            "status": c.status,
            "error": c.error,
            "job_id": c.job_id,
            "submitted_at": submitted,
            "log": str(c.log_path) if c.log_path else None,
            **stamp,
        }
    data = {k: v for k, v in old.items() if k != "cells"} if old.get("launcher_pid") == os.getpid() else {}
    data.update(stamp, sweep_dir=str(sweep_dir), updated_at=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
    data["cells"] = sorted(entries.values(), key=lambda e: (e.get("idx", 0), e["name"]))
    write_atomic(sweep_dir / CELLS_DIR / MANIFEST_FILE, json.dumps(data, indent=1))


def read_manifest(sweep_dir: Path) -> dict:
    try:
        return json.loads((Path(sweep_dir) / CELLS_DIR / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_report(sweep_dir: Path) -> None:
    """The sweep's report (tables, plots, W&B report run); a problem here never fails the sweep."""
    try:
        from peft_lab import report

        paths = report.build(sweep_dir, report.sweep_logger(sweep_dir), quiet=True)
        log.info(f"Report: {paths['markdown']} (+ report.csv, runs.csv, {len(report.PLOTS)} plots)")
    except Exception as err:
        log.warning(f"report failed ({type(err).__name__}: {err}); run python -m peft_lab.report {sweep_dir}")


def finish_sweep(sweep_dir: Path, cells: list, launcher: str) -> list:
    """Summary files + table; exit 1 naming each failed cell and its log; else Hydra's JobReturns."""
    from hydra.core.utils import JobReturn, JobStatus

    write_manifest(sweep_dir, cells, launcher, finished=True)
    rows = write_summary(sweep_dir, cells)
    print(rows, flush=True)
    write_report(sweep_dir)
    failed = [c for c in cells if c.status == "failed"]
    if failed:
        lines = [f"{len(failed)} of {len(cells)} cells failed:"]
        for c in failed:
            lines.append(f"  {c.name}: {c.error or 'see log'}  log: {c.log_path or '-'}")
        lines.append(f"Re-run the same command with hydra.sweep.dir={sweep_dir} to run only these again.")
        print("\n".join(lines), file=sys.stderr, flush=True)
        sys.exit(1)

    returns = []
    for c in cells:
        ret = JobReturn()
        ret.overrides, ret.status = c.overrides, JobStatus.COMPLETED
        ret.working_dir = str(c.run_dir)
        ret._return_value = (c.metrics or {}).get("main_metric_value")
        returns.append(ret)
    return returns


# ----------------------------------------------------------------------------- local


def launch_local(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    from hydra.core.singleton import Singleton

    config = launcher.config
    parallel = launcher.parallel or int(config.cluster.parallel or 1)
    sweep_dir, cells = prepare_cells(launcher, job_overrides, initial_job_idx)
    cells_dir = sweep_dir / CELLS_DIR
    pending = [c for c in cells if c.status == "pending"]
    for cell in pending:
        cell.log_path = cells_dir / f"cell_{cell.idx}.log"
    log_plan(sweep_dir, cells, f"{parallel} at a time")
    write_manifest(sweep_dir, cells, "local", finished=False)

    import cloudpickle

    state = {
        "hydra_context": launcher.hydra_context,
        "task_function": launcher.task_function,
        "config": config,
        "singleton_state": Singleton.get_state(),
    }
    state_path = cells_dir / "launcher.pkl"
    state_path.write_bytes(cloudpickle.dumps(state))

    threads = max(1, (os.cpu_count() or 1) // parallel)
    _run_cells(pending, state_path, cells_dir, parallel, threads)
    return finish_sweep(sweep_dir, cells, "local")


def _run_cells(cells: list[Cell], state_path: Path, cells_dir: Path, parallel: int, threads: int) -> None:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PEFT_LAB_THREADS=str(threads))
    queue = list(cells)
    running: list[tuple[Cell, subprocess.Popen, threading.Thread, float]] = []
    while queue or running:
        while queue and len(running) < parallel:
            cell = queue.pop(0)
            cell.log_path = cells_dir / f"cell_{cell.idx}.log"
            cmd = [sys.executable, "-m", "peft_lab.cell", str(state_path), str(cell.idx), *cell.overrides]
            log.info(f"#{cell.idx} {' '.join(cell.overrides)}  ->  {cell.run_dir}")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            pump = threading.Thread(target=_pump, args=(proc, cell.log_path, parallel == 1), daemon=True)
            pump.start()
            running.append((cell, proc, pump, time.monotonic()))
        time.sleep(0.2)
        for item in list(running):
            cell, proc, pump, start = item
            if proc.poll() is None:
                continue
            pump.join()
            running.remove(item)
            cell.wall_s = time.monotonic() - start
            _collect(cell, proc.returncode, cells_dir)


def _pump(proc: subprocess.Popen, log_path: Path, echo: bool) -> None:
    with open(log_path, "wb") as out:
        for line in iter(proc.stdout.readline, b""):
            out.write(line)
            out.flush()
            if echo:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()


def _collect(cell: Cell, returncode: int, cells_dir: Path) -> None:
    result_path = cells_dir / f"cell_{cell.idx}.result.json"
    result = {}
    if result_path.exists():
        result = json.loads(result_path.read_text())
    cell.metrics = read_metrics(cell.run_dir)
    if returncode == 0 and cell.metrics.get("status") == "completed":
        cell.status = "completed"
        return
    cell.status = "failed"
    cell.error = result.get("error") or f"process exited with code {returncode}"
    if (cell.run_dir / "train.log").exists() and not cell.log_path:
        cell.log_path = cell.run_dir / "train.log"


# ----------------------------------------------------------------------------- SLURM


def launch_slurm(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    """The cells still to run as ONE array job; wait for every task; never raise on a failed one."""
    from hydra.core.singleton import Singleton

    sweep_dir, cells = prepare_cells(launcher, job_overrides, initial_job_idx)
    pending = [c for c in cells if c.status == "pending"]
    params = launcher.params
    attached = _attach_live_tasks(sweep_dir, pending)
    to_submit = [c for c in pending if c.job_id == ""]
    how = f"as one SLURM array job (partition {params.get('partition') or 'default'})"
    if attached:
        how += f"; {len(attached)} still queued or running from an earlier launch: waiting for those instead"
    log_plan(sweep_dir, cells, how)
    write_manifest(sweep_dir, cells, "slurm", finished=False)
    if not pending:
        return finish_sweep(sweep_dir, cells, "slurm")

    submitted = time.time()
    jobs, array_id = [], ""
    if to_submit:
        executor = _slurm_executor(params)
        state = Singleton.get_state()
        job_args = [(c.overrides, "hydra.sweep.dir", c.idx, f"job_id_for_{c.idx}", state) for c in to_submit]
        jobs = executor.map_array(launcher, *zip(*job_args))
        for cell, job in zip(to_submit, jobs):
            cell.job_id, cell.log_path = str(job.job_id), Path(job.paths.stderr)
            log.info(f"#{cell.idx} {' '.join(cell.overrides)}  ->  {cell.run_dir}  (task {cell.job_id})")
        array_id = str(jobs[0].job_id).split("_")[0]
        write_manifest(sweep_dir, cells, "slurm", finished=False, array_job_id=array_id, submitted_at=submitted)
        log.info(
            f"Submitted array job {array_id} ({len(jobs)} tasks). It runs on if this process dies; "
            f"watch it with: python -m peft_lab.status {sweep_dir}"
        )
    ids = sorted({c.job_id.split("_")[0] for c in pending})
    try:
        _wait_slurm(list(zip(to_submit, jobs)) + attached)
    except KeyboardInterrupt:
        print(
            f"\nStopped waiting; SLURM job(s) {', '.join(ids)} keep running.\n"
            f"  watch:  python -m peft_lab.status {sweep_dir}\n  cancel: scancel {' '.join(ids)}",
            file=sys.stderr,
            flush=True,
        )
        raise
    log.info(f"All {len(pending)} tasks done {time.time() - submitted:.1f}s after submission (job {', '.join(ids)})")
    return finish_sweep(sweep_dir, cells, "slurm")


def _attach_live_tasks(sweep_dir: Path, pending: list) -> list:
    """Cells whose task from an earlier launch into this sweep dir is still queued or running (its
    submitting shell died, say): wait for that task rather than start a second one on the same run dir."""
    from peft_lab.status import squeue_states

    earlier = {e["name"]: e for e in read_manifest(sweep_dir).get("cells", []) if e.get("job_id") and e.get("log")}
    candidates = [c for c in pending if c.name in earlier]
    if not candidates:
        return []
    live = squeue_states({str(earlier[c.name]["job_id"]).split("_")[0] for c in candidates}) or {}
    attached = []
    for cell in candidates:
        entry = earlier[cell.name]
        if entry["job_id"] not in live:
            continue
        import submitit

        folder = Path(entry["log"]).parent.parent / "%j"
        cell.job_id, cell.log_path = str(entry["job_id"]), Path(entry["log"])
        attached.append((cell, submitit.SlurmJob(folder=folder, job_id=cell.job_id)))
        log.info(f"#{cell.idx} {cell.name}: task {cell.job_id} is {live[cell.job_id]['state'].lower()}; waiting for it")
    return attached


def _slurm_executor(params: dict) -> Any:
    """The executor hydra-submitit-launcher's ``BaseSubmititLauncher.launch`` builds, from the same params."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    init_keys = {"submitit_folder", "max_num_timeout"}
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=int(params["max_num_timeout"])
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in init_keys})
    return executor


def _wait_slurm(pending: list, poll_s: Optional[float] = None) -> None:
    """Collect each task as it finishes (result file, or sacct's final state for a task killed without one).

    A requeued task is not finished: submitit (sacct) reports it as REQUEUED/PENDING until it runs again.
    """
    remaining = list(pending)
    poll_s = poll_s or (1.0 if len(pending) <= 64 else 5.0)  # each check stats a result file per task
    while remaining:
        for item in list(remaining):
            cell, job = item
            if not job.done():
                continue
            remaining.remove(item)
            err = None
            try:
                ret = job.result()
                if getattr(ret, "status", None) is not None and ret.status.name != "COMPLETED":
                    err = ret._return_value
            except Exception as exc:  # FailedJobError, UncompletedJobError, ...: this cell only
                err = exc
            _collect_slurm(cell, err)
            value = cell.metrics.get("main_metric_value")
            shown = f"{cell.metrics.get('main_metric')} = {value:.4f}" if value is not None else cell.error
            log.info(f"#{cell.idx} {cell.name} (task {cell.job_id}): {cell.status}  {shown}")
        if remaining:
            time.sleep(poll_s)


def _collect_slurm(cell: Cell, err: Optional[BaseException]) -> None:
    cell.metrics = read_metrics(cell.run_dir)
    if err is None and cell.metrics.get("status") == "completed":
        cell.status = "completed"
        return
    cell.status = "failed"
    # the task's own traceback first: metrics.json may still hold an earlier attempt's error
    cell.error = _short_error(err)
    if not cell.error and cell.metrics.get("status") == "failed" and cell.metrics.get("error"):
        cell.error = str(cell.metrics["error"]).replace("\n", " ")[:500]
    cell.error = cell.error or "task ended without a result"


def _short_error(err: Optional[BaseException]) -> str:
    """One line from submitit's errors: the exception line of a task's traceback
    ("peft_lab.errors.UserError: ..." -> "UserError: ..."), else the first line."""
    if err is None:
        return ""
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and set(ln.strip()) != {"-"}]
    if not lines:
        return type(err).__name__
    if "Traceback" in text:
        line = next(
            (ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", ln)), lines[-1]
        )
        line = re.sub(r"^(?:\w+\.)+(?=\w+(?::|$))", "", line)
    else:
        line = " ".join(
            lines[:2]
        )  # UncompletedJobError: "Job 7_3 (task: 0) with path ... / has not produced any output (state: ...)"
    return line[:500]


def run_slurm_task(call: Callable[[], Any]) -> Any:
    """Inside an array task (and again after a requeue): run the cell; raise if it failed.

    Raising makes SLURM record the task as FAILED and submitit store the traceback, which
    the submitting process reports. The run dir is derived from the overrides, so a
    requeued task finds its checkpoint and resumes from it (train.resume=true).
    """
    from hydra.core.utils import JobStatus

    import peft_lab.config  # noqa: F401  (the cell_dir resolver the run dir needs)
    from peft_lab.errors import UserError

    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and not os.environ.get("PEFT_LAB_THREADS"):
        os.environ["PEFT_LAB_THREADS"] = cpus  # the allocation, not every core of the node
    ret = call()
    if ret.status != JobStatus.COMPLETED:
        err = ret._return_value
        if isinstance(err, UserError):
            print(f"peft_lab: error: {err}", file=sys.stderr, flush=True)
        raise err
    return ret


# ----------------------------------------------------------------------------- summary


def summary_rows(cells: list[Cell]) -> list[dict]:
    rows = []
    for c in cells:
        m = c.metrics or {}
        value = m.get("main_metric_value")
        rows.append(
            {
                "cell": c.name,
                "status": c.status,
                "metric": m.get("main_metric", ""),
                "value": "" if value is None else f"{value:.4f}",
                "time_s": f"{c.wall_s or m.get('run_wall_s') or 0.0:.1f}",
                "log": str(c.log_path or ""),
            }
        )
    return rows


def write_summary(sweep_dir: Path, cells: list[Cell]) -> str:
    """Write summary.md / summary.csv into the sweep dir; return the printed table."""
    rows = summary_rows(cells)
    cols = ["cell", "status", "metric", "value", "time_s"]
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in cols}
    lines = [" | ".join(k.ljust(widths[k]) for k in cols)]
    lines.append("-|-".join("-" * widths[k] for k in cols))
    lines += [" | ".join(r[k].ljust(widths[k]) for k in cols) for r in rows]
    table = "\n".join(lines)
    counts = {s: sum(c.status == s for c in cells) for s in ("completed", "skipped", "failed")}
    footer = ", ".join(f"{n} {s}" for s, n in counts.items())
    text = f"Sweep summary ({footer})\n{table}\n"
    write_atomic(sweep_dir / "summary.md", f"# {text}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else cols)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(sweep_dir / "summary.csv", buf.getvalue())
    return text
