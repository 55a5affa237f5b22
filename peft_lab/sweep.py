"""Sweeps: each cell in its own process or SLURM array task, completed cells skipped, a summary at the end.

``launch_local`` is what the ``cluster=local`` launcher runs. Every cell is a process of
its own (forked from a fork server that imported the heavy libraries once on a machine
without a GPU, else a fresh ``python -m peft_lab.cell``), so seeds, CUDA peak-memory
counters and patched modules cannot leak from one cell to the next, and a crash (even a
segfault or an out-of-memory kill) ends only that cell. Concurrent cells get one CUDA
device each; stopping the launcher stops its cells cleanly (``interrupted``).

``launch_slurm`` is what ``cluster=slurm`` runs: the cells that still need to run go
out as ONE array job (hydra-submitit-launcher's ``SlurmLauncher``; several when there are
more cells than the cluster's ``MaxArraySize`` or ``cluster.max_array_size``), the
submitting process waits for every task and never raises on a failed one. Both launchers share
the rest: deterministic run dirs and the reuse rule (``prepare_cells``: a cell is skipped
only when its run dir holds a completed run of the same config fingerprint, and a run dir
of another config stops the sweep before anything is launched), the manifest that
``python -m peft_lab.status`` reads, and the summary / failure report (``finish_sweep``).
All file names and formats come from ``peft_lab.runfiles``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from peft_lab import runfiles as rf
from peft_lab.runfiles import LAUNCHER_PID_ENV, Status
from peft_lab.schemas import plain

log = logging.getLogger(__name__)


@dataclass
class Cell:
    """One cell of a sweep as the launcher sees it. ``skipped``: completed earlier with the same config."""

    idx: int
    overrides: list[str]
    run_dir: Optional[Path] = None
    status: Status = Status.pending
    skipped: bool = False
    error: str = ""
    log_path: Optional[Path] = None
    wall_s: float = 0.0
    record: Optional[rf.RunRecord] = None
    job_id: str = ""  # SLURM: <array job>_<task>
    meta: dict = field(default_factory=dict)  # method / dataset / model / seed / fingerprint
    device: Optional[str] = None  # local launcher: the CUDA device this cell was given

    @property
    def name(self) -> str:
        return self.run_dir.name if self.run_dir else " ".join(self.overrides)


def prepare_cells(
    launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, local: bool = True
) -> tuple[Path, list]:
    """Each cell's run dir and config fingerprint, derived as Hydra's own launchers do (``load_sweep_config``
    + ``hydra.sweep.subdir``). A cell whose run dir holds a completed run of the same config is marked
    skipped. Exits 2 (nothing launched) when two cells would share a run dir or a run dir holds a run of
    another config, naming the cells and the differing keys."""
    config = launcher.config
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    rf.cells_dir(sweep_dir).mkdir(parents=True, exist_ok=True)
    if config.get("logger") is not None and plain(config.logger.get("backend")) == "wandb":
        from peft_lab import tracking

        tracking.pin_group(sweep_dir, config.logger.get("group"))
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    cells, problems, by_dir = [], [], {}
    for offset, overrides in enumerate(job_overrides):
        cell = Cell(initial_job_idx + offset, list(overrides))
        try:
            sweep_cfg = launcher.hydra_context.config_loader.load_sweep_config(config, cell.overrides)
            cell.run_dir = sweep_dir / str(sweep_cfg.hydra.sweep.subdir)
            comp = rf.computation_config(sweep_cfg)
            cell.meta = {
                "method": str(sweep_cfg.method.name),
                "dataset": str(sweep_cfg.dataset.name),
                "model": str(sweep_cfg.model.name),
                "seed": int(sweep_cfg.seed),
                "fingerprint": rf.fingerprint(comp),
                "config": comp,  # the report groups cells that never wrote a record by it
            }
        except Exception as err:  # a bad override in one cell fails that cell only
            cell.status, cell.error = Status.failed, f"config error: {err}".replace("\n", " ")
            cells.append(cell)
            continue
        other = by_dir.setdefault(cell.run_dir, cell)
        if other is not cell:
            problems.append(
                f"cells #{other.idx} ({' '.join(other.overrides)}) and #{cell.idx} "
                f"({' '.join(cell.overrides)}) map to the same run dir {cell.run_dir}"
            )
        decision = rf.check_reusable(cell.run_dir, comp)
        rec = decision.record
        live = local and rec is not None and rec.status == Status.running  # SLURM: _attach_live_tasks waits
        if live and rf.pid_alive(rec.pid, rec.host, rec.started_at):
            problems.append(
                f"cell #{cell.idx}: {cell.run_dir} is being run right now by process {rec.pid} on this machine "
                "(an earlier launch whose launcher died?): wait for it, or stop it (kill -TERM "
                f"{rec.pid}: it records 'interrupted' and resumes here)"
            )
            cells.append(cell)
            continue
        if decision.action == rf.Reuse.skip:
            cell.status, cell.skipped, cell.record = Status.completed, True, decision.record
        elif decision.action == rf.Reuse.conflict:
            problems.append(f"cell #{cell.idx}: {decision.conflict_message(cell.run_dir)}")
        cells.append(cell)
    if problems:
        print(
            "peft_lab: error: this sweep cannot run as it is:\n  "
            + "\n  ".join(problems)
            + "\nFix: for a run dir of another config, run the sweep into a new folder (hydra.sweep.dir=...) or "
            "delete that run dir; for a cell that is running, wait for it or stop it. Nothing was launched.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    return sweep_dir, cells


def log_plan(sweep_dir: Path, cells: list, how: str) -> None:
    pending = sum(c.status == Status.pending for c in cells)
    skipped = sum(c.skipped for c in cells)
    log.info(f"Sweep {sweep_dir}: {len(cells)} cells, {skipped} already completed (skipped), {pending} to run, {how}")


def write_manifest(sweep_dir: Path, cells: list, launcher: str, **extra: Any) -> None:
    """Record every cell (run dir, fingerprint, launcher, job id, log) for ``status`` and ``report``.

    Entries of an earlier launch into the same sweep dir that this launch does not cover are kept.
    """
    old = rf.read_manifest(sweep_dir)
    entries = {e["name"]: e for e in old.get("cells", [])}
    stamp = {"launcher": launcher, "host": socket.gethostname(), "launcher_pid": os.getpid()}
    for c in cells:
        prev = entries.get(c.name, {})
        same_job = bool(c.job_id) and prev.get("job_id") == c.job_id
        submitted = prev.get("submitted_at") if same_job else (extra.get("submitted_at") if c.job_id else None)
        if c.skipped and prev:  # done earlier: keep where and how it ran (its job, log and device)
            entries[c.name] = {**prev, "status": c.status.value, "skipped": True, **stamp}
            continue
        entries[c.name] = {
            "idx": c.idx,
            "name": c.name,
            "overrides": c.overrides,
            **(
                c.meta
                or {k: prev[k] for k in ("method", "dataset", "model", "seed", "fingerprint", "config") if k in prev}
            ),
            "run_dir": str(c.run_dir) if c.run_dir else None,
            "status": c.status.value,
            "skipped": c.skipped,
            "error": c.error,
            "job_id": c.job_id,
            "device": c.device,
            "submitted_at": submitted,
            "log": str(c.log_path) if c.log_path else None,
            **stamp,
        }
    data = {k: v for k, v in old.items() if k != "cells"} if old.get("launcher_pid") == os.getpid() else {}
    data.update(stamp, sweep_dir=str(sweep_dir), updated_at=rf.now(), **extra)
    data["cells"] = sorted(entries.values(), key=lambda e: (e.get("idx", 0), e["name"]))
    rf.write_manifest(sweep_dir, data)


def write_report(sweep_dir: Path) -> None:
    """The sweep's report (tables, plots, W&B report run); a problem here never fails the sweep."""
    try:
        from peft_lab import report

        paths = report.build(sweep_dir, report.sweep_logger(sweep_dir), quiet=True)
        plots = sum(str(p).endswith(".png") for p in paths.values())
        log.info(f"Report: {paths['markdown']} (+ report.csv, runs.csv, {plots} plots)")
    except Exception as err:
        log.warning(f"report failed ({type(err).__name__}: {err}); run python -m peft_lab.report {sweep_dir}")


def finish_sweep(sweep_dir: Path, cells: list, launcher: str, stopped: bool = False, driven: bool = False) -> list:
    """Summary files + table + report; exit 1 naming each cell that did not complete and its log (130 when
    the launcher was stopped by Ctrl-C or SIGTERM); else Hydra's JobReturns.

    ``driven``: a sweeper runs this launch as one stage of several (``peft_lab.protocol``) and decides
    what a failed cell means: failed cells come back as ``JobStatus.FAILED`` returns, and the sweeper
    writes the report at its end. A stopped launcher still exits 130."""
    from hydra.core.utils import JobReturn, JobStatus

    write_manifest(sweep_dir, cells, launcher, finished=True)
    rows = write_summary(sweep_dir, cells)
    print(rows, flush=True)
    if not driven:
        write_report(sweep_dir)
    bad = [c for c in cells if c.status != Status.completed]
    if bad:
        lines = [f"{len(bad)} of {len(cells)} cells did not complete:"]
        for c in bad:
            started = c.log_path is not None and Path(c.log_path).exists()
            why = c.error or ("see log" if started else "not started")
            lines.append(f"  {c.name}: {c.status.value}: {why}  log: {c.log_path if started else '-'}")
        again = "resume the interrupted ones and run the rest" if stopped else "run only these again"
        lines.append(f"Re-run the same command with hydra.sweep.dir={sweep_dir} to {again}.")
        print("\n".join(lines), file=sys.stderr, flush=True)
        if stopped or not driven:
            sys.exit(130 if stopped else 1)

    returns = []
    for c in cells:
        ret = JobReturn()
        ret.overrides, ret.working_dir = c.overrides, str(c.run_dir)
        if c.status == Status.completed:
            ret.status, ret._return_value = JobStatus.COMPLETED, c.record.value if c.record else None
        else:
            ret.status, ret._return_value = JobStatus.FAILED, RuntimeError(c.error or c.status.value)
        returns.append(ret)
    return returns


# ----------------------------------------------------------------------------- local


def device_slots(parallel: int, nproc: int = 1) -> tuple[list[Optional[str]], str]:
    """The CUDA devices each of ``parallel`` concurrent cells gets (``nproc`` per cell: one per rank, as a
    ``CUDA_VISIBLE_DEVICES`` value such as ``"0,1"``), and a note for the log.

    The devices are those in ``CUDA_VISIBLE_DEVICES`` when it is set (an empty value: none),
    else the GPUs ``nvidia-smi -L`` lists. No device: every slot is None (CPU; the environment
    is left alone). More cells at once than device groups: capped, with a warning, so two cells
    never share a GPU unasked; fewer devices than ``nproc``: a UserError.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    else:
        devices = _nvidia_smi_devices()
    if not devices:
        return [None] * parallel, "no CUDA device"
    if nproc > len(devices):
        from peft_lab.errors import fail

        raise fail(
            f"cluster.nproc_per_cell={nproc} but only {len(devices)} CUDA device(s) are visible ({','.join(devices)})",
            f"use cluster.nproc_per_cell<={len(devices)} (one GPU per rank)",
        )
    groups = [",".join(devices[i : i + nproc]) for i in range(0, len(devices) - nproc + 1, nproc)]
    if parallel > len(groups):
        log.warning(
            f"cluster.parallel={parallel} but only {len(devices)} CUDA device(s) ({','.join(devices)}) for "
            f"{nproc} per cell: running {len(groups)} cells at once"
        )
        parallel = len(groups)
    what = "one CUDA device each" if nproc == 1 else f"{nproc} CUDA devices each, one per rank"
    return groups[:parallel], f"{what} ({' | '.join(groups[:parallel])})"


def _nvidia_smi_devices() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


def launch_local(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    from hydra.core.singleton import Singleton

    config = launcher.config
    parallel = max(1, int(launcher.parallel or config.cluster.parallel or 1))
    nproc = int(config.cluster.get("nproc_per_cell") or 1)
    if nproc < 1:
        print(f"peft_lab: error: cluster.nproc_per_cell={nproc} is not a number of processes. Fix: use 1 (one "
              "process per cell) or more. Nothing was launched.", file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(2)
    sweep_dir, cells = prepare_cells(launcher, job_overrides, initial_job_idx)
    try:
        slots, slot_note = device_slots(parallel, nproc)
    except Exception as err:  # a UserError: too few GPUs for the ranks asked for
        print(f"peft_lab: error: {err}. Nothing was launched.", file=sys.stderr, flush=True)
        sys.exit(2)
    if nproc > 1:
        slot_note += f"; {nproc} processes (data-parallel ranks) per cell"
    parallel = len(slots)
    pending = [c for c in cells if c.status == Status.pending]
    for cell in pending:
        cell.log_path = rf.cell_log(sweep_dir, cell.name)
    log_plan(sweep_dir, cells, f"{parallel} at a time, {slot_note}")
    write_manifest(sweep_dir, cells, "local", finished=False)

    import cloudpickle

    state = {
        "hydra_context": launcher.hydra_context,
        "task_function": launcher.task_function,
        "config": config,
        "singleton_state": Singleton.get_state(),
    }
    state_path = rf.cells_dir(sweep_dir) / rf.LAUNCHER_STATE
    state_path.write_bytes(cloudpickle.dumps(state))

    threads = max(1, (os.cpu_count() or 1) // (parallel * nproc))  # per process: every rank of every cell
    finished = _run_cells(pending, state_path, sweep_dir, slots, threads)
    return finish_sweep(sweep_dir, cells, "local", stopped=not finished, driven=_driven(launcher))


def can_fork_cells(slots: list) -> bool:
    """Start cells from a fork server that has imported torch, transformers and peft once?

    Only without any GPU (no device slot, no ``/dev/nvidiactl``): a process forked after the CUDA
    driver was initialised cannot use CUDA, so on a GPU machine every cell is a fresh interpreter.
    ``PEFT_LAB_FORK_CELLS=0`` turns it off.
    """
    if os.environ.get("PEFT_LAB_FORK_CELLS", "1") == "0" or any(s is not None for s in slots):
        return False
    return not Path("/dev/nvidiactl").exists() and sys.platform.startswith("linux")


class _Forked:
    """A cell forked by the fork server, with the Popen calls the loop needs. Only the launcher's loop
    polls it (``multiprocessing`` reads a child's exit status from one pipe: a second reader would
    see EOF and report exit code 255 for a cell that completed)."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self.pid = process.pid

    def poll(self) -> Optional[int]:
        return self.process.exitcode

    @property
    def returncode(self) -> Optional[int]:
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


class _Stop(Exception):
    """The launcher got SIGTERM."""


def _run_cells(cells: list[Cell], state_path: Path, sweep_dir: Path, slots: list, threads: int) -> bool:
    """Run ``cells`` as processes, ``len(slots)`` at a time; each running cell holds one slot (a CUDA device or None).

    Each cell is its own process either way: a fresh ``python -m peft_lab.cell`` (GPU machines), or a
    process forked from a fork server that imported the heavy libraries once (``can_fork_cells``).
    Returns False when the launcher was stopped (Ctrl-C or SIGTERM): the running cells are then asked
    to stop (SIGTERM: they record ``interrupted`` and resume when the sweep runs again), waited for and
    collected; cells not started stay ``pending``.
    """
    import signal

    thread_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PEFT_LAB_THREADS": str(threads),
                  LAUNCHER_PID_ENV: str(os.getpid())}  # fmt: skip
    base_env = dict(os.environ, **thread_env)
    fork = can_fork_cells(slots)
    if fork:
        import multiprocessing

        os.environ.update(thread_env)  # the fork server inherits them when it starts (OpenMP reads them then)
        mp = multiprocessing.get_context("forkserver")
        mp.set_forkserver_preload(["peft_lab.preload"])
    queue, free = list(cells), list(slots)
    echo = len(slots) == 1
    running: list[tuple[Cell, Any, threading.Thread, float, Any, threading.Event]] = []

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop()

    stop_signals = (signal.SIGTERM, signal.SIGHUP)  # kill, a closed terminal: stop cleanly as on Ctrl-C
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_term) for sig in stop_signals}

    def reap() -> None:
        for item in list(running):
            cell, proc, pump, start, slot, done = item
            if proc.poll() is None:
                continue
            done.set()
            pump.join()
            running.remove(item)
            free.append(slot)
            cell.wall_s = time.monotonic() - start
            _collect(cell, proc.returncode, sweep_dir)

    try:
        while queue or running:
            while queue and free:
                cell, slot = queue.pop(0), free.pop(0)
                env = dict(base_env)
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slot
                    cell.device = slot
                where = f" on CUDA device {slot}" if slot is not None else ""
                log.info(f"#{cell.idx} {' '.join(cell.overrides)}  ->  {cell.run_dir}{where}")
                result = rf.cell_result(sweep_dir, cell.name)
                result.unlink(missing_ok=True)  # an earlier launch's outcome is not this one's
                argv = [str(state_path), str(cell.idx), str(result), *cell.overrides]
                done = threading.Event()
                if fork:
                    from peft_lab import cell as cell_mod

                    cell.log_path.write_bytes(b"")
                    process = mp.Process(target=cell_mod.forked, args=(argv, str(cell.log_path), thread_env))
                    process.start()
                    proc: Any = _Forked(process)
                    pump = threading.Thread(target=_tail, args=(done, cell.log_path, echo), daemon=True)
                else:
                    cmd = [sys.executable, "-m", "peft_lab.cell", *argv]
                    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
                    pump = threading.Thread(target=_pump, args=(proc, cell.log_path, echo), daemon=True)
                pump.start()
                running.append((cell, proc, pump, time.monotonic(), slot, done))
            time.sleep(0.2)
            reap()
        return True
    except (KeyboardInterrupt, _Stop) as stop:
        how = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM/SIGHUP"
        log.warning(f"{how}: stopping {len(running)} running cell(s); {len(queue)} not started stay pending")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        for sig in stop_signals:
            signal.signal(sig, signal.SIG_IGN)
        deadline = time.monotonic() + 60
        if isinstance(stop, KeyboardInterrupt):
            time.sleep(1.0)  # on Ctrl-C the cells got SIGINT from the terminal too: let them record it first
        for _cell, proc, *_ in running:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        while running and time.monotonic() < deadline:
            time.sleep(0.2)
            reap()
        for _cell, proc, *_ in running:  # did not stop within a minute
            proc.send_signal(signal.SIGKILL)
        time.sleep(0.5)
        reap()
        return False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _tail(done: threading.Event, log_path: Path, echo: bool) -> None:
    """Echo a forked cell's log to this terminal as it grows (one cell at a time), until ``done``."""
    with open(log_path, "rb") as f:
        while True:
            finished = done.is_set()
            chunk = f.read()
            if chunk and echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            if finished:
                return
            done.wait(0.2)


def _pump(proc: subprocess.Popen, log_path: Path, echo: bool) -> None:
    with open(log_path, "wb") as out:
        for line in iter(proc.stdout.readline, b""):
            out.write(line)
            out.flush()
            if echo:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()


def _collect(cell: Cell, returncode: int, sweep_dir: Path) -> None:
    result = rf.read_json(rf.cell_result(sweep_dir, cell.name))
    cell.record = rf.read_record(cell.run_dir)
    rec_status = cell.record.status if cell.record else None
    if rec_status == Status.completed:  # the record is written last and atomically: a signal after it (the
        cell.status = Status.completed  # process still exiting) does not undo a completed run
        return
    cell.status = Status.interrupted if rec_status == Status.interrupted else Status.failed
    cell.error = (
        result.get("error") or (cell.record.error if cell.record else "") or f"process exited with code {returncode}"
    )


# ----------------------------------------------------------------------------- SLURM

SLURM_DEFAULT_MAX_ARRAY_SIZE = 1001  # slurm.conf's MaxArraySize when a site does not set it


def launch_slurm(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    """The cells still to run as one array job (several when there are more than an array may hold: see
    ``max_array_tasks``); wait for every task; never raise on a failed one."""
    from hydra.core.singleton import Singleton

    params = launcher.params
    configured = _configured_max_array_size(params)  # exits 2 on a bad value, before anything else
    sweep_dir, cells = prepare_cells(launcher, job_overrides, initial_job_idx, local=False)
    pending = [c for c in cells if c.status == Status.pending]
    attached = _attach_live_tasks(sweep_dir, pending)
    to_submit = [c for c in pending if c.job_id == ""]
    chunks: list[list[Cell]] = []
    if to_submit:
        limit, source = (configured, "cluster.max_array_size") if configured else (max_array_tasks(), "MaxArraySize")
        chunks = split_chunks(to_submit, limit)
    shares = split_sizes(max(1, int(params.get("array_parallelism") or 256)), len(chunks))
    arrays = f"{len(chunks)} SLURM array jobs" if len(chunks) > 1 else "one SLURM array job"
    how = f"as {arrays} (partition {params.get('partition') or 'default'})"
    if attached:
        how += f"; {len(attached)} still queued or running from an earlier launch: waiting for those instead"
    log_plan(sweep_dir, cells, how)
    if len(chunks) > 1:
        log.info(
            f"{len(to_submit)} cells > {source} {limit}: {len(chunks)} array jobs of "
            f"{'/'.join(str(len(c)) for c in chunks)} tasks; array_parallelism {sum(shares)} split between "
            f"them ({'/'.join(map(str, shares))} at once)"
        )
    write_manifest(sweep_dir, cells, "slurm", finished=False)
    if not pending:
        return finish_sweep(sweep_dir, cells, "slurm", driven=_driven(launcher))

    t0 = time.time()
    submitted: list[tuple[Cell, Any]] = []
    array_ids: list[str] = []
    try:
        if chunks:
            executor = _slurm_executor(params)
            state = Singleton.get_state()
            for i, chunk in enumerate(chunks):
                if len(chunks) > 1:
                    executor.update_parameters(slurm_array_parallelism=shares[i])
                try:
                    jobs = _submit_chunk(executor, launcher, chunk, state)
                except Exception as err:
                    if not array_ids:
                        raise  # nothing submitted: nothing runs, nothing to wait for
                    _not_submitted([c for rest in chunks[i:] for c in rest], err)
                    break
                submitted += list(zip(chunk, jobs))
                array_ids.append(_array_id(jobs[0].job_id))
                write_manifest(sweep_dir, cells, "slurm", finished=False, array_job_id=array_ids[0],
                               array_job_ids=array_ids, submitted_at=time.time())  # fmt: skip
            what = f"{len(array_ids)} array jobs" if len(array_ids) > 1 else "array job"
            log.info(
                f"Submitted {what} {', '.join(array_ids)} ({len(submitted)} tasks). It runs on if this process "
                f"dies; watch it with: python -m peft_lab.status {sweep_dir}"
            )
        _wait_slurm(submitted + attached)
    except KeyboardInterrupt:
        ids = _job_ids_of(pending)
        if ids:
            print(
                f"\nStopped waiting; SLURM job(s) {', '.join(ids)} keep running.\n"
                f"  watch:  python -m peft_lab.status {sweep_dir}\n  cancel: scancel {' '.join(ids)}",
                file=sys.stderr,
                flush=True,
            )
        raise
    waited = len(submitted) + len(attached)
    log.info(
        f"All {waited} tasks done {time.time() - t0:.1f}s after submission (job {', '.join(_job_ids_of(pending))})"
    )
    return finish_sweep(sweep_dir, cells, "slurm", driven=_driven(launcher))


def _submit_chunk(executor: Any, launcher: Any, chunk: list, state: Any) -> list:
    """One ``map_array`` (one array job; a chunk of one cell is a plain job in submitit); each cell gets its
    task id, log and, in the manifest, the number of processes its task runs."""
    job_args = [(c.overrides, "hydra.sweep.dir", c.idx, f"job_id_for_{c.idx}", state) for c in chunk]
    jobs = executor.map_array(launcher, *zip(*job_args))
    for cell, job in zip(chunk, jobs):
        cell.job_id, cell.log_path = str(job.job_id), Path(job.paths.stderr)
        cell.meta["tasks"] = job.num_tasks  # processes per cell (nodes x tasks_per_node): _attach_live_tasks
        log.info(f"#{cell.idx} {' '.join(cell.overrides)}  ->  {cell.run_dir}  (task {cell.job_id})")
    return jobs


def _not_submitted(cells: list, err: BaseException) -> None:
    """An array job after the first could not be submitted (a QOS limit on submitted jobs, say): its cells fail
    with the reason; the arrays already submitted run on and are waited for; a re-run submits the rest."""
    reason = _short_error(err) or type(err).__name__
    log.error(f"{len(cells)} cells were not submitted: {reason}")
    for c in cells:
        c.status, c.error = Status.failed, f"not submitted: {reason}"


def _array_id(job_id: str) -> str:
    return str(job_id).split("_")[0]


def _job_ids_of(cells: list) -> list[str]:
    """The SLURM jobs (array ids) the cells' tasks belong to, in submission order."""
    ids = {_array_id(c.job_id) for c in cells if c.job_id}
    return sorted(ids, key=lambda j: (int(j) if j.isdigit() else float("inf"), j))


def _configured_max_array_size(params: dict) -> Optional[int]:
    """``cluster.max_array_size`` (``hydra.launcher.max_array_size``): None, or an int >= 1; exit 2 otherwise."""
    value = params.get("max_array_size")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        print(
            f"peft_lab: error: cluster.max_array_size={value} is not a number of tasks per array job. "
            "Fix: give an integer >= 1 (at most the cluster's MaxArraySize), or null to read MaxArraySize "
            "from `scontrol show config`. Nothing was submitted.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    return value


def parse_max_array_size(text: str) -> Optional[int]:
    """``MaxArraySize`` from the text of ``scontrol show config`` (``MaxArraySize = 1001``); None if absent."""
    m = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)\s*$", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def max_array_tasks(scontrol_text: Optional[str] = None) -> int:
    """How many tasks one array job may have on this cluster: its ``MaxArraySize``.

    SLURM's rule (slurm.conf ``MaxArraySize``): the largest array index is MaxArraySize - 1 (index 0 is
    allowed), so an array with indices 0..MaxArraySize-1 holds MaxArraySize tasks. submitit's
    ``map_array`` of n calls submits ``--array=0-(n-1)%p``: its largest index is n-1, so a chunk of up to
    MaxArraySize calls is accepted (checked on Slurm 22.05 with MaxArraySize=10001: ``--array=0-10000``
    accepted, ``--array=0-10001`` refused with "Invalid job array specification"). ``MaxArraySize = 0``
    disables arrays: every cell is then submitted on its own (a ``map_array`` of one call is a plain job).

    ``scontrol_text``: the output to parse (tests); by default ``scontrol show config`` is run. When it
    cannot be run or has no ``MaxArraySize``: SLURM's default, 1001, with a warning.
    """
    if scontrol_text is None:
        try:
            proc = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
            scontrol_text = proc.stdout if proc.returncode == 0 else ""
            why = "" if proc.returncode == 0 else f"exit code {proc.returncode}: {proc.stderr.strip()[:200]}"
        except (OSError, subprocess.SubprocessError) as err:
            scontrol_text, why = "", f"{type(err).__name__}: {err}"
    else:
        why = ""
    value = parse_max_array_size(scontrol_text)
    if value is None:
        log.warning(
            f"could not read MaxArraySize from `scontrol show config` ({why or 'not in its output'}): assuming "
            f"SLURM's default {SLURM_DEFAULT_MAX_ARRAY_SIZE}; set cluster.max_array_size to your cluster's limit"
        )
        return SLURM_DEFAULT_MAX_ARRAY_SIZE
    if value == 0:
        log.warning("MaxArraySize = 0: job arrays are disabled on this cluster; each cell is a job of its own")
        return 1
    return value


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal whole numbers (the first ones larger), none below 1."""
    if parts <= 0:
        return []
    base, extra = divmod(total, parts)
    return [max(1, base + (i < extra)) for i in range(parts)]


def split_chunks(items: Sequence, limit: int) -> list[list]:
    """``items`` in order, in the fewest chunks of at most ``limit``, their sizes differing by at most one
    (1002 cells with a limit of 1001: two arrays of 501, not 1001 + 1)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit}")
    sizes = split_sizes(len(items), -(-len(items) // limit)) if items else []
    chunks, start = [], 0
    for size in sizes:
        chunks.append(list(items[start : start + size]))
        start += size
    return chunks


def _driven(launcher: Any) -> bool:
    """Is this launch one stage of a sweeper's plan (it set ``launcher.driven_by_sweeper``)? See ``finish_sweep``."""
    return bool(getattr(launcher, "driven_by_sweeper", False))


def _attach_live_tasks(sweep_dir: Path, pending: list) -> list:
    """Cells whose task from an earlier launch into this sweep dir is still queued or running (its
    submitting shell died, say): wait for that task rather than start a second one on the same run dir.
    The earlier launch may have submitted several array jobs; one ``squeue`` asks about all of them."""
    from peft_lab.status import squeue_states

    earlier = {e["name"]: e for e in rf.read_manifest(sweep_dir).get("cells", []) if e.get("job_id") and e.get("log")}
    candidates = [c for c in pending if c.name in earlier]
    if not candidates:
        return []
    live = squeue_states({_array_id(earlier[c.name]["job_id"]) for c in candidates}) or {}
    attached = []
    for cell in candidates:
        entry = earlier[cell.name]
        if entry["job_id"] not in live:
            continue
        import submitit

        folder = Path(entry["log"]).parent.parent / "%j"
        tasks = max(1, int(entry.get("tasks") or 1))  # processes of a multi-process cell: wait for every rank
        cell.job_id, cell.log_path = str(entry["job_id"]), Path(entry["log"])
        cell.meta["tasks"] = tasks
        attached.append((cell, submitit.SlurmJob(folder=folder, job_id=cell.job_id, tasks=tuple(range(tasks)))))
        log.info(f"#{cell.idx} {cell.name}: task {cell.job_id} is {live[cell.job_id]['state'].lower()}; waiting for it")
    return attached


def _slurm_executor(params: dict) -> Any:
    """The executor hydra-submitit-launcher's ``BaseSubmititLauncher.launch`` builds, from the same params.

    ``max_array_size`` is peft_lab's (``launch_slurm`` splits the cells), not an sbatch option. A cell of
    several processes (``nodes`` x ``tasks_per_node`` > 1) gets ``SLURM_KILL_BAD_EXIT=1`` (srun's
    ``--kill-on-bad-exit``) before the user's ``setup`` lines: a rank that fails ends the others at once,
    instead of leaving them blocked in a collective until its timeout."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    init_keys = {"submitit_folder", "max_num_timeout", "max_array_size"}
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=int(params["max_num_timeout"])
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    update = {k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in init_keys}
    if int(params.get("nodes") or 1) * int(params.get("tasks_per_node") or 1) > 1:
        update["slurm_setup"] = ["export SLURM_KILL_BAD_EXIT=1", *(params.get("setup") or [])]
    executor.update_parameters(**update)
    return executor


def _wait_slurm(pending: list, poll_s: Optional[float] = None) -> None:
    """Collect each task as it finishes (result file, or sacct's final state for a task killed without one).

    A requeued task is not finished: submitit (sacct) reports it as REQUEUED/PENDING until it runs again.
    A task of several processes is finished when every rank is (``_job_outcome``).
    """
    remaining = list(pending)
    poll_s = poll_s or (1.0 if len(pending) <= 64 else 5.0)  # each check stats a result file per task
    while remaining:
        for item in list(remaining):
            cell, job = item
            if not job.done():
                continue
            remaining.remove(item)
            err, rank = _job_outcome(job)
            if rank:  # the failure is another rank's: its log holds the traceback
                cell.log_path = Path(job.task(rank).paths.stderr)
            _collect_slurm(cell, err)
            value = cell.record.value if cell.record else None
            shown = f"{cell.record.main_metric} = {value:.4f}" if value is not None else cell.error
            log.info(f"#{cell.idx} {cell.name} (task {cell.job_id}): {cell.status}  {shown}")
        if remaining:
            time.sleep(poll_s)


def _job_outcome(job: Any) -> tuple[Optional[BaseException], Optional[int]]:
    """(the error that ended a finished task, the rank it came from), or (None, None) when every rank returned.

    A task of several processes is a submitit meta-job: each rank writes its own result file
    (``<job>_<rank>_result.pkl``), ``job.result()`` refuses it (AssertionError: use ``results()``) and
    ``results()`` / ``exception()`` give the lowest failed rank. That is often not the cause: when rank 1 raises,
    srun's kill-on-bad-exit ends rank 0, which leaves no result (UncompletedJobError). So every rank is read,
    and the error whose result file was written first wins (the one that failed first); a rank without a
    result (killed) is only waited for and counted when no rank raised. One rank: the same as ``job.result()``.
    """
    failures: list = []
    ranks = list(range(job.num_tasks))
    written = [r for r in ranks if job.task(r).paths.result_pickle.exists()]
    for rank in written + [r for r in ranks if r not in written]:
        task = job.task(rank)
        if failures and rank not in written:
            break  # ended by the failure already read (no result): submitit would wait 15 s for each
        try:
            ret = task.result()
        except Exception as exc:  # FailedJobError (it raised), UncompletedJobError (no result: killed), ...
            try:
                at = task.paths.result_pickle.stat().st_mtime
            except OSError:
                at = float("inf")
            failures.append((at, rank, exc))
            continue
        if getattr(ret, "status", None) is not None and ret.status.name != "COMPLETED":
            failures.append((float("inf"), rank, ret._return_value))
    if not failures:
        return None, None
    _, rank, err = min(failures, key=lambda f: (f[0], f[1]))
    return (_RankError(rank, err) if job.num_tasks > 1 else err), rank


class _RankError(Exception):
    """The error of one rank of a multi-process task; ``_short_error`` names the rank."""

    def __init__(self, rank: int, err: BaseException) -> None:
        super().__init__(str(err))
        self.rank, self.err = rank, err


def _collect_slurm(cell: Cell, err: Optional[BaseException]) -> None:
    cell.record = rf.read_record(cell.run_dir)
    rec_status = cell.record.status if cell.record else None
    if err is None and rec_status == Status.completed:
        cell.status = Status.completed
        return
    cell.status = Status.interrupted if rec_status == Status.interrupted and err is None else Status.failed
    # the task's own traceback first: metrics.json may still hold an earlier attempt's error
    cell.error = _short_error(err)
    if not cell.error and rec_status == Status.failed and cell.record.error:
        cell.error = str(cell.record.error).replace("\n", " ")[:500]
    cell.error = cell.error or "task ended without a result"


def _short_error(err: Optional[BaseException]) -> str:
    """One line from submitit's errors: the exception line of a task's traceback
    ("peft_lab.errors.UserError: ..." -> "UserError: ..."), else the first line; "rank k: " in front
    for a rank of a multi-process task."""
    if err is None:
        return ""
    if isinstance(err, _RankError):
        return f"rank {err.rank}: {_short_error(err.err)}"
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


def torch_distributed_env() -> Optional[Any]:
    """Inside a SLURM task: the ``torch.distributed`` environment of a multi-process cell, or None for one process.

    With ``SLURM_NTASKS`` > 1 (``cluster.nodes`` x ``cluster.tasks_per_node``; srun started each process
    with the pickled launcher), ``submitit.helpers.TorchDistributedEnvironment().export()`` sets ``RANK``
    (``SLURM_PROCID``), ``WORLD_SIZE`` (``SLURM_NTASKS``), ``LOCAL_RANK`` (``SLURM_LOCALID``),
    ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` (the job's first node) and ``MASTER_PORT`` (``MASTER_PORT`` if set,
    else a port in 20000-60000 drawn from the job id: the same on every rank and after a requeue). Values
    inherited from the submitting shell (sbatch exports its environment) are overwritten.
    ``CUDA_VISIBLE_DEVICES`` is left as SLURM set it: each rank sees the job's GPUs on its node and uses
    device ``LOCAL_RANK`` of those (submitit's default would narrow it to the single index ``LOCAL_RANK``,
    which is the wrong GPU without device cgroups and leaves ``cuda:<LOCAL_RANK>`` out of range).

    One process: variables inherited from the submitting shell are removed, so the cell trains as one process.
    """
    ntasks = int(os.environ.get("SLURM_NTASKS") or 1)
    if ntasks <= 1:
        from peft_lab.distributed import ENV_KEYS  # a one-task job must not inherit them from the submitting shell

        stale = [k for k in ENV_KEYS if k in os.environ]
        for key in stale:
            del os.environ[key]
        if stale:
            print(f"peft_lab: one process per task: removed {', '.join(stale)} (from the submitting shell)",
                  file=sys.stderr, flush=True)  # fmt: skip
        return None
    import submitit

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    print(
        f"peft_lab: rank {env.rank} of {env.world_size} (local rank {env.local_rank} of {env.local_world_size}), "
        f"master {env.master_addr}:{env.master_port}",
        file=sys.stderr,
        flush=True,
    )
    return env


def _forget_earlier_result() -> None:
    """Remove this process's result file from an earlier attempt of this task (before a requeue).

    With several processes only rank 0 requeues (submitit's checkpoint handler); the other ranks run on until
    SLURM stops them, and one whose collective lost rank 0 raises and leaves an error result behind. The
    submitting process counts a task done when every rank has a result file, so that stale file would make
    the attempt after the requeue look failed the moment rank 0 finishes it."""
    import submitit

    try:
        submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
    except (OSError, KeyError, RuntimeError):  # not inside a submitit job (tests), or not ours to remove
        pass


def run_slurm_task(call: Callable[[], Any]) -> Any:
    """Inside an array task (and again after a requeue): run the cell; raise if it failed.

    Raising makes SLURM record the task as FAILED and submitit store the traceback, which
    the submitting process reports. The run dir is derived from the overrides, so a
    requeued task finds its checkpoint and resumes from it (train.resume=true). A task of
    several processes runs this in each of them, as one rank (``torch_distributed_env``).
    """
    from hydra.core.utils import JobStatus

    import peft_lab.config  # noqa: F401  (the cell_dir resolver the run dir needs)
    from peft_lab.errors import DivergedError, UserError

    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and not os.environ.get("PEFT_LAB_THREADS"):
        os.environ["PEFT_LAB_THREADS"] = cpus  # the allocation, not every core of the node
    _forget_earlier_result()
    torch_distributed_env()
    ret = call()
    if ret.status != JobStatus.COMPLETED:
        err = ret._return_value
        if isinstance(err, (UserError, DivergedError)):
            print(f"peft_lab: error: {err}", file=sys.stderr, flush=True)
        raise err
    return ret


# ----------------------------------------------------------------------------- summary


def summary_rows(cells: list[Cell]) -> list[dict]:
    rows = []
    for c in cells:
        rec = c.record
        value = rec.value if rec else None
        rows.append(
            {
                "cell": c.name,
                "status": c.status.value + (" (skipped: done earlier)" if c.skipped else ""),
                "metric": (rec.main_metric if rec else "") or "",
                "value": "" if value is None else f"{value:.4f}",
                "time_s": f"{c.wall_s or (rec.run_wall_s if rec else 0.0) or 0.0:.1f}",
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
    counts = {s.value: sum(c.status == s for c in cells) for s in Status}
    counts["completed"] -= sum(c.skipped for c in cells)  # "completed" here: by this launch
    counts["skipped"] = sum(c.skipped for c in cells)
    always = ("completed", "skipped", "failed")
    footer = ", ".join(f"{counts[s]} {s}" for s in always)
    footer += "".join(f", {n} {s}" for s, n in counts.items() if n and s not in always)
    text = f"Sweep summary ({footer})\n{table}\n"
    rf.write_atomic(sweep_dir / rf.SUMMARY_MD, f"# {text}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else cols)
    writer.writeheader()
    writer.writerows(rows)
    rf.write_atomic(sweep_dir / rf.SUMMARY_CSV, buf.getvalue())
    return text
