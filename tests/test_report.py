"""python -m peft_lab.report on a sweep dir with known numbers: exact table values, noise marks, partial sweeps, plots."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# (method, dataset, seed) -> value; None = failed run
KNOWN = {
    ("lora", "sst2", 0): 0.80, ("lora", "sst2", 1): 0.82, ("lora", "sst2", 2): 0.84,
    ("hira", "sst2", 0): 0.81, ("hira", "sst2", 1): 0.83, ("hira", "sst2", 2): 0.85,
    ("sparse", "sst2", 0): 0.60, ("sparse", "sst2", 1): 0.61, ("sparse", "sst2", 2): 0.62,
    ("lora", "wikitext2", 0): 33.0, ("lora", "wikitext2", 1): 34.0, ("lora", "wikitext2", 2): 35.0,
    ("hira", "wikitext2", 0): 29.0, ("hira", "wikitext2", 1): None, ("hira", "wikitext2", 2): 29.5,
    ("sparse", "wikitext2", 0): 40.0, ("sparse", "wikitext2", 1): 41.0, ("sparse", "wikitext2", 2): 45.0,
}  # fmt: skip
TRAINABLE = {"lora": 0.5, "hira": 0.5, "sparse": 0.05}
MEM_MIB = {"lora": 800.0, "hira": 820.0, "sparse": 790.0}
TOKS = {"lora": 1000.0, "hira": 950.0, "sparse": 900.0}


def _write_sweep(sweep: Path) -> None:
    manifest = []
    for (method, ds, seed), value in KNOWN.items():
        name = f"dataset={ds},method={method},seed={seed}"
        run = sweep / name
        run.mkdir(parents=True)
        m = {
            "status": "completed" if value is not None else "failed",
            "method": method,
            "dataset": ds,
            "model": "tiny",
            "seed": seed,
            "overrides": [f"method={method}", f"dataset={ds}", f"seed={seed}", "experiment=smoke"],
            "main_metric": "accuracy" if ds == "sst2" else "perplexity",
            "trainable_pct": TRAINABLE[method],
            "trainable_params": int(TRAINABLE[method] * 1e4),
            "peak_memory_bytes": int(MEM_MIB[method] * 2**20),
            "train_wall_s": 100.0 + seed,
            "tokens_per_s": TOKS[method],
        }
        if value is not None:
            m["main_metric_value"] = value
        else:
            m["error"] = "RuntimeError: boom"
        (run / "metrics.json").write_text(json.dumps(m))
        manifest.append({"name": name, "run_dir": str(run), "overrides": m["overrides"], "status": m["status"],
                         "method": method, "dataset": ds, "model": "tiny", "seed": seed})  # fmt: skip
    # a cell the sweep planned that never wrote anything (e.g. still queued, or its node died)
    missing = sweep / "dataset=sst2,method=qlora,seed=0"
    manifest.append({"name": missing.name, "run_dir": str(missing), "overrides": ["method=qlora", "dataset=sst2", "seed=0"],
                     "status": "pending", "method": "qlora", "dataset": "sst2", "model": "tiny", "seed": 0})  # fmt: skip
    (sweep / ".cells").mkdir()
    (sweep / ".cells" / "manifest.json").write_text(json.dumps({"cells": manifest}))


@pytest.fixture
def known_sweep(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    _write_sweep(sweep)
    return sweep


def _table(path: Path) -> dict:
    with open(path) as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def test_report_table_has_exact_means_stds_and_noise_marks(known_sweep):
    from peft_lab import report

    paths = report.build(known_sweep, logger=None, quiet=True)
    t = _table(paths["csv"])
    assert list(t) == ["lora", "qlora", "hira", "sparse"]  # canonical method order, the missing qlora kept
    lora, hira, sparse = t["lora"], t["hira"], t["sparse"]
    assert float(lora["sst2/mean"]) == pytest.approx(0.82) and float(lora["sst2/std"]) == pytest.approx(0.02)
    assert float(hira["sst2/mean"]) == pytest.approx(0.83) and int(hira["sst2/n"]) == 3
    assert float(sparse["wikitext2/std"]) == pytest.approx(math.sqrt(7))  # 40, 41, 45: sample std
    # sst2: hira best; lora 0.01 behind with std 0.02 over 3 seeds: noise. sparse: clearly worse.
    assert (hira["sst2/vs_best"], lora["sst2/vs_best"], sparse["sst2/vs_best"]) == ("best", "within_noise", "worse")
    # wikitext2: perplexity, lower is better; hira has one of three seeds failed
    assert hira["wikitext2/status"] == "partial" and int(hira["wikitext2/n"]) == 2
    assert float(hira["wikitext2/mean"]) == pytest.approx(29.25) and hira["wikitext2/vs_best"] == "best"
    assert lora["wikitext2/vs_best"] == "worse" and sparse["wikitext2/vs_best"] == "worse"
    assert t["qlora"]["sst2/status"] == "pending" and t["qlora"]["sst2/n"] == "0"
    assert float(lora["sst2/peak_memory_mib"]) == pytest.approx(800.0)
    assert float(lora["sst2/wall_s"]) == pytest.approx(101.0) and float(lora["sst2/trainable_pct"]) == 0.5

    md = paths["markdown"].read_text()
    assert "| method | sst2 (accuracy ↑) | wikitext2 (perplexity ↓) |" in md
    assert "| lora | ≈ 0.820 ± 0.020 (n=3)<br>0.50 % trainable · 800 MiB · 101 s | 34.00 ± 1.00 (n=3)" in md
    assert "**0.830 ± 0.020** (n=3)" in md and "**29.25 ± 0.35** (n=2 of 3)" in md
    assert "| qlora | *pending* | – |" in md
    assert "qlora × sst2: pending (0/1 seeds)" in md and "hira × wikitext2: partial (2/3 seeds)" in md

    runs = list(csv.DictReader(open(paths["runs_csv"])))
    assert len(runs) == len(KNOWN) + 1
    assert {r["status"] for r in runs} == {"completed", "failed", "pending"}


def test_single_seed_report_says_differences_are_untested(tmp_path):
    from peft_lab import report

    sweep = tmp_path / "s"
    _write_sweep(sweep)
    for run in sweep.glob("*seed=[12]"):
        for f in run.iterdir():
            f.unlink()
        run.rmdir()
    (sweep / ".cells" / "manifest.json").unlink()
    t = _table(report.build(sweep, quiet=True)["csv"])
    assert t["lora"]["sst2/vs_best"] == "untested" and t["lora"]["sst2/std"] == ""
    assert "differences are untested against seed noise" in (sweep / "report" / "report.md").read_text()


def test_welch_noise_rule():
    from peft_lab.report import Agg, welch_within_noise

    a = Agg("a", "d", "completed", n=3, mean=0.82, std=0.02)
    assert welch_within_noise(a, Agg("b", "d", "completed", n=3, mean=0.83, std=0.02)) is True
    assert welch_within_noise(a, Agg("b", "d", "completed", n=3, mean=0.90, std=0.02)) is False  # t = 4.9 > 2.78
    assert welch_within_noise(a, Agg("b", "d", "completed", n=1, mean=0.90, std=float("nan"))) is None


def test_plots_have_labelled_axes_and_one_series_per_method(known_sweep):
    from peft_lab import report

    rows, datasets, cells = report.aggregate(report.load_runs(known_sweep))
    figs = report.figures(rows, datasets, cells)
    assert set(figs) == set(report.PLOTS)

    axes = figs["metric_by_method"].axes
    assert [ax.get_title() for ax in axes] == ["sst2", "wikitext2"]
    assert (
        axes[0].get_ylabel() == "accuracy (higher is better)" and axes[1].get_ylabel() == "perplexity (lower is better)"
    )
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["lora", "hira", "sparse"]  # qlora has no value
    assert [round(b.get_height(), 4) for b in axes[0].patches] == [0.82, 0.83, 0.61]

    ax = figs["metric_vs_trainable"].axes[0]
    assert "trainable parameters" in ax.get_xlabel() and ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lora", "hira", "sparse"]
    offsets = {c.get_label(): tuple(c.get_offsets()[0]) for c in ax.collections}
    assert offsets["sparse"] == pytest.approx((0.05, 0.61))

    ax = figs["peak_memory"].axes[0]
    assert ax.get_ylabel() == "peak memory (MiB)"
    assert [c.get_label() for c in ax.containers] == ["sst2", "wikitext2"]
    assert [b.get_height() for b in ax.containers[0]] == pytest.approx([800, 820, 790])

    ax = figs["throughput"].axes[0]
    assert ax.get_ylabel() == "throughput (tokens/s)"
    assert [b.get_height() for b in ax.containers[1]] == pytest.approx([1000, 950, 900])

    ax = figs["metric_vs_walltime"].axes[1]  # wikitext2: lower perplexity is better
    assert ax.get_xlabel() == "training wall time (s)"
    front = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto front"]
    assert len(front) == 1
    # hira (29.25 ppl at 101 s) dominates lora (34 ppl at 101 s) and sparse
    assert list(front[0].get_ydata()) == pytest.approx([29.25])


def test_report_cli_writes_pngs_and_rejects_a_bad_dir(known_sweep, tmp_path, cli_env):
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "peft_lab.report", *a],
        cwd=REPO,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ok = run(str(known_sweep), "--wandb", "disabled")
    assert ok.returncode == 0, ok.stderr
    assert "| lora | ≈ 0.820 ± 0.020" in ok.stdout
    for name in ("metric_by_method", "metric_vs_trainable", "peak_memory", "throughput", "metric_vs_walltime"):
        assert (known_sweep / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run(str(empty))
    assert bad.returncode == 2 and "no runs found" in bad.stderr and "Fix:" in bad.stderr
    assert not (empty / "report" / "report.md").exists()
    missing = run(str(tmp_path / "nope"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
