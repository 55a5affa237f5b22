"""A cell on several processes (``cluster.nproc_per_cell=2``; torch.distributed, gloo on this CPU).

What a user checks: the 2-process cell trains exactly as one process with the same global batch
(loss per step within 1e-5 relative, same adapter, same test metric), writes one metrics.json, one
adapter and one W&B run, and, killed mid-run and started again, ends where an uninterrupted 2-process
run ends. Dropout is off (each rank would draw its own dropout masks).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, read_metrics, train_cli

# batch 5 x accumulation 2 over 96 rows: the last micro-batch of the epoch has one row, so one rank gets
# no row of it (the stand-in path) and the shares are uneven (3 + 2 rows)
BASE = ["experiment=smoke", "logger=none", "train.log_every=1", "train.batch_size=5",
        "train.grad_accum=2", "train.max_steps=11"]  # fmt: skip
# the tiny model has 2 layers: both sparse, MLP and attention, from the first step
SPARSELORA = ["method=sparselora", "method.mlp_sparsity=0-1:0.5", "method.attn_sparsity=0-1:0.5",
              "method.warmup_frac=0", "method.lora_dropout=0"]  # fmt: skip
CASES = {
    "lora-sst2": ["method=lora", "dataset=sst2", "method.lora_dropout=0"],
    "sparselora-sst2": [*SPARSELORA, "dataset=sst2"],
    "sparse-wikitext2": [
        "method=sparse",
        "dataset=wikitext2",
        "method.start_step=2",
        "method.end_step=6",
        "method.lora_dropout=0",
    ],
    "qlora-wikitext2": ["method=qlora", "dataset=wikitext2", "method.lora_dropout=0"],
    "hira-sst2": ["method=hira", "dataset=sst2", "method.hira_dropout=0"],
}
DEFAULT_CASES = ("lora-sst2", "sparselora-sst2")  # the others in the slow suite (-m slow)


def _wait_for_step(run_dir: Path, step: int, timeout: float = 300.0) -> None:
    """Until the run's progress.json says ``step`` (or the timeout: the caller's checks then fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = run_dir / "progress.json"
        if progress.exists() and json.loads(progress.read_text()).get("step", 0) >= step:
            return
        time.sleep(0.2)


def _losses(rec: dict) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in rec["train_history"]}


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((run_dir / "adapter").rglob("*.safetensors"))
    assert files, f"no adapter in {run_dir}"
    out = {}
    for f in files:
        out.update({f"{f.name}:{k}": v.float() for k, v in load_file(str(f)).items()})
    assert out, f"an empty adapter in {run_dir}"
    return out


def _close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = float(a[k].abs().max()) or 1.0
        assert float((a[k] - b[k]).abs().max()) <= rel * scale, k


@pytest.mark.parametrize("case", [c if c in DEFAULT_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_two_processes_train_as_one(case, tmp_path, cli_env, compose, monkeypatch):
    from peft_lab import run

    args = [*BASE, *CASES[case]]
    for key in ("PEFT_LAB_CACHE", "HF_HUB_OFFLINE", "PEFT_LAB_THREADS"):  # the one-process run, in this process
        monkeypatch.setenv(key, cli_env[key])
    run.execute(compose(*args), run.RunContext(tmp_path / "one"))
    two = train_cli([*args, f"hydra.run.dir={tmp_path / 'two'}", "cluster.nproc_per_cell=2"], tmp_path, cli_env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert a["status"] == b["status"] == "completed"
    assert (a["world_size"], b["world_size"]) == (1, 2)
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 12))
    for step in la:  # the same loss curve, step by step
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-7), (step, la[step], lb[step])
    assert b["main_metric_value"] == pytest.approx(a["main_metric_value"], rel=1e-5)
    assert b["test"]["eval_samples" if "eval_samples" in b["test"] else "eval_tokens"] == a["test"].get(
        "eval_samples", a["test"].get("eval_tokens")
    )  # the sharded evaluation saw every example once
    _close(_adapter(tmp_path / "one"), _adapter(tmp_path / "two"), rel=1e-4)
    if case.startswith("sparselora"):  # the same channels were chosen (same FLOPs skipped), and some were
        fa, fb = a["method_metrics"]["sparselora_flops_skipped"], b["method_metrics"]["sparselora_flops_skipped"]
        assert fa > 0.1 and fb == pytest.approx(fa, rel=1e-6)
    # rank 0 alone wrote: one record, one adapter, one log file, no stray result files
    run_files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert run_files.count("metrics.json") == 1 and run_files.count("adapter") == 1


def test_one_wandb_run_for_a_two_process_cell(tmp_path, cli_env):
    """...from an empty model cache: both ranks build the tiny model (transformers saves nothing on a rank
    other than 0 once a process group exists, so the ranks must load before they join it)."""
    args = [*BASE, *CASES["lora-sst2"], "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}", "cluster.nproc_per_cell=2"]
    proc = train_cli(args, tmp_path, dict(cli_env, PEFT_LAB_CACHE=str(tmp_path / "fresh_cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(tmp_path / "run")
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and m["wandb_run_id"] and m["wandb_run_id"] in runs[0].name
    assert not list(tmp_path.rglob("wandb/offline-run-*"))[1:]  # no other rank made one elsewhere


@pytest.mark.slow
def test_nproc_per_cell_in_a_sweep_and_bad_values(tmp_path, cli_env):
    """A -m sweep runs each cell on 2 processes (same result as the single run); a bad value exits 2."""
    args = [*BASE, *CASES["lora-sst2"]]
    single = train_cli([*args, f"hydra.run.dir={tmp_path / 'single'}"], tmp_path, cli_env)
    assert single.returncode == 0, single.stderr[-3000:]
    sweep = train_cli(["-m", *args, "cluster.nproc_per_cell=2", "seed=0", f"hydra.sweep.dir={tmp_path / 'sw'}"],
                      tmp_path, cli_env)  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    (cell,) = [p for p in (tmp_path / "sw").iterdir() if (p / "metrics.json").exists()]
    m = read_metrics(cell)
    assert m["status"] == "completed" and m["world_size"] == 2
    assert m["final_train_loss"] == pytest.approx(read_metrics(tmp_path / "single")["final_train_loss"], rel=1e-5)
    assert "nproc_per_cell" not in cell.name  # the process count is not part of the cell's identity
    bad = train_cli([*args, "cluster.nproc_per_cell=0", f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path, cli_env)
    assert bad.returncode == 2 and "cluster.nproc_per_cell=0" in bad.stderr


def test_shard_deals_every_row_once():
    from peft_lab.distributed import World, shard

    for n in range(0, 12):
        for size in (1, 2, 3, 4):
            parts = [shard(n, World(r, size, r)) for r in range(size)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.slow
def test_killed_two_process_cell_resumes_to_the_uninterrupted_result(tmp_path, cli_env):
    """SIGTERM to rank 0 mid-run (as `kill` or the local launcher does): the record says interrupted, no rank
    is left running; the same command resumes from the checkpoint and ends equal to an uninterrupted run."""
    args = [*BASE, *CASES["lora-sst2"], "train.max_steps=400", "train.checkpoint_every=20", "train.log_every=20",
            "cluster.nproc_per_cell=2"]  # fmt: skip
    full = train_cli([*args, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path, cli_env)
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = tmp_path / "cut"
    cmd = [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"]
    with open(tmp_path / "cut.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env, stdout=log, stderr=subprocess.STDOUT)
        _wait_for_step(run_dir, 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) != 0
    rec = read_metrics(run_dir)
    assert rec["status"] == "interrupted", (tmp_path / "cut.log").read_text()[-3000:]
    time.sleep(1.0)
    ps = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "a rank outlived rank 0"
    again = train_cli([*args, f"hydra.run.dir={run_dir}"], tmp_path, cli_env)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = read_metrics(tmp_path / "full"), read_metrics(run_dir)
    assert b["status"] == "completed" and 20 <= b["resumed_from_step"] < 400
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-5)
    assert b["main_metric_value"] == a["main_metric_value"]
    _close(_adapter(tmp_path / "full"), _adapter(run_dir), rel=1e-5)


def test_bad_rank_settings_are_refused_before_anything_runs(compose, tmp_path, monkeypatch):
    from peft_lab import run
    from peft_lab.distributed import world_from_env
    from peft_lab.errors import UserError

    with pytest.raises(UserError, match="SLURM settings.*cluster.nproc_per_cell=N"):
        run.execute(
            compose("experiment=smoke", "logger=none", "cluster.tasks_per_node=2"), run.RunContext(tmp_path / "a")
        )
    with pytest.raises(ValueError, match="WORLD_SIZE='abc'.*not integers"):
        world_from_env({"WORLD_SIZE": "abc"})
    with pytest.raises(ValueError, match=r"incomplete.*missing \['RANK', 'MASTER_ADDR', 'MASTER_PORT'\]"):
        world_from_env({"WORLD_SIZE": "2"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="incomplete"):
        run.execute(compose("experiment=smoke", "logger=none"), run.RunContext(tmp_path / "b"))
    assert not (tmp_path / "a" / "metrics.json").exists() and not (tmp_path / "b" / "metrics.json").exists()


def test_a_signal_after_the_record_says_completed_does_not_undo_it(tmp_path):
    """Ctrl-C while a finished cell's process is still exiting (rank 0 waiting for its ranks): the cell is
    completed, as its metrics.json says, not failed or interrupted."""
    from peft_lab import runfiles as rf
    from peft_lab import sweep

    run_dir = tmp_path / "sweep" / "cell"
    rec = rf.RunRecord(status=rf.Status.completed, main_metric="accuracy", main_metric_value=0.5)
    rec.save(run_dir)
    rf.write_json_atomic(rf.cell_result(tmp_path / "sweep", "cell"), {"status": "interrupted"})
    cell = sweep.Cell(0, ["seed=0"], run_dir=run_dir)
    sweep._collect(cell, 130, tmp_path / "sweep")
    assert cell.status == rf.Status.completed and cell.error == ""


@pytest.mark.slow
def test_a_rank_killed_mid_run_fails_the_cell_naming_it(tmp_path, cli_env):
    run_dir = tmp_path / "run"
    args = [*BASE, *CASES["lora-sst2"], "train.max_steps=3000", "train.log_every=50", "cluster.nproc_per_cell=2",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    with open(tmp_path / "out.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=cli_env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        _wait_for_step(run_dir, 50)
        ranks = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir} hydra.output_subdir=null"],
                               capture_output=True, text=True).stdout.split()  # fmt: skip
        out = tmp_path / "out.log"
        assert len(ranks) == 1, (ranks, out.read_text()[-3000:])
        subprocess.run(["kill", "-9", ranks[0]])
        assert proc.wait(timeout=120) != 0, out.read_text()[-3000:]
    rec = read_metrics(run_dir)
    assert rec["status"] == "failed" and "rank 1 of 2 exited with code -9" in rec["error"], (
        rec,
        out.read_text()[-3000:],
    )
