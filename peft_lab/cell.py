"""One sweep cell in its own process: ``python -m peft_lab.cell <state.pkl> <idx> <result.json> <overrides...>``,
or ``forked`` in a process the local launcher's fork server made (libraries already imported).

Started by ``peft_lab.sweep``; rebuilds the cell's config exactly as Hydra's own
launchers do (``load_sweep_config`` + ``run_job``) and writes a small result file
next to the state, so the parent learns the outcome even if logging failed.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from peft_lab.runfiles import LAUNCHER_PID_ENV


def main(argv: list[str]) -> int:
    import cloudpickle
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals
    from omegaconf import open_dict

    import peft_lab.config  # noqa: F401  (registers the cell_dir resolver)
    from peft_lab import runfiles as rf
    from peft_lab.errors import DivergedError, UserError

    state_path, idx, result_path, overrides = Path(argv[0]), int(argv[1]), Path(argv[2]), argv[3:]
    watch_launcher()
    from peft_lab import distributed

    # cluster.nproc_per_cell=N: this process is rank 0 and starts the others with this command ("-": no result
    # file of their own; rank 0's is the cell's)
    distributed.rank_command = lambda rank: [sys.executable, "-m", "peft_lab.cell", argv[0], argv[1], "-", *overrides]
    state = cloudpickle.loads(state_path.read_bytes())
    Singleton.set_state(state["singleton_state"])
    setup_globals()
    hydra_context = state["hydra_context"]
    sweep_config = hydra_context.config_loader.load_sweep_config(state["config"], overrides)
    with open_dict(sweep_config.hydra.job) as job:
        job.id = f"local_{idx}"
        job.num = idx
    if int(os.environ.get("RANK") or 0) > 0:  # another rank of a multi-process cell: rank 0 writes .hydra/
        with open_dict(sweep_config.hydra):
            sweep_config.hydra.output_subdir = None
    try:
        ret = run_job(
            hydra_context=hydra_context,
            task_function=state["task_function"],
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except (KeyboardInterrupt, SystemExit) as stop:  # a signal: the record already says interrupted
        code = 130 if isinstance(stop, KeyboardInterrupt) else int(stop.code or 143)
        print("peft_lab: interrupted (signal); re-run the sweep to resume this cell", file=sys.stderr, flush=True)
        if str(result_path) != "-":
            rf.write_json_atomic(result_path, {"status": "interrupted"})
        return code
    result = {"status": "completed" if ret.status == JobStatus.COMPLETED else "failed"}
    if ret.status != JobStatus.COMPLETED:
        err = ret._return_value
        if isinstance(err, (UserError, DivergedError)):
            print(f"peft_lab: error: {err}", file=sys.stderr, flush=True)
        else:
            traceback.print_exception(type(err), err, err.__traceback__)
        result["error"] = f"{type(err).__name__}: {err}".replace("\n", " ")[:2000]
    if str(result_path) != "-":
        rf.write_json_atomic(result_path, result)
    return 0 if result["status"] == "completed" else 1


def watch_launcher(period_s: float = 1.0) -> None:
    """Stop this cell (SIGTERM to itself: it records ``interrupted``) when its launcher is gone.

    A launcher killed outright (``kill -9``, the OOM killer) must not leave cells training as orphans
    that a re-run would then run a second time on the same run dir. Ranks 1..N-1 of a multi-process cell
    watch rank 0 the same way; one that has not stopped 15 s after the signal exits outright. The launcher's pid comes in
    ``PEFT_LAB_LAUNCHER_PID``; a forked cell's parent is the fork server, which outlives the launcher
    while it has children, so the parent alone cannot tell."""
    import os
    import signal
    import threading
    import time

    pid = int(os.environ.get(LAUNCHER_PID_ENV) or 0)
    if not pid:
        return

    def watch() -> None:
        while True:
            time.sleep(period_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(15.0)  # still here: blocked in a collective whose peer is gone (a rank of a cell)
                os._exit(128 + signal.SIGTERM)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="peft_lab-launcher-watch", daemon=True).start()


def forked(argv: list[str], log_path: str, env: dict) -> None:
    """Entry of a cell forked by the fork server: its stdout and stderr go to ``log_path``, ``env`` is
    applied, then ``main``; the process exits with main's code (0 completed, 1 not)."""
    import os

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.update(env)
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
