"""Preemption of a local run, as a user meets it: killed after a checkpoint, the same command resumes."""

from __future__ import annotations

import pytest
from conftest import read_metrics


@pytest.mark.slow  # run by .ci/run; the default suite has the SIGTERM'd sweep below
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


def test_stopped_sweep_records_interrupted_and_resumes(cli_env, tmp_path):
    """SIGTERM to a local sweep's launcher: the running cell is stopped and records `interrupted`, the cell
    not started stays pending, the launcher writes its summary and exits 130; `status` says the same words;
    the same command resumes the interrupted cell from its checkpoint and runs the other."""
    import csv
    import json
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    sweep = tmp_path / "sweep"
    args = [sys.executable, str(REPO / "train.py"), "-m", "experiment=smoke", "logger=none", "seed=0,1",
            "train.max_steps=200", "train.checkpoint_every=20", "train.log_every=20",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    errors = (tmp_path / "stderr.txt").open("w+")
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env, stdout=subprocess.DEVNULL, stderr=errors, text=True)
    names = {seed: f"experiment=smoke,seed={seed},train.checkpoint_every=20,train.max_steps=200" for seed in (0, 1)}
    first = sweep / names[0]
    deadline = time.monotonic() + 120
    while not (first / "checkpoint" / "state.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (first / "checkpoint" / "state.json").exists(), "no checkpoint before the stop"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, err[-3000:]
    rec = read_metrics(first)
    assert rec["status"] == "interrupted" and rec["failure"] == "interrupted", rec
    rows = {r["cell"]: r["status"] for r in csv.DictReader((sweep / "summary.csv").open())}
    assert rows == {names[0]: "interrupted", names[1]: "pending"}
    assert "resume the interrupted ones" in err
    status = subprocess.run([sys.executable, "-m", "peft_lab.status", str(sweep), "--json"], capture_output=True,
                            text=True, env=cli_env, timeout=60)  # fmt: skip
    states = {c["cell"]: c["state"] for c in json.loads(status.stdout)["cells"]}
    assert states == {names[0]: "interrupted", names[1]: "pending"}
    stopped_at = json.loads((first / "checkpoint" / "state.json").read_text())["step"]

    again = subprocess.run(args, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rec = read_metrics(first)
    assert rec["status"] == "completed" and rec["resumed_from_step"] == stopped_at > 0 and rec["steps"] == 200
    assert read_metrics(sweep / names[1])["resumed_from_step"] == 0


@pytest.mark.slow  # run by .ci/run; test_a_cell_stops_when_its_launcher_is_gone checks the mechanism by default
def test_launcher_killed_outright_stops_its_cell(cli_env, tmp_path):
    """kill -9 of a local sweep's launcher (as the OOM killer does): the running cell must not train on as an
    orphan that a re-run would duplicate; it notices, records `interrupted` and ends; a re-run resumes it."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from conftest import REPO

    sweep = tmp_path / "sweep"
    args = [sys.executable, str(REPO / "train.py"), "-m", "experiment=smoke", "logger=none", "train.max_steps=3000",
            "train.checkpoint_every=20", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    first = sweep / "experiment=smoke,train.checkpoint_every=20,train.max_steps=3000"
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (first / "checkpoint" / "state.json").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    while time.monotonic() < deadline and read_metrics(first).get("status") == "running":
        time.sleep(0.2)
    rec = read_metrics(first)
    assert rec["status"] == "interrupted", rec
    time.sleep(0.5)
    stat = Path(f"/proc/{rec['pid']}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    stopped_at = json.loads((first / "checkpoint" / "state.json").read_text())["step"]
    again = subprocess.run(args, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_metrics(first)["resumed_from_step"] == stopped_at > 0


def test_a_cell_stops_when_its_launcher_is_gone(tmp_path):
    """The mechanism behind it, without torch: a process running peft_lab.cell.watch_launcher gets SIGTERM
    (which a run records as interrupted) within about a second of its launcher's death."""
    import subprocess
    import sys
    import time

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    marker = tmp_path / "stopped"
    code = (
        "import os, signal, sys, time\n"
        "from peft_lab.cell import watch_launcher\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').write('x'), sys.exit(143)))\n"
        "watch_launcher(0.1)\n"
        "time.sleep(30)\n"
    )
    cell = subprocess.Popen([sys.executable, "-c", code], env={"PEFT_LAB_LAUNCHER_PID": str(launcher.pid),
                                                                "PATH": "/usr/bin:/bin"})  # fmt: skip
    time.sleep(1.0)
    assert cell.poll() is None and not marker.exists()  # the launcher lives: the cell runs on
    launcher.kill()
    launcher.wait()
    assert cell.wait(timeout=10) == 143 and marker.exists()
