"""W&B as a user finds it: the offline run files read back (group, name, tags, config, history, summary),
the report run in the sweep's group, no secret anywhere, and a mode decision that never hangs."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from conftest import sentiment_rows, train_cli, write_parquet
from wandb_file import read_run

FAKE_KEY = "local-" + "5eC7e7" * 6 + "abcd"  # 46 chars, key-shaped
FAKE_HF = "hf_" + "ZyXwVuTsRqPoNmLkJiHg" * 2


@pytest.fixture(scope="module")
def wandb_sweep(tmp_path_factory, cli_env):
    """2 methods x 2 seeds with an API key set and an unreachable W&B server (auto mode must go offline),
    on a local data folder whose path makes each cell's override string longer than 200 characters."""
    root = tmp_path_factory.mktemp("wandb")
    data_dir = root / ("long_" * 40) / "sst2"
    for split, n in (("train", 48), ("validation", 16)):
        write_parquet(data_dir, split, sentiment_rows(n))
    env = dict(cli_env, WANDB_API_KEY=FAKE_KEY, HF_TOKEN=FAKE_HF, WANDB_BASE_URL="http://127.0.0.1:9")
    env.pop("WANDB_MODE")
    args = ["-m", "method=lora,hira", "dataset=sst2", "seed=0,1", "experiment=smoke", "hydra.sweep.dir=multirun/grid",
            "dataset.source=local", f"dataset.data_dir={data_dir}", "cluster.parallel=2"]  # fmt: skip
    proc = train_cli(args, root, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, root / "multirun" / "grid", proc


def test_long_overrides_still_give_one_run_dir_per_cell(wandb_sweep):
    """Each cell's override string passes 200 characters: four run dirs, none resumed from another."""
    _, sweep, _ = wandb_sweep
    records = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert len(records) == 4 and all(len(" ".join(r["overrides"])) > 200 for r in records)
    assert sorted((r["method"], r["seed"]) for r in records) == [("hira", 0), ("hira", 1), ("lora", 0), ("lora", 1)]
    assert all(r["status"] == "completed" and r["resumed_from_step"] == 0 for r in records)


def _run_file(run_dir: Path) -> Path:
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def test_each_run_file_holds_group_name_tags_config_history_and_summary(wandb_sweep):
    root, sweep, _ = wandb_sweep
    group = (sweep / ".cells" / "group.txt").read_text().strip()
    assert group == "multirun_grid"
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(runs) == 4
    for run_dir in runs:
        m = json.loads((run_dir / "metrics.json").read_text())
        w = read_run(_run_file(run_dir))
        assert m["wandb_mode"] == "offline"  # a key but no server: auto went offline, no hang
        assert w.id == m["wandb_run_id"] == (run_dir / "wandb_run_id.txt").read_text().strip()
        assert w.group == group and w.project == "peft_lab" and w.job_type == "train"
        assert w.name == f"{m['method']}-sst2-tiny-seed{m['seed']}"  # seeds vary in this sweep
        assert set(w.tags) == {m["method"], "sst2", "tiny", "classification", f"seed{m['seed']}"}
        assert w.config["method"]["name"] == m["method"] and w.config["seed"] == m["seed"]
        assert w.config["train"]["max_steps"] == 6 and w.config["model"]["name"] == "tiny"
        train_rows = [h for h in w.history if "train/loss" in h]
        assert [h["_step"] for h in train_rows] == [2, 4, 6]  # experiment=smoke logs every 2 steps
        for h in train_rows:
            assert h["train/lr"] >= 0 and h["train/tokens_per_s"] > 0 and h["train/samples_per_s"] > 0
        final = [h for h in w.history if "test/accuracy" in h]
        assert final and final[-1]["test/accuracy"] == m["test"]["accuracy"] and final[-1]["_step"] == 6
        # summary = metrics.json (nested eval kept), plus W&B's own underscore keys and last history values
        for key in ("status", "main_metric", "main_metric_value", "trainable_params", "peak_memory_bytes", "steps"):
            assert w.summary[key] == m[key], key
        assert w.summary["status"] == "completed" and w.summary["test"] == m["test"]
        assert w.exit_code == 0


def test_report_runs_at_sweep_end_and_logs_to_the_group(wandb_sweep):
    root, sweep, proc = wandb_sweep
    md = (sweep / "report" / "report.md").read_text()
    assert "| lora | " in md and "| hira | " in md and "(n=2)" in md
    w = read_run(_run_file(sweep / "report"))
    assert w.group == (sweep / ".cells" / "group.txt").read_text().strip() and w.job_type == "report"
    logged = {"/".join(k.split("/")[:2]) for h in w.history for k in h}  # media values are nested: report/table/_type
    assert "report/table" in logged
    assert {f"report/{p}" for p in ("metric_by_method", "metric_vs_trainable", "peak_memory", "throughput",
                                    "metric_vs_walltime")} <= logged  # fmt: skip
    assert w.history[0]["report/table/_type"] == "table-file" and w.history[0]["report/throughput/format"] == "png"
    assert w.summary["completed_runs"] == 4


def test_secrets_never_written(wandb_sweep):
    root, sweep, proc = wandb_sweep
    checked = 0
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            checked += 1
            for secret in (FAKE_KEY, FAKE_HF):
                assert secret.encode() not in data, f"secret found in {path.relative_to(root)}"
    assert checked > 50  # outputs, .hydra, metrics, logs and every W&B file were scanned
    assert {".hydra", "wandb", "train.log"} <= {p.name for p in sweep.rglob("*")}
    for stream in (proc.stdout, proc.stderr):
        assert FAKE_KEY not in stream and FAKE_HF not in stream


def test_resolve_mode_is_bounded_and_falls_back_offline(monkeypatch):
    from peft_lab import tracking

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", os.devnull)
    monkeypatch.setenv("HOME", "/nonexistent")
    assert tracking.resolve_mode("auto") == "offline"  # no key
    assert tracking.resolve_mode("online") == "offline"  # forced online without a key cannot work
    assert tracking.resolve_mode("disabled") == "disabled" and tracking.resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    # a server that accepts the connection and never answers: what a firewalled node often sees
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        for mode in ("auto", "online"):
            t0 = time.monotonic()
            assert tracking.resolve_mode(mode, timeout=1.0) == "offline"
            assert time.monotonic() - t0 < 2.0  # bounded by the 1 s timeout, not by the library's ~90 s
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listening
    assert tracking.resolve_mode("auto") == "offline"


def test_seed_and_lr_in_name_only_when_the_sweep_varies_them(tmp_path):
    from peft_lab import tracking

    (tmp_path / ".cells").mkdir()
    manifest = tmp_path / ".cells" / "manifest.json"
    manifest.write_text(
        json.dumps({"cells": [{"overrides": ["method=lora", "seed=3"]}, {"overrides": ["method=hira", "seed=3"]}]})
    )
    assert tracking.swept_overrides(tmp_path, ["method=lora", "seed=3"]) == ["method=lora"]
    assert tracking.run_name("lora", "sst2", "tiny", ["method=lora"]) == "lora-sst2-tiny"
    cells = [["method=lora", "method.lr=0.0005", "seed=0", "+protocol=select_lr", "logger=none"],
             ["method=lora", "method.lr=0.0015", "seed=0", "+protocol=select_lr", "logger=none"],
             ["method=lora", "method.lr=0.0005", "seed=1", "+protocol=select_lr", "logger=none"]]  # fmt: skip
    manifest.write_text(json.dumps({"cells": [{"overrides": c} for c in cells]}))
    swept = tracking.swept_overrides(tmp_path, cells[2])
    assert swept == ["method.lr=0.0005", "seed=1"]  # the protocol's stage-1 runs are told apart by their lr
    assert tracking.run_name("lora", "sst2", "tiny", swept) == "lora-sst2-tiny-method.lr=0.0005-seed1"
    assert tracking.pin_group(tmp_path, None) == tracking.sweep_group(tmp_path, None)
    assert tracking.pin_group(tmp_path, "mine") == "mine" == tracking.sweep_group(tmp_path, None)


def test_logger_none_writes_no_wandb_files(compose, tmp_path, cache_dir, monkeypatch):
    from peft_lab import run

    monkeypatch.setenv("PEFT_LAB_CACHE", str(cache_dir))
    run.execute(compose("experiment=smoke", "logger=none", "train.max_steps=2"), run.RunContext(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "completed" and m["wandb_run_id"] is None
    assert not (tmp_path / "run" / "wandb").exists()
