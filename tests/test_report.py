"""python -m peft_lab.report on sweep dirs with known numbers: exact table values, the paired bootstrap and Holm
marks, the equal-budget flag, protocol sweeps, partial sweeps, plots."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from peft_lab import runfiles as rf

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
N_TEST = 1000  # sst2 test sentences
N_BLOCKS, BLOCK_TOKENS = 200, 100  # wikitext2 test blocks


def cls_rows(correct: np.ndarray) -> list[dict]:
    """Classification test outputs: label = id % 2, predicted right where ``correct``."""
    return [{"id": i, "label": i % 2, "pred": i % 2 if c else 1 - i % 2} for i, c in enumerate(correct)]


def random_correct(accuracy: float, rng: np.random.Generator, n: int = N_TEST) -> np.ndarray:
    """Exactly round(accuracy·n) correct examples at random positions."""
    correct = np.zeros(n, bool)
    correct[rng.permutation(n)[: round(accuracy * n)]] = True
    return correct


def lm_rows(perplexity: float, rng: np.random.Generator) -> list[dict]:
    """LM test outputs whose exp(Σ nll / Σ tokens) is ``perplexity``: per-block noise of mean zero."""
    noise = rng.normal(0, 20, N_BLOCKS)
    nll = BLOCK_TOKENS * math.log(perplexity) + noise - noise.mean()
    return [{"id": i, "nll": float(x), "tokens": BLOCK_TOKENS} for i, x in enumerate(nll)]


def _write_sweep(sweep: Path, outputs: bool = True) -> None:
    """The KNOWN sweep: metrics.json as an older peft_lab wrote it (no saved_weights) plus, with ``outputs``,
    test outputs that give exactly each run's value."""
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
            if outputs:
                rng = np.random.default_rng([list(TRAINABLE).index(method), seed])
                rows = cls_rows(random_correct(value, rng)) if ds == "sst2" else lm_rows(value, rng)
                rf.write_outputs(run, rows)
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


def save_run(
    sweep: Path, method: str, seed: int, value: float | None, rows: list | None = None, prefix: str = "", **extra
) -> Path:
    """One run dir (``<prefix>method=..,seed=..``) written through runfiles (RunRecord + write_outputs), as the
    pipeline writes it; ``extra``: more RunRecord fields."""
    run = sweep / f"{prefix}method={method},seed={seed}"
    run.mkdir(parents=True)
    extra.setdefault("dataset", "sst2")
    extra.setdefault("main_metric", "accuracy")
    rf.RunRecord(
        status=rf.Status.completed if value is not None else rf.Status.failed,
        method=method, model="tiny", seed=seed, run_dir=str(run), main_metric_value=value, **extra,
    ).save(run)  # fmt: skip
    if rows is not None:
        rf.write_outputs(run, rows)
    return run


@pytest.fixture
def known_sweep(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    _write_sweep(sweep)
    return sweep


def _table(path: Path) -> dict:
    with open(path) as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def _md_row(md: str, row: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {row} |"))


def test_report_table_has_exact_means_stds_and_paired_marks(known_sweep):
    from peft_lab import report

    paths = report.build(known_sweep, logger=None, quiet=True)
    t = _table(paths["csv"])
    assert list(t) == ["lora", "qlora", "hira", "sparse"]  # canonical method order, the missing qlora kept
    lora, hira, sparse = t["lora"], t["hira"], t["sparse"]
    assert float(lora["sst2/mean"]) == pytest.approx(0.82) and float(lora["sst2/std"]) == pytest.approx(0.02)
    assert float(hira["sst2/mean"]) == pytest.approx(0.83) and int(hira["sst2/n"]) == 3
    assert float(sparse["wikitext2/std"]) == pytest.approx(math.sqrt(7))  # 40, 41, 45: sample std
    # sst2: hira best. lora 0.01 behind on 1000 sentences, its errors unrelated to hira's: the paired difference
    # has a standard error of about 0.01, so it is noise. sparse, 0.22 behind, is worse.
    assert (hira["sst2/vs_best"], lora["sst2/vs_best"], sparse["sst2/vs_best"]) == ("best", "within_noise", "worse")
    assert float(lora["sst2/diff"]) == pytest.approx(-0.01, abs=1e-12)  # (0.80-0.81 + 0.82-0.83 + 0.84-0.85) / 3
    assert float(lora["sst2/ci_low"]) < -0.01 < float(lora["sst2/ci_high"]) and float(lora["sst2/ci_high"]) > 0
    assert float(lora["sst2/p_holm"]) >= 0.05 and int(lora["sst2/paired_seeds"]) == 3
    assert int(lora["sst2/test_examples"]) == N_TEST
    assert float(sparse["sst2/ci_high"]) < 0 and float(sparse["sst2/p_holm"]) < 0.05
    assert float(hira["sst2/mean_ci_low"]) < 0.83 < float(hira["sst2/mean_ci_high"])  # the best row's own interval
    # wikitext2: perplexity, lower is better; hira has one of three seeds failed, so lora pairs with it on seeds 0, 2
    assert hira["wikitext2/status"] == "partial" and int(hira["wikitext2/n"]) == 2
    assert float(hira["wikitext2/mean"]) == pytest.approx(29.25) and hira["wikitext2/vs_best"] == "best"
    assert float(lora["wikitext2/diff"]) == pytest.approx(((33 - 29) + (35 - 29.5)) / 2, rel=1e-9)
    assert int(lora["wikitext2/paired_seeds"]) == 2 and float(lora["wikitext2/ci_low"]) > 0
    assert lora["wikitext2/vs_best"] == "worse" and sparse["wikitext2/vs_best"] == "worse"
    assert t["qlora"]["sst2/status"] == "pending" and t["qlora"]["sst2/n"] == "0"
    assert float(lora["sst2/peak_memory_mib"]) == pytest.approx(800.0)
    assert float(lora["sst2/wall_s"]) == pytest.approx(101.0) and float(lora["sst2/trainable_pct"]) == 0.5

    md = paths["markdown"].read_text()
    assert "| method | sst2 (accuracy ↑) | wikitext2 (perplexity ↓) |" in md
    lora_md = _md_row(md, "lora")
    assert lora_md.startswith("| lora | ≈ 0.820 ± 0.020 (n=3)<br>Δ −0.010 [−0.0")
    assert "· 0.50 % trainable · 800 MiB · 101 s | 34.00 ± 1.00 (n=3)<br>Δ +4.75 [" in lora_md
    assert "**0.830 ± 0.020** (n=3)<br>95 % [0.8" in md and "**29.25 ± 0.35** (n=2 of 3)<br>95 % [" in md
    assert "| qlora | *pending* | – |" in md
    assert "paired bootstrap" in md and "Holm-corrected" in md and "≈: not distinguishable from the best" in md
    assert "qlora × sst2: pending (0/1 seeds)" in md and "hira × wikitext2: partial (2/3 seeds)" in md
    # these older records say nothing of saved_weights: they count as adapters, and sparse trains 10x fewer
    assert "⚠ sst2: trainable parameters differ by more than 10 % among adapter methods (sparse 500, lora 5.0k)" in md
    runs = list(csv.DictReader(open(paths["runs_csv"])))
    assert len(runs) == len(KNOWN) + 1
    assert {r["status"] for r in runs} == {"completed", "failed", "pending"}


def test_metric_from_outputs_reproduces_the_metrics():
    from peft_lab.report import metric_from_outputs

    rows = [{"id": 3, "label": 1, "pred": 1}, {"id": 0, "label": 0, "pred": 1}, {"id": 1, "label": 1, "pred": 1},
            {"id": 2, "label": 2, "pred": 2}]  # fmt: skip
    assert metric_from_outputs("accuracy", rows) == 0.75
    # class 0: tp 0, fn 1 -> F1 0; class 1: tp 2, fp 1 -> 4/5; class 2: tp 1 -> 1
    assert metric_from_outputs("macro_f1", rows) == pytest.approx((0 + 0.8 + 1) / 3, rel=1e-15)
    lm = [{"id": 0, "nll": 10.5, "tokens": 4}, {"id": 1, "nll": 2.25, "tokens": 2}]
    assert metric_from_outputs("perplexity", lm) == math.exp(12.75 / 6)
    assert metric_from_outputs("mlm_perplexity", lm) == math.exp(12.75 / 6)
    with pytest.raises(ValueError, match="perplexity"):
        metric_from_outputs("perplexity", rows)
    with pytest.raises(ValueError, match="twice"):
        metric_from_outputs("accuracy", rows + rows[:1])


def test_holm_adjustment_by_hand():
    from peft_lab.report import holm

    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> kept at 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and holm([0.2]) == [0.2] and holm([]) == []


def test_paired_bootstrap_one_discordant_example_has_known_p_and_interval():
    from peft_lab.report import compare_column, metric_from_outputs, outputs_arrays

    best = np.ones(N_TEST, bool)
    best[:100] = False  # accuracy 0.9
    one_off = best.copy()
    one_off[500] = False  # the same predictions but one: 0.899
    worse = best.copy()
    worse[100:200] = False  # 0.8
    outputs = {name: {0: outputs_arrays(cls_rows(c))} for name, c in (("a", best), ("b", one_off), ("c", worse))}
    res = compare_column("accuracy", outputs, "a")
    b, c = res["b"], res["c"]
    assert res["a"].vs_best == "best" and res["a"].mean_ci_low < 0.9 < res["a"].mean_ci_high
    # b − a = −(times example 500 is drawn) / N: Δ = −0.001; P(d ≥ 0) = P(never drawn) = (1 − 1/N)^N, P(d ≤ 0) = 1
    assert b.diff == pytest.approx(-0.001, abs=1e-15) and b.paired_seeds == 1 and b.test_examples == N_TEST
    assert b.p_value == pytest.approx(2 * (1 - 1 / N_TEST) ** N_TEST, abs=0.05)  # 0.736
    assert (b.ci_low, b.ci_high) == pytest.approx((-0.003, 0.0))  # drawn 0 to 3 times in 95 % of resamples
    assert c.diff == pytest.approx(-0.1) and c.p_value == 0.0 and c.ci_high < 0
    # Holm over m = 2: c's p (smallest) doubles, b's is max(2·p_c, p_b)
    assert c.p_holm == 0.0 and b.p_holm == b.p_value
    assert (b.vs_best, c.vs_best) == ("within_noise", "worse")
    assert compare_column("accuracy", outputs, "a") == res  # seeded: the same report every time
    f1 = compare_column("macro_f1", outputs, "a")["b"]
    assert f1.diff == pytest.approx(metric_from_outputs("macro_f1", cls_rows(one_off)) - metric_from_outputs(
        "macro_f1", cls_rows(best)), abs=1e-15)  # fmt: skip

    # perplexity: lower is better, a worse row has Δ > 0
    rng = np.random.default_rng(0)
    lm = {"a": {0: outputs_arrays(lm_rows(20.0, rng))}, "b": {0: outputs_arrays(lm_rows(25.0, rng))}}
    r = compare_column("perplexity", lm, "a")["b"]
    assert r.diff == pytest.approx(5.0, rel=1e-9) and 0 < r.ci_low < 5 < r.ci_high and r.vs_best == "worse"


def test_paired_sweep_marks_worse_and_indistinguishable_rows(tmp_path):
    """Three seeds, 1000 sentences: hira is lora with 3 of 1000 predictions changed; sparse is 0.15 behind."""
    from peft_lab import report

    sweep = tmp_path / "paired"
    for seed in range(3):
        rng = np.random.default_rng(seed)
        lora = random_correct(0.85, rng)
        hira = lora.copy()
        right, wrong = np.flatnonzero(lora)[:2], np.flatnonzero(~lora)[:1]
        hira[right], hira[wrong] = False, True  # two right answers lost, one gained: -0.001
        sparse = random_correct(0.70, rng)
        for method, correct in (("lora", lora), ("hira", hira), ("sparse", sparse)):
            save_run(sweep, method, seed, correct.mean(), cls_rows(correct), saved_weights="adapter",
                     trainable_params=1000)  # fmt: skip
    paths = report.build(sweep, quiet=True)
    t = _table(paths["csv"])
    assert [t[m]["sst2/vs_best"] for m in ("lora", "hira", "sparse")] == ["best", "within_noise", "worse"]
    assert float(t["hira"]["sst2/diff"]) == pytest.approx(-0.001, abs=1e-12)
    assert float(t["hira"]["sst2/ci_low"]) <= -0.001 <= float(t["hira"]["sst2/ci_high"])
    assert float(t["sparse"]["sst2/diff"]) == pytest.approx(-0.15, abs=1e-12)
    assert float(t["sparse"]["sst2/ci_high"]) < 0 < 0.05 - float(t["sparse"]["sst2/p_holm"])
    md = paths["markdown"].read_text()
    assert _md_row(md, "hira").startswith("| hira | ≈ 0.849 ± 0.000 (n=3)<br>Δ −0.001 [")
    assert _md_row(md, "sparse").startswith("| sparse | 0.700 ± 0.000 (n=3)<br>Δ −0.150 [−0.1")
    assert "p<0.001" in _md_row(md, "sparse")
    assert "One seed" not in md and "Untested" not in md


def test_single_seed_report_carries_test_sampling_intervals(tmp_path):
    from peft_lab import report

    sweep = tmp_path / "s"
    _write_sweep(sweep)
    for run in sweep.glob("*seed=[12]"):
        for f in run.iterdir():
            f.unlink()
        run.rmdir()
    (sweep / ".cells" / "manifest.json").unlink()
    t = _table(report.build(sweep, quiet=True)["csv"])
    lora = t["lora"]
    assert lora["sst2/std"] == "" and int(lora["sst2/paired_seeds"]) == 1
    assert float(lora["sst2/diff"]) == pytest.approx(-0.01, abs=1e-12)
    assert float(lora["sst2/ci_low"]) < -0.01 < float(lora["sst2/ci_high"]) and lora["sst2/vs_best"] == "within_noise"
    assert t["sparse"]["sst2/vs_best"] == "worse"
    md = (sweep / "report" / "report.md").read_text()
    assert "| lora | ≈ 0.800<br>Δ −0.010 [" in md
    assert "intervals and p-values cover test-example sampling only, not seed-to-seed variance" in md


def test_rows_without_paired_outputs_are_untested_and_say_why(tmp_path):
    from peft_lab import report

    sweep = tmp_path / "u"
    correct = random_correct(0.9, np.random.default_rng(0))
    save_run(sweep, "lora", 0, 0.9, cls_rows(correct))
    save_run(sweep, "hira", 0, 0.8)  # an older run: no test_outputs.jsonl
    shifted = [dict(r, id=r["id"] + 5000) for r in cls_rows(correct)]
    save_run(sweep, "sparse", 0, 0.9, shifted)  # evaluated on other sentences
    save_run(sweep, "qlora", 0, 0.7, cls_rows(correct))  # outputs of another run: 0.9, not 0.7
    t = _table(report.build(sweep, quiet=True)["csv"])
    assert t["lora"]["sst2/vs_best"] == "best"
    assert (t["hira"]["sst2/vs_best"], t["hira"]["sst2/note"]) == ("untested", "no test_outputs.jsonl")
    assert (t["sparse"]["sst2/vs_best"], t["sparse"]["sst2/note"]) == (
        "untested",
        "not paired: different test examples",
    )
    assert t["qlora"]["sst2/vs_best"] == "untested" and "metrics.json 0.7" in t["qlora"]["sst2/note"]
    assert t["hira"]["sst2/diff"] == "" and t["hira"]["sst2/p_holm"] == ""
    md = (sweep / "report" / "report.md").read_text()
    assert "<br>untested: not paired: different test examples" in _md_row(md, "sparse")
    assert "Untested, no test_outputs.jsonl (written by runs of this peft_lab" in md and "hira × sst2" in md


def _budget_sweep(tmp_path, rows: dict) -> str:
    from peft_lab import report

    sweep = tmp_path / "budget"
    for (method, r), (params, weights) in rows.items():
        config = {"method": {"name": method, "r": r}, "seed": 0}
        save_run(sweep, method, 0, 0.8, prefix=f"r={r},", config=config, trainable_params=params, saved_weights=weights)
    return report.build(sweep, quiet=True)["markdown"].read_text()


def test_unequal_adapter_budgets_are_flagged_and_baselines_are_not(tmp_path):
    md = _budget_sweep(tmp_path / "a", {("lora", 8): (410_000, "adapter"), ("lora", 32): (1_640_000, "adapter")})
    assert (
        "⚠ sst2: trainable parameters differ by more than 10 % among adapter methods "
        "(lora [method.r=8] 0.41M, lora [method.r=32] 1.64M): not an equal-budget comparison"
    ) in md
    md = _budget_sweep(
        tmp_path / "b",
        {
            ("lora", 8): (410_000, "adapter"),
            ("hira", 8): (450_000, "adapter"),
            ("full", 0): (135_000_000, "full_model"),
        },
    )
    assert "⚠" not in md  # 450k ≤ 1.1 × 410k; the full fine-tune is a baseline, not an adapter


# ----------------------------------------------------------------------------- protocol sweeps

GRIDS = {"lora": [0.00015, 0.0005, 0.0015], "hira": [0.0005, 0.0015, 0.005], "sparse": [0.00015, 0.0005, 0.0015]}
SELECT = {"lora": [0.80, 0.85, None], "hira": [0.78, 0.82, 0.84], "sparse": [None, None, None]}  # None: failed
CHOSEN = {"lora": (0.0005, False), "hira": (0.005, True), "sparse": (None, False)}


@pytest.fixture
def protocol_sweep(tmp_path) -> Path:
    sweep = tmp_path / "protocol"
    arms = []
    for m, grid in GRIDS.items():
        chosen, at_edge = CHOSEN[m]
        problem = None if chosen else "stage 1 is incomplete (lr 0.00015: failed; ...): no lr chosen"
        stage1 = []
        for lr, select in zip(grid, SELECT[m]):
            run = save_run(sweep, m, 0, 0.5 if select else None, prefix=f"s1,lr={lr},", select_metric_value=select,
                           config={"method": {"name": m, "lr": lr}, "seed": 0})  # fmt: skip
            stage1.append(
                {"lr": lr, "run_dir": run.name, "status": "completed" if select else "failed", "select": select}
            )
        stage2 = []
        for seed in range(3):
            correct = random_correct(0.85 if m == "lora" else 0.84, np.random.default_rng([len(m), seed]))
            run = save_run(sweep, m, seed, correct.mean(), cls_rows(correct), prefix="s2,",
                           config={"method": {"name": m, "lr": chosen}, "seed": seed}) if chosen else None  # fmt: skip
            stage2 += [run.name] if run else []
        arms.append({"arm": f"method={m} dataset=sst2", "overrides": [f"method={m}", "dataset=sst2"], "method": m,
                     "dataset": "sst2", "metric": "accuracy", "lower_is_better": False, "grid": grid,
                     "stage1": stage1, "chosen_lr": chosen, "at_edge": at_edge, "stage2": stage2,
                     "problem": problem})  # fmt: skip
    rf.write_protocol(sweep, {"protocol": "select_lr", "seeds": [0, 1, 2], "arms": arms})
    return sweep


def test_protocol_sweep_tables_show_stage2_runs_and_the_stage1_choice(protocol_sweep):
    from peft_lab import report

    paths = report.build(protocol_sweep, quiet=True)
    t = _table(paths["csv"])
    assert list(t) == ["lora", "hira", "sparse"]  # stage-1 lrs never split a row
    assert int(t["lora"]["sst2/n"]) == 3 and float(t["lora"]["sst2/lr"]) == 0.0005
    assert float(t["lora"]["sst2/mean"]) == pytest.approx(0.85)  # the stage-2 runs only (stage-1 ones say 0.5)
    assert t["sparse"]["sst2/status"] == "no lr completed"
    md = paths["markdown"].read_text()
    main, stage1 = md.split("## Stage 1: selection metric per learning rate")
    assert "method.lr" not in md
    lora = _md_row(main, "lora")  # the best row: its interval, then the chosen lr
    assert lora.startswith("| lora | **0.850 ± 0.000** (n=3)<br>95 % [0.8") and lora.endswith("] · lr 5e-04 |")
    assert _md_row(main, "hira").endswith("· lr 5e-03 (grid edge) |")
    assert (
        "| sparse | *no lr completed* |" in main
        and "sparse × sst2: no lr completed (0/3 seeds), stage 1 is incomplete (" in main
    )
    assert "### sst2 (accuracy on the selection split ↑)" in stage1
    assert "| method | lr 1.5e-04 | lr 5e-04 | lr 1.5e-03 | lr 5e-03 |" in stage1
    assert "| lora | 0.800 | **0.850** | failed | – |" in stage1
    assert "| hira | – | 0.780 | 0.820 | **0.840** |" in stage1
    assert "| sparse | failed | failed | failed | – |" in stage1
    assert paths["select_lr"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list(csv.DictReader(open(paths["runs_csv"])))
    assert sorted(r["stage"] for r in runs) == ["stage1"] * 9 + ["stage2"] * 9  # 6 runs, 3 sparse placeholders

    (protocol_sweep / rf.PROTOCOL_FILE).unlink()  # the same runs as a plain sweep: every lr is a row
    plain = report.build(protocol_sweep, quiet=True)
    assert "select_lr" not in plain and "## Stage 1" not in plain["markdown"].read_text()
    assert "lora [method.lr=0.0005]" in _table(plain["csv"])


def test_select_lr_plot_has_one_line_per_method_and_marks_the_choice(protocol_sweep):
    from peft_lab import report

    runs = report.load_runs(protocol_sweep)
    fig = report.protocol_figures(rf.read_protocol(protocol_sweep), runs)["select_lr"]
    ax = fig.axes[0]
    assert ax.get_title() == "sst2" and ax.get_xscale() == "log"
    assert ax.get_ylabel() == "accuracy on the selection split (higher is better)"
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["lora"].get_xdata()) == [0.00015, 0.0005] and list(lines["lora"].get_ydata()) == [0.80, 0.85]
    stars = [ln for ln in ax.get_lines() if ln.get_label() == "_chosen"]
    assert sorted((float(s.get_xdata()[0]), float(s.get_ydata()[0])) for s in stars) == [(0.0005, 0.85), (0.005, 0.84)]


# ----------------------------------------------------------------------------- plots, CLI


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
    assert "| lora | ≈ 0.820 ± 0.020 (n=3)<br>Δ −0.010" in ok.stdout
    from peft_lab.report import PLOTS

    for name in PLOTS:
        assert (known_sweep / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (known_sweep / "report" / "select_lr.png").exists()  # a plain sweep has no stage 1
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run(str(empty))
    assert bad.returncode == 2 and "no runs found" in bad.stderr and "Fix:" in bad.stderr
    assert not (empty / "report" / "report.md").exists()
    missing = run(str(tmp_path / "nope"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
