"""Preemption of a local run, as a user meets it: killed after a checkpoint, the same command resumes."""

from __future__ import annotations

from conftest import read_metrics


def test_local_run_killed_then_restarted_resumes(cli_env, tmp_path):
    """Kill a local run after its first checkpoint; the same command resumes from it, not from step 0,
    and continues the same W&B run (same id, history picking up after the checkpoint)."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=smoke",
        "dataset=sst2",
        "train.max_steps=100",
        "train.checkpoint_every=20",
        "train.log_every=20",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run_dir / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "no checkpoint was written before the kill"
    done = subprocess.run(args, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    m = read_metrics(run_dir)
    assert m["status"] == "completed" and m["steps"] == 100 and m["resumed_from_step"] >= 20
    assert f"Resumed from step {m['resumed_from_step']} " in (run_dir / "train.log").read_text()
    from wandb_file import read_run

    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    attempts = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(run_id) for a in attempts)
    last = read_run(next(attempts[-1].glob("run-*.wandb")))
    assert last.id == run_id == m["wandb_run_id"] and last.summary["status"] == "completed"
    steps = [h["_step"] for h in last.history if "train/loss" in h]
    assert steps[0] == m["resumed_from_step"] + 20 and steps[-1] == 100
