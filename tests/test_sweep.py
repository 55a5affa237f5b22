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
    """The README's smoke command, into a given sweep dir, two cells at a time (the 2-core budget), without
    W&B (tests/test_tracking.py has its own sweep for that)."""
    args = ["-m", "method=lora", "dataset=sst2,imdb,wikitext2", "experiment=smoke", f"hydra.sweep.dir={sweep}",
            "cluster.parallel=2", "logger=none"]  # fmt: skip
    return train_cli(args, sweep.parent, env)


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, cli_env):
    """`python train.py -m method=lora dataset=sst2,imdb,wikitext2 experiment=smoke`, run once for the module
    (no GPU here: the cells are forked from the launcher's fork server)."""

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
        assert m["resumed_from_step"] == 0 and m["steps"] == m["total_steps"] == 6
        assert (m["precision"], m["weight_dtype"], m["compute_dtype"]) == ("fp32", "float32", "float32")
        # start-up cost: process start -> first optimizer step (the fork server imported the libraries)
        assert 0 < m["time_to_first_step_s"] < m["run_wall_s"] + 30 and m["step_time_median_s"] > 0
    by_ds = {m["dataset"]: m for m in cells.values()}
    assert set(by_ds) == {"sst2", "imdb", "wikitext2"}
    assert 0.0 <= by_ds["sst2"]["test"]["accuracy"] <= 1.0 and "macro_f1" in by_ds["imdb"]["test"]
    assert by_ds["wikitext2"]["main_metric"] == "perplexity" and by_ds["wikitext2"]["test"]["perplexity"] > 1
    # every cell ran in its own process
    assert len({m["pid"] for m in cells.values()}) == 3


def test_smoke_summary_written(smoke_sweep):
    sweep, proc = smoke_sweep
    assert "Sweep summary (3 completed, 0 skipped, 0 failed)" in proc.stdout
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed"] * 3
    assert {r["metric"] for r in rows} == {"accuracy", "perplexity"}
    assert (sweep / "summary.md").read_text().startswith("# Sweep summary")


def test_adapter_loads_back_and_reproduces_the_trained_models_eval(smoke_sweep, compose):
    """The saved adapter, loaded onto the base with PEFT, gives the trained model's evaluation exactly."""
    import contextlib

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_lab import data, training

    sweep, _ = smoke_sweep
    m = next(m for m in _cells(sweep).values() if m["dataset"] == "wikitext2")
    cfg = compose("experiment=smoke", "method=lora", "dataset=wikitext2", "logger=none")
    tok = AutoTokenizer.from_pretrained(m["base_model_folder"])
    raw, _ = data.load_validated(cfg.dataset, cfg.dataset.test_split)
    examples = data.tokenize(cfg.dataset, tok, raw, cfg.dataset.max_test_samples)

    def perplexity(model):
        res = training.evaluate(model.eval(), examples, "causal_lm", tok, 16, "cpu", contextlib.nullcontext)
        assert res["eval_tokens"] == m["test"]["eval_tokens"]
        return res["perplexity"]

    base = AutoModelForCausalLM.from_pretrained(m["base_model_folder"])
    untrained = perplexity(base)
    reloaded = perplexity(PeftModel.from_pretrained(base, m["adapter_dir"]))
    assert reloaded == pytest.approx(m["test"]["perplexity"], rel=1e-5)
    assert abs(untrained - reloaded) > 1e-3 * reloaded  # the adapter is what makes the difference


def test_rerun_skips_completed_cells(smoke_sweep, cli_env):

    sweep, _ = smoke_sweep
    before = {n: m["finished_at"] for n, m in _cells(sweep).items()}
    # logging keys are not part of a cell's identity: the same grid with other logger settings is the same cells
    args = ["-m", "method=lora", "dataset=sst2,imdb,wikitext2", "experiment=smoke", f"hydra.sweep.dir={sweep}",
            "logger=wandb", "logger.mode=disabled"]  # fmt: skip
    proc = train_cli(args, sweep.parent, cli_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Sweep summary (0 completed, 3 skipped, 0 failed)" in proc.stdout
    assert {n: m["finished_at"] for n, m in _cells(sweep).items()} == before


def _rerun_with_record_changed(sweep: Path, env: dict, dataset: str, change) -> tuple:
    """Re-run the smoke grid with one cell's metrics.json changed by ``change`` (restored afterwards)."""
    path = next(p for p in sweep.glob("*/metrics.json") if dataset in p.parent.name)
    original = path.read_text()
    data = json.loads(original)
    change(data)
    path.write_text(json.dumps(data))
    try:
        return _smoke_grid(sweep, env), path
    finally:
        path.write_text(original)


def test_rerun_refuses_a_cell_completed_with_another_config(smoke_sweep, cli_env):
    """As after an upgrade that changed a default: the stored run's config differs from what the cell
    computes now. Nothing is launched, exit 2, the cell and the differing key are named."""
    sweep, _ = smoke_sweep

    def older_default(data: dict) -> None:
        data["config"]["method"]["lr"], data["fingerprint"] = 0.1, "0" * 16

    proc, path = _rerun_with_record_changed(sweep, cli_env, "wikitext2", older_default)
    assert proc.returncode == 2
    assert "method.lr: 0.1 -> 0.0005" in proc.stderr and path.parent.name in proc.stderr
    assert "Nothing was launched" in proc.stderr and "skipped" not in proc.stdout


def test_failing_cell_does_not_stop_others_and_two_folders_are_two_cells(run_cli, tmp_path, sst2_dir):
    """`dataset.data_dir=<d>/x/y,<d>/x_y`: two run dirs (the names differ only where `/` became `_`);
    the malformed one fails, the other completes from step 0, the sweep exits 1 naming the failure."""
    import shutil

    shutil.copytree(sst2_dir, tmp_path / "x" / "y")
    bad = tmp_path / "x_y"
    shutil.copytree(sst2_dir, bad)
    (bad / "train.parquet").write_bytes(b"not parquet")
    sweep = tmp_path / "sweep"
    # with "two GPUs" visible and 3 cells allowed at once (this machine has none: only the environment each
    # cell receives is checked; torch sees no device and trains on the CPU, each cell a fresh interpreter)
    proc = run_cli("-m", "experiment=smoke", "logger=none", "dataset=sst2", "dataset.source=local",
                   f"dataset.data_dir={tmp_path}/x/y,{tmp_path}/x_y", f"hydra.sweep.dir={sweep}",
                   "cluster.parallel=3", env={"CUDA_VISIBLE_DEVICES": "3,5"})  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "cluster.parallel=3 but only 2 CUDA device(s) (3,5)" in proc.stdout + proc.stderr
    manifest = json.loads((sweep / ".cells" / "manifest.json").read_text())
    assert sorted(c["device"] for c in manifest["cells"]) == ["3", "5"]  # both ran at once, one device each
    assert {m["visible_devices"] for m in _cells(sweep).values()} == {"3", "5"}
    records = {m["data_source"]: m for m in _cells(sweep).values()}
    good = records[f"local:{tmp_path}/x/y"]
    assert good["status"] == "completed" and good["resumed_from_step"] == 0 and good["steps"] == 6
    failed = next(m for m in _cells(sweep).values() if m["status"] != "completed")
    assert failed["status"] == "failed" and "could not read" in failed["error"] and f"{tmp_path}/x_y" in failed["error"]
    assert len(list(sweep.glob("*/metrics.json"))) == 2
    log = sweep / ".cells" / f"{Path(failed['run_dir']).name}.log"  # one log per cell, named after its run dir
    assert "1 of 2 cells did not complete" in proc.stderr and str(log) in proc.stderr
    assert log.read_text().count("peft_lab: error:") == 1
    rows = sorted(r["status"] for r in csv.DictReader((sweep / "summary.csv").open()))
    assert rows == ["completed", "failed"]


def test_cells_do_not_leak_state(smoke_sweep, compose, tmp_path, cache_dir, monkeypatch):
    """A cell's result does not depend on what ran before it in the sweep (wikitext2 ran after the other two)
    nor on how it was started: the same config through the pipeline in this process gives the same numbers."""
    from peft_lab import run

    monkeypatch.setenv("PEFT_LAB_CACHE", str(cache_dir))
    monkeypatch.setenv("PEFT_LAB_THREADS", "1")
    sweep, _ = smoke_sweep
    in_sweep = next(m for m in _cells(sweep).values() if m["dataset"] == "wikitext2")
    alone = tmp_path / "alone"
    run.execute(compose("experiment=smoke", "method=lora", "dataset=wikitext2", "logger=none"), run.RunContext(alone))
    assert in_sweep["final_train_loss"] == read_metrics(alone)["final_train_loss"]
    assert in_sweep["test"] == read_metrics(alone)["test"]


def test_encoder_reports_masked_lm_perplexity(compose, tmp_path, cache_dir, monkeypatch):
    """DistilBERT-style encoder: classification on sst2, masked LM (labelled as such) on wikitext2."""
    from peft_lab import run

    monkeypatch.setenv("PEFT_LAB_CACHE", str(cache_dir))
    monkeypatch.setenv("PEFT_LAB_THREADS", "1")
    by_ds = {}
    for ds in ("sst2", "wikitext2"):
        cfg = compose("experiment=smoke", "logger=none", "model=tiny-distilbert", f"dataset={ds}")
        run.execute(cfg, run.RunContext(tmp_path / ds))
        by_ds[ds] = read_metrics(tmp_path / ds)
    assert by_ds["sst2"]["task"] == "classification" and "accuracy" in by_ds["sst2"]["test"]
    lm = by_ds["wikitext2"]
    assert lm["task"] == "masked_lm" and lm["main_metric"] == "mlm_perplexity"
    assert "perplexity" not in lm["test"] and lm["test"]["mlm_perplexity"] > 1


def test_rerun_refuses_a_cell_that_is_running_now(smoke_sweep, cli_env):
    """A cell still being run by a live process (an earlier launch whose launcher died) is not started a
    second time on the same run dir."""
    import os
    import time

    sweep, _ = smoke_sweep

    def running_now(data: dict) -> None:
        data.update(status="running", pid=os.getpid(), started_at=time.strftime("%Y-%m-%dT%H:%M:%S"))

    proc, _ = _rerun_with_record_changed(sweep, cli_env, "imdb", running_now)
    assert proc.returncode == 2
    assert f"is being run right now by process {os.getpid()}" in proc.stderr and "Nothing was launched" in proc.stderr
