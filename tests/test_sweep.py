"""The grid as a user runs it: one process per cell, metrics.json + adapter per cell, summary, failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import read_metrics, train_cli


def _cells(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


def _smoke_grid(sweep: Path, env: dict):
    """The README's smoke command, into a given sweep dir."""
    args = ["-m", "method=lora", "dataset=sst2,imdb,wikitext2", "experiment=smoke", f"hydra.sweep.dir={sweep}"]
    return train_cli(args, sweep.parent, env)


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, cli_env):
    """`python train.py -m method=lora dataset=sst2,imdb,wikitext2 experiment=smoke`, run once for the module."""

    sweep = tmp_path_factory.mktemp("smoke") / "sweep"
    proc = _smoke_grid(sweep, cli_env)
    return sweep, proc


def test_smoke_grid_completes_with_metrics(smoke_sweep):
    sweep, proc = smoke_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = _cells(sweep)
    assert len(cells) == 3
    for name, m in cells.items():
        assert m["status"] == "completed", (name, m.get("error"))
        assert m["method"] == "lora" and m["model"] == "tiny" and m["model_source"] == "config:llama"
        for key in (
            "total_params",
            "trainable_params",
            "trainable_pct",
            "adapter_bytes",
            "model_footprint_bytes",
            "peak_memory_bytes",
            "train_wall_s",
            "samples_per_s",
            "tokens_per_s",
            "versions",
            "seed",
        ):
            assert key in m, (name, key)
        assert 0 < m["trainable_params"] < m["total_params"]
        assert m["adapter_bytes"] > 0 and m["peak_memory_bytes"] > 0 and m["tokens_per_s"] > 0
        assert m["versions"]["peft"] and m["versions"]["torch"]
        # start-up cost: process start -> first optimizer step, longer than the imports, shorter than the run
        assert 1.0 < m["time_to_first_step_s"] < m["run_wall_s"] + 30 and m["step_time_median_s"] > 0
    by_ds = {m["dataset"]: m for m in cells.values()}
    assert set(by_ds) == {"sst2", "imdb", "wikitext2"}
    assert 0.0 <= by_ds["sst2"]["eval"]["accuracy"] <= 1.0 and "macro_f1" in by_ds["imdb"]["eval"]
    assert by_ds["wikitext2"]["main_metric"] == "perplexity" and by_ds["wikitext2"]["eval"]["perplexity"] > 1
    # every cell ran in its own process
    assert len({m["pid"] for m in cells.values()}) == 3


def test_smoke_summary_written(smoke_sweep):
    sweep, proc = smoke_sweep
    assert "Sweep summary (3 completed, 0 skipped, 0 failed)" in proc.stdout
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed"] * 3
    assert {r["metric"] for r in rows} == {"accuracy", "perplexity"}
    assert (sweep / "summary.md").read_text().startswith("# Sweep summary")


def test_adapter_loads_back_and_reproduces_outputs(smoke_sweep):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sweep, _ = smoke_sweep
    m = next(m for m in _cells(sweep).values() if m["dataset"] == "wikitext2")
    base = AutoModelForCausalLM.from_pretrained(m["base_model_folder"])
    model = PeftModel.from_pretrained(base, m["adapter_dir"]).eval()
    ids = torch.randint(5, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nll = model(input_ids=ids, labels=ids).loss
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert torch.isfinite(nll)
    assert any(p.abs().sum() > 0 for p in lora_b), "the saved adapter must hold the trained (non-zero) B"
    # reloading twice gives identical outputs
    again = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(m["base_model_folder"]), m["adapter_dir"]
    ).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_rerun_skips_completed_cells(smoke_sweep, cli_env):

    sweep, _ = smoke_sweep
    before = {n: m["finished_at"] for n, m in _cells(sweep).items()}
    proc = _smoke_grid(sweep, cli_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Sweep summary (0 completed, 3 skipped, 0 failed)" in proc.stdout
    assert {n: m["finished_at"] for n, m in _cells(sweep).items()} == before


def test_failing_cell_does_not_stop_others(run_cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "experiment=smoke",
        "logger=none",
        "dataset=sst2",
        "dataset.max_train_samples=0,16",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 1
    good = read_metrics(sweep / "dataset.max_train_samples=16,dataset=sst2")
    bad = read_metrics(sweep / "dataset.max_train_samples=0,dataset=sst2")
    assert good["status"] == "completed"
    assert bad["status"] == "failed" and "max_train_samples=0" in bad["error"]
    assert "1 of 2 cells failed" in proc.stderr
    assert "dataset.max_train_samples=0,dataset=sst2" in proc.stderr and "cell_0.log" in proc.stderr
    assert (sweep / ".cells" / "cell_0.log").read_text().count("peft_lab: error:") == 1
    rows = {r["cell"]: r["status"] for r in csv.DictReader((sweep / "summary.csv").open())}
    assert rows == {
        "dataset.max_train_samples=0,dataset=sst2": "failed",
        "dataset.max_train_samples=16,dataset=sst2": "completed",
    }


def test_cells_do_not_leak_state(run_cli, tmp_path):
    """A cell's result does not depend on what ran before it in the sweep."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "experiment=smoke", "logger=none", "dataset=wikitext2,sst2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone = tmp_path / "alone"
    proc = run_cli("experiment=smoke", "logger=none", "dataset=sst2", f"hydra.run.dir={alone}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    in_sweep = read_metrics(sweep / "dataset=sst2")
    assert in_sweep["final_train_loss"] == read_metrics(alone)["final_train_loss"]
    assert in_sweep["eval"] == read_metrics(alone)["eval"]


def test_encoder_grid_reports_masked_lm_perplexity(run_cli, tmp_path):
    """DistilBERT-style encoder: classification on sst2, masked LM (labelled as such) on wikitext2."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "experiment=smoke",
        "logger=none",
        "model=tiny-distilbert",
        "dataset=sst2,wikitext2",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    by_ds = {m["dataset"]: m for m in _cells(sweep).values()}
    assert by_ds["sst2"]["task"] == "classification" and "accuracy" in by_ds["sst2"]["eval"]
    lm = by_ds["wikitext2"]
    assert lm["task"] == "masked_lm" and lm["main_metric"] == "mlm_perplexity"
    assert "perplexity" not in lm["eval"] and lm["eval"]["mlm_perplexity"] > 1


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
        "train.max_steps=400",
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
    assert m["status"] == "completed" and m["steps"] == 400 and m["resumed_from_step"] >= 20
    assert f"Resumed from step {m['resumed_from_step']} " in (run_dir / "train.log").read_text()
    from wandb_file import read_run

    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    attempts = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(run_id) for a in attempts)
    last = read_run(next(attempts[-1].glob("run-*.wandb")))
    assert last.id == run_id == m["wandb_run_id"] and last.summary["status"] == "completed"
    steps = [h["_step"] for h in last.history if "train/loss" in h]
    assert steps[0] == m["resumed_from_step"] + 20 and steps[-1] == 400
