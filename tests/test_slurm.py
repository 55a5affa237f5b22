"""cluster=slurm on a real SLURM (scripts/slurm/start-local-slurm.sh): one array job per sweep,
requeue + resume, failure isolation, resumable sweeps and `python -m peft_lab.status`.

Run with `pytest -m slurm` (the default run excludes the marker); skipped when `sinfo`
does not answer. About 3-4 minutes on 2 cores.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, read_metrics, train_cli


def _slurm_answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not _slurm_answers(), reason="no SLURM here (start one: scripts/slurm/start-local-slurm.sh)"),
]

SLURM = ["cluster=slurm", "cluster.partition=debug", "experiment=smoke", "logger=none"]
GRID = ["method=lora,qlora,hira,sparse", "dataset=sst2,imdb,wikitext2"]
# long enough that two interruptions land mid-training even after SLURM's KillWait (5 s, during
# which submitit ignores SIGTERM and training goes on); ~20-40 s of training on the tiny model
STEPS = 4500
LONG = ["dataset=sst2", f"train.max_steps={STEPS}", "train.checkpoint_every=50"]


def _start(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
    )


def _status(sweep: Path, env: dict) -> dict:
    """`python -m peft_lab.status <sweep> --json`, run as a user would from another shell."""
    proc = subprocess.run(
        [sys.executable, "-m", "peft_lab.status", str(sweep), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _wait_status(sweep: Path, env: dict, ok, what: str, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    seen = []
    while time.monotonic() < end:
        if (sweep / ".cells" / "manifest.json").exists():
            info = _status(sweep, env)
            seen.append([(c["state"], c["step"]) for c in info["cells"]])
            if ok(info):
                return info
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; states seen: {seen[-5:]}")


def _cells(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


def _task_dirs(sweep: Path) -> list[str]:
    return sorted(p.name for p in (sweep / ".submitit").iterdir() if any(p.glob("*_submitted.pkl")))


@pytest.fixture(scope="module")
def grid(tmp_path_factory, cli_env):
    """The 4x3 smoke grid on SLURM, run once for the module."""
    root = tmp_path_factory.mktemp("slurm_grid")
    sweep = root / "sweep"
    t0 = time.time()
    with_wandb = [a for a in SLURM if not a.startswith("logger=")] + ["logger=wandb", "logger.mode=offline"]
    proc = train_cli(["-m", *GRID, *with_wandb, f"hydra.sweep.dir={sweep}"], root, cli_env, timeout=600)
    wall = time.time() - t0
    return sweep, proc, wall


def test_grid_is_one_array_job_and_all_cells_complete(grid):
    sweep, proc, wall = grid
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = _cells(sweep)
    assert len(cells) == 12
    assert {(m["method"], m["dataset"]) for m in cells.values()} == {
        (m, d) for m in ("lora", "qlora", "hira", "sparse") for d in ("sst2", "imdb", "wikitext2")
    }
    for name, m in cells.items():
        assert m["status"] == "completed", (name, m.get("error"))
        assert m["main_metric_value"] is not None and m["adapter_bytes"] > 0 and m["steps"] == 6
        run_files = list((sweep / name / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(run_files) == 1 and m["wandb_run_id"] in run_files[0].name, (name, run_files)
    manifest = json.loads((sweep / ".cells" / "manifest.json").read_text())
    job_ids = [c["job_id"] for c in manifest["cells"]]
    assert len({j.split("_")[0] for j in job_ids}) == 1, job_ids  # one array job
    assert sorted(int(j.split("_")[1]) for j in job_ids) == list(range(12))  # one task per cell
    assert len(_task_dirs(sweep)) == 12
    array_id = job_ids[0].split("_")[0]
    for _ in range(40):  # SLURM's own record (sacct lags scontrol by a few seconds)
        acct = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-j", array_id, "-o", "JobID,State"], capture_output=True, text=True
        )
        states = dict(line.split("|", 1) for line in acct.stdout.split())
        if sorted(states.values()) == ["COMPLETED"] * 12:
            break
        time.sleep(0.5)
    assert sorted(states) == sorted(job_ids) and set(states.values()) == {"COMPLETED"}, states
    assert "Sweep summary (12 completed, 0 skipped, 0 failed)" in proc.stdout
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed"] * 12
    done = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if "s after submission" in line]
    print(f"\n12-cell smoke grid on SLURM: {done[-1].split('] ')[-1] if done else '?'}; process wall {wall:.1f}s")


def test_rerun_runs_no_completed_cell_again(grid, cli_env):
    sweep, first, _ = grid
    assert first.returncode == 0
    before = {n: m["finished_at"] for n, m in _cells(sweep).items()}
    tasks = _task_dirs(sweep)
    proc = train_cli(["-m", *GRID, *SLURM, f"hydra.sweep.dir={sweep}"], sweep.parent, cli_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Sweep summary (0 completed, 12 skipped, 0 failed)" in proc.stdout
    assert "Submitted array job" not in proc.stdout + proc.stderr
    assert _task_dirs(sweep) == tasks  # nothing submitted
    assert {n: m["finished_at"] for n, m in _cells(sweep).items()} == before


def test_failing_cell_leaves_the_other_completed_and_is_named(tmp_path, cli_env):
    sweep = tmp_path / "sweep"
    proc = train_cli(
        ["-m", *SLURM, "dataset=sst2", "dataset.max_train_samples=0,16", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        cli_env,
        timeout=400,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    bad_name = "dataset.max_train_samples=0,dataset=sst2,experiment=smoke"
    good_name = "dataset.max_train_samples=16,dataset=sst2,experiment=smoke"
    assert read_metrics(sweep / good_name)["status"] == "completed"
    bad = read_metrics(sweep / bad_name)
    assert bad["status"] == "failed" and "max_train_samples=0" in bad["error"]
    assert "1 of 2 cells did not complete" in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.strip().startswith(bad_name))
    log = Path(line.split("log: ")[-1].strip())
    assert log.parent.parent == sweep / ".submitit" and log.name.endswith("_log.err"), line
    assert "peft_lab: error: dataset.max_train_samples=0" in log.read_text()
    rows = {r["cell"]: r["status"] for r in csv.DictReader((sweep / "summary.csv").open())}
    assert rows == {bad_name: "failed", good_name: "completed"}

    # status after the sweep ended: a completed and a failed cell, with the failure's log
    states = {c["cell"]: c for c in _status(sweep, cli_env)["cells"]}
    assert states[good_name]["state"] == "completed" and states[good_name]["step"] == 6
    assert states[bad_name]["state"] == "failed" and "max_train_samples=0" in states[bad_name]["note"]
    assert states[bad_name]["log"] == str(log)


def test_requeue_resumes_and_matches_uninterrupted_run(tmp_path, cli_env):
    """Interrupted twice mid-training, the task runs again each time and resumes from its checkpoint:

    1. `scontrol requeue` (what SLURM does on preemption or node failure): SIGTERM, then SIGKILL
       after KillWait; the same batch script runs again.
    2. SIGUSR2 (submitit's preemption/timeout signal): submitit calls the launcher's `checkpoint`,
       which resubmits the same call, and requeues the task itself.

    The waiting launcher is not fooled by either, and the final metrics equal an uninterrupted
    local run with the same seed.

    Tolerance: relative 1e-6 on the final loss and every eval metric (expected: bit-identical). Both
    runs use one torch thread on the same CPU, and the checkpoint restores the trainable weights,
    optimizer, scheduler, RNG state and data position, so nothing is left to differ but float
    reduction order, which a fixed thread count keeps fixed. 1e-6 is far below any real effect
    (accuracy on the 32 eval examples moves in steps of 1/32).
    """
    sweep = tmp_path / "sweep"
    # the reference run goes alongside (the other core)
    reference = _start(
        [*LONG, "experiment=smoke", "logger=none", f"hydra.run.dir={tmp_path / 'local'}"],
        tmp_path,
        cli_env,
        tmp_path / "local.out",
    )
    submitter = _start(["-m", *SLURM, *LONG, f"hydra.sweep.dir={sweep}"], tmp_path, cli_env, tmp_path / "submit.out")

    def first(info: dict) -> dict:
        return info["cells"][0]

    def requeue_and_resume(interrupt: list[str], after_step: int) -> tuple[int, int, float]:
        """Interrupt once past `after_step`; return (step then, checkpoint it resumes from, seconds to resume)."""
        info = _wait_status(
            sweep,
            cli_env,
            lambda i: first(i)["state"] == "running" and (first(i)["step"] or 0) >= after_step,
            f"the cell running past step {after_step}",
        )
        assert first(info)["slurm_state"] == "RUNNING" and first(info)["total"] == STEPS
        subprocess.run([*interrupt, first(info)["job_id"]], check=True, timeout=30)
        t0 = time.monotonic()
        waiting = _wait_status(  # waiting to start again (after the kill): the step shown is the checkpoint's
            sweep,
            cli_env,
            lambda i: first(i)["state"] == "requeued" and first(i)["slurm_state"] == "PENDING",
            "state requeued",
            60,
        )
        ckpt = first(waiting)["step"]
        _wait_status(
            sweep,
            cli_env,
            lambda i: first(i)["state"] == "running" and first(i)["resumed_from"] == ckpt,
            f"the task running again, resumed from {ckpt}",
            120,
        )
        assert submitter.poll() is None, "the launcher must keep waiting through a requeue"
        return first(info)["step"], ckpt, time.monotonic() - t0

    try:
        step1, k1, back1 = requeue_and_resume(["scontrol", "requeue"], 100)
        step2, k2, back2 = requeue_and_resume(["scancel", "--signal=USR2"], k1 + 200)
        assert submitter.wait(timeout=300) == 0, (tmp_path / "submit.out").read_text()[-3000:]
        assert reference.wait(timeout=300) == 0, (tmp_path / "local.out").read_text()[-3000:]
    finally:
        for proc in (submitter, reference):
            if proc.poll() is None:
                proc.kill()
    assert "Sweep summary (1 completed, 0 skipped, 0 failed)" in (tmp_path / "submit.out").read_text()
    (run_dir,) = [p.parent for p in sweep.glob("*/metrics.json")]
    resumed = read_metrics(run_dir)
    local = read_metrics(tmp_path / "local")
    assert resumed["status"] == "completed" and resumed["steps"] == STEPS and resumed["resumed_from_step"] == k2
    assert 0 < k1 < k2 < STEPS and k1 % 50 == 0 and k2 % 50 == 0 and k1 >= step1 // 50 * 50
    log = (run_dir / "train.log").read_text()
    assert f"Resumed from step {k1} " in log and f"Resumed from step {k2} " in log
    err_log = Path(first(_status(sweep, cli_env))["log"])  # submitit's stderr; its INFO lines go to stdout
    task_log = err_log.read_text() + err_log.with_suffix(".out").read_text()
    assert "this job is preempted" in task_log and "Calling checkpoint method" in task_log
    assert "Requeued job" in task_log
    assert local["resumed_from_step"] == 0 and local["steps"] == STEPS

    pairs = {"final_train_loss": (resumed["final_train_loss"], local["final_train_loss"])}
    pairs.update({f"test.{key}": (resumed["test"][key], local["test"][key]) for key in local["test"]})
    diffs = {name: abs(a - b) for name, (a, b) in pairs.items()}
    print(
        f"\nrequeue: scontrol requeue at step {step1} -> resumed from {k1} ({back1:.1f}s later); "
        f"SIGUSR2 at step {step2} -> resumed from {k2} ({back2:.1f}s later); {STEPS} steps in all. "
        f"SLURM vs local: {json.dumps({n: [a, b] for n, (a, b) in pairs.items()})}; |diff| {diffs}"
    )
    for name, (a, b) in pairs.items():
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12), (name, a, b)


def test_submitter_dies_status_and_rerun_wait_for_the_live_task(tmp_path, cli_env):
    """The submitting shell dies: the task runs on, status still tells where it stands, and
    re-running the same command waits for that task instead of starting a second one."""
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *SLURM,
        "dataset=sst2",
        "train.max_steps=1500",
        "train.checkpoint_every=50",
        f"hydra.sweep.dir={sweep}",
    ]
    submitter = _start(args, tmp_path, cli_env, tmp_path / "submit.out")
    try:
        _wait_status(sweep, cli_env, lambda i: i["cells"][0]["state"] == "running", "the cell running")
        os.kill(submitter.pid, signal.SIGKILL)
        submitter.wait(timeout=30)
    finally:
        if submitter.poll() is None:
            submitter.kill()
    info = _status(sweep, cli_env)
    assert info["submitter_alive"] is False and not info["finished"]
    assert info["cells"][0]["state"] in ("running", "completed")
    job_id = info["cells"][0]["job_id"]

    proc = train_cli(args, tmp_path, cli_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Submitted array job" not in out
    if info["cells"][0]["state"] == "running":
        assert f"task {job_id} is" in out and "waiting for it" in out
    assert "Sweep summary (1 completed, 0 skipped, 0 failed)" in out or "(0 completed, 1 skipped" in out
    assert len(_task_dirs(sweep)) == 1
    m = next(iter(_cells(sweep).values()))
    assert m["status"] == "completed" and m["resumed_from_step"] == 0 and m["steps"] == 1500
    final = _status(sweep, cli_env)
    assert final["finished"] and final["cells"][0]["state"] == "completed"


def test_select_lr_protocol_runs_each_stage_as_an_array_job_and_reruns_nothing(tmp_path, cli_env):
    """+protocol=select_lr drives the SLURM launcher: stage 1 (a 2-point grid, seed 0) is one array job,
    stage 2 (the chosen lr, seed 1; seed 0 reused) another; a re-run submits nothing."""
    sweep = tmp_path / "sweep"
    args = ["-m", *SLURM, "method=lora", "dataset=sst2", "method.lr_grid=[0.0005,0.002]", "+protocol=select_lr",
            "seed=0,1", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = train_cli(args, tmp_path, cli_env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (arm,) = json.loads((sweep / "protocol.json").read_text())["arms"]
    scores = {e["lr"]: read_metrics(sweep / e["run_dir"])["select"]["accuracy"] for e in arm["stage1"]}
    assert sorted(scores) == [0.0005, 0.002] and scores[arm["chosen_lr"]] == max(scores.values())
    stage2 = [read_metrics(sweep / name) for name in arm["stage2"]]
    assert sorted(m["seed"] for m in stage2) == [0, 1] and all(m["status"] == "completed" for m in stage2)
    assert {m["config"]["method"]["lr"] for m in stage2} == {arm["chosen_lr"]}
    jobs = {
        c["name"]: c["job_id"].split("_")[0]
        for c in json.loads((sweep / ".cells" / "manifest.json").read_text())["cells"]
    }
    stage1_jobs = {jobs[e["run_dir"]] for e in arm["stage1"]}
    seed1 = next(name for name in arm["stage2"] if name.endswith("seed=1"))
    assert len(stage1_jobs) == 1 and jobs[seed1] not in stage1_jobs  # two array jobs, one per stage

    again = train_cli(args, tmp_path, cli_env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Submitted array job" not in again.stdout + again.stderr


def test_sweep_past_max_array_size_goes_out_as_several_arrays_and_reruns_nothing(tmp_path, cli_env):
    """5 cells with cluster.max_array_size=2: three array jobs (2 + 2 + 1 tasks; submitit submits a chunk of
    one as a plain job), every cell completed, status sees one sweep, and a re-run submits nothing."""
    sweep = tmp_path / "sweep"
    args = ["-m", *SLURM, "dataset=sst2", "seed=0,1,2,3,4", "cluster.max_array_size=2", f"hydra.sweep.dir={sweep}"]
    t0 = time.time()
    proc = train_cli(args, tmp_path, cli_env, timeout=400)
    wall = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "5 cells > cluster.max_array_size 2: 3 array jobs of 2/2/1 tasks" in out
    assert "Submitted 3 array jobs" in out and "Sweep summary (5 completed, 0 skipped, 0 failed)" in out
    manifest = json.loads((sweep / ".cells" / "manifest.json").read_text())
    arrays = manifest["array_job_ids"]
    assert len(set(arrays)) == 3 and manifest["array_job_id"] == arrays[0]
    jobs = {c["name"]: c["job_id"] for c in manifest["cells"]}
    assert len(jobs) == 5 and len(set(jobs.values())) == 5
    by_array = {a: sorted(j for j in jobs.values() if j.split("_")[0] == a) for a in arrays}
    assert [len(v) for v in by_array.values()] == [2, 2, 1], by_array  # each cell's task is in one of them
    assert by_array[arrays[0]] == [f"{arrays[0]}_0", f"{arrays[0]}_1"] and by_array[arrays[2]] == [arrays[2]]
    cells = _cells(sweep)
    assert sorted(m["seed"] for m in cells.values()) == [0, 1, 2, 3, 4]
    assert all(m["status"] == "completed" and m["steps"] == 6 for m in cells.values())

    info = _status(sweep, cli_env)
    assert info["array_job_ids"] == arrays and info["finished"]
    assert [c["state"] for c in info["cells"]] == ["completed"] * 5
    assert {c["cell"]: c["job_id"] for c in info["cells"]} == jobs

    before = {n: m["finished_at"] for n, m in cells.items()}
    tasks = _task_dirs(sweep)
    again = train_cli(args, tmp_path, cli_env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Sweep summary (0 completed, 5 skipped, 0 failed)" in again.stdout
    assert "Submitted" not in again.stdout + again.stderr and "array jobs of" not in again.stdout + again.stderr
    assert _task_dirs(sweep) == tasks and {n: m["finished_at"] for n, m in _cells(sweep).items()} == before
    kept = json.loads((sweep / ".cells" / "manifest.json").read_text())["cells"]
    assert {c["name"]: c["job_id"] for c in kept} == jobs and all(c["skipped"] for c in kept)  # where each ran
    assert _status(sweep, cli_env)["array_job_ids"] == arrays
    print(f"\n5 cells as 3 arrays ({', '.join(arrays)}): {wall:.1f}s; re-run skipped all")


def test_multi_process_task_gets_a_torch_distributed_environment_and_a_failing_rank_is_named(tmp_path):
    """cluster.tasks_per_node=2: srun starts two processes per array task; each gets RANK / WORLD_SIZE /
    LOCAL_RANK / MASTER_ADDR / MASTER_PORT (the same rendezvous on both). When rank 1 raises, srun ends
    rank 0 at once (kill-on-bad-exit; it would sleep 60 s) and the cell's error is rank 1's, not
    "rank 0 produced no output" (what submitit's results() gives). No training here: the launcher's part."""
    from peft_lab import sweep

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NODELIST")

    def probe(fail_rank, sleep_s):  # a closure: cloudpickle ships it by value
        sweep.torch_distributed_env()
        if os.environ["RANK"] == str(fail_rank):
            raise ValueError(f"boom on rank {fail_rank}")
        time.sleep(sleep_s)
        return {k: os.environ.get(k) for k in keys}

    params = dict(submitit_folder=str(tmp_path / ".submitit" / "%j"), timeout_min=5, cpus_per_task=1,
                  tasks_per_node=2, nodes=1, name="probe", partition="debug", max_num_timeout=0, setup=[],
                  additional_parameters={}, array_parallelism=2, max_array_size=2)  # fmt: skip
    t0 = time.monotonic()
    ok, bad = sweep._slurm_executor(params).map_array(probe, [None, 1], [0, 60])
    assert ok.num_tasks == bad.num_tasks == 2
    while not (ok.done() and bad.done()):
        assert time.monotonic() - t0 < 120, "the tasks did not end"
        time.sleep(0.5)
    ended = time.monotonic() - t0
    assert sweep._job_outcome(ok) == (None, None)
    env = ok.results()
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in env] == [
        ("0", "0", "2", "2"),
        ("1", "1", "2", "2"),
    ]
    assert env[0]["MASTER_ADDR"] == env[1]["MASTER_ADDR"] == env[0]["SLURM_NODELIST"]
    assert env[0]["MASTER_PORT"] == env[1]["MASTER_PORT"] and 20000 <= int(env[0]["MASTER_PORT"]) <= 60000
    err, rank = sweep._job_outcome(bad)
    assert rank == 1 and sweep._short_error(err) == "rank 1: ValueError: boom on rank 1"
    assert ended < 55, f"rank 0 was not ended when rank 1 failed ({ended:.0f}s)"
    print(
        f"\n2-process tasks: environment on both ranks, rank 1's failure named; both ended {ended:.1f}s after submission"
    )


def test_two_process_cell_completes_and_resumes_after_requeues(tmp_path, cli_env):
    """One cell as a 2-process data-parallel job (cluster.tasks_per_node=2, one CPU each): rank 0 writes the one
    metrics.json (world_size 2) and the one adapter. Interrupted twice, both ranks run again and resume from the
    checkpoint, and the waiting launcher reports the cell completed:

    1. `scontrol requeue`: SIGTERM to both ranks (submitit ignores it), SIGKILL after KillWait.
    2. SIGUSR2 (preemption / timeout): only rank 0 checkpoints and requeues; rank 1 runs on, its collective
       loses rank 0 and it raises, leaving an error result that the next attempt must not be judged by.
    """
    sweep = tmp_path / "sweep"
    steps = 800  # ~20 steps/s on 2 busy cores: each interruption lands mid-run, a checkpoint every 50 steps
    args = ["-m", *SLURM, "dataset=sst2", "cluster.tasks_per_node=2", "cluster.cpus_per_task=1",
            f"train.max_steps={steps}", "train.checkpoint_every=50", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    t0 = time.monotonic()
    submitter = _start(args, tmp_path, cli_env, tmp_path / "submit.out")

    def cell(info: dict) -> dict:
        return info["cells"][0]

    def interrupt(command: list[str], after_step: int, resumed_from: int | None) -> tuple[int, int]:
        """Once the cell runs past ``after_step``: interrupt; return (step then, checkpoint it resumes from)."""
        info = _wait_status(
            sweep,
            cli_env,
            lambda i: (
                cell(i)["state"] == "running"
                and (cell(i)["step"] or 0) >= after_step
                and cell(i)["resumed_from"] == resumed_from
            ),
            f"the cell running past step {after_step}",
            180,
        )
        subprocess.run([*command, cell(info)["job_id"]], check=True, timeout=30)
        waiting = _wait_status(
            sweep, cli_env, lambda i: cell(i)["state"] == "requeued" and cell(i)["slurm_state"] == "PENDING", "requeued"
        )
        return cell(info)["step"], cell(waiting)["step"]

    try:
        step1, k1 = interrupt(["scontrol", "requeue"], 50, None)
        step2, k2 = interrupt(["scancel", "--signal=USR2"], k1 + 50, k1)
        assert submitter.wait(timeout=300) == 0, (tmp_path / "submit.out").read_text()[-3000:]
    finally:
        if submitter.poll() is None:
            submitter.kill()
    wall = time.monotonic() - t0
    assert "Sweep summary (1 completed, 0 skipped, 0 failed)" in (tmp_path / "submit.out").read_text()
    (run_dir,) = [p.parent for p in sweep.glob("*/metrics.json")]
    m = read_metrics(run_dir)
    assert m["status"] == "completed" and m["world_size"] == 2 and m["steps"] == steps
    assert 0 < k1 < k2 < steps and k1 % 50 == 0 == k2 % 50 and m["resumed_from_step"] == k2
    log = (run_dir / "train.log").read_text()
    assert f"Resumed from step {k1} " in log and f"Resumed from step {k2} " in log
    assert [p.name for p in (run_dir / "adapter").glob("*.safetensors")] == ["adapter_model.safetensors"]
    err0 = Path(cell(_status(sweep, cli_env))["log"])
    logs = [err0, err0.with_name(err0.name.replace("_0_log", "_1_log"))]
    for rank, log in enumerate(logs):
        assert log.read_text().count(f"peft_lab: rank {rank} of 2") == 3, log  # every attempt ran both ranks
    assert "Requeued job" in err0.with_suffix(".out").read_text() + err0.read_text()
    assert "Not checkpointing nor requeuing since I am a slave" in logs[1].with_suffix(".out").read_text()
    print(
        f"\n2-process cell: scontrol requeue at step {step1} -> resumed from {k1}; SIGUSR2 at step {step2} -> "
        f"resumed from {k2}; {steps} steps, {wall:.1f}s in all"
    )
