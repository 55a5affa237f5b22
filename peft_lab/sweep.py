"""Sweeps: each cell in its own process, completed cells skipped, a summary at the end.

``launch_local`` is what the ``cluster=local`` launcher runs. Every cell is a fresh
``python -m peft_lab.cell`` process, so seeds, CUDA peak-memory counters and
patched modules cannot leak from one cell to the next, and a crash (even a
segfault or an out-of-memory kill) ends only that cell.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CELLS_DIR = ".cells"


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


def launch_local(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus

    config = launcher.config
    parallel = launcher.parallel or int(config.cluster.parallel or 1)
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    cells_dir = sweep_dir / CELLS_DIR
    cells_dir.mkdir(parents=True, exist_ok=True)

    cells = []
    for offset, overrides in enumerate(job_overrides):
        cell = Cell(initial_job_idx + offset, list(overrides))
        try:
            sweep_cfg = launcher.hydra_context.config_loader.load_sweep_config(config, cell.overrides)
            cell.run_dir = sweep_dir / str(sweep_cfg.hydra.sweep.subdir)
        except Exception as err:  # a bad override in one cell fails that cell only
            cell.status, cell.error = "failed", f"config error: {err}".replace("\n", " ")
        cells.append(cell)

    pending = [c for c in cells if c.status == "pending"]
    for cell in pending:
        if is_completed(cell.run_dir):
            cell.status, cell.metrics = "skipped", read_metrics(cell.run_dir)
    pending = [c for c in pending if c.status == "pending"]
    skipped = len([c for c in cells if c.status == "skipped"])
    log.info(
        f"Sweep {sweep_dir}: {len(cells)} cells, {skipped} already completed (skipped), "
        f"{len(pending)} to run, {parallel} at a time"
    )

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

    rows = write_summary(sweep_dir, cells)
    print(rows, flush=True)
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
    _atomic_write(sweep_dir / "summary.md", f"# {text}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else cols)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(sweep_dir / "summary.csv", buf.getvalue())
    return text


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
