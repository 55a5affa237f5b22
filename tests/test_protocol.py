"""The honest-comparison protocol: selection and test splits, +protocol=select_lr, equal budgets, per-example outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import TINY, sentiment_rows, write_parquet


def _records(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


def test_select_lr_protocol_chooses_on_selection_reports_test_and_reruns_nothing(run_cli, tmp_path):
    """Two methods, their own 2-point grids, two seeds: stage 1 = 4 runs (seed 0), stage 2 = the best lr per
    method x 2 seeds, the seed-0 one reused from stage 1. The choice is the best *selection* metric; the
    table is the test metric; a re-run recomputes nothing."""
    sweep = tmp_path / "sweep"
    args = ["-m", "method=lora,hira", "dataset=sst2", "experiment=smoke", "logger=none", "+protocol=select_lr",
            "seed=0,1", "cluster.parallel=2", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    protocol = json.loads((sweep / "protocol.json").read_text())
    records = _records(sweep)
    assert len(records) == 3 * 2 + 2  # each default grid has 3 lrs; one extra seed per method
    assert [a["method"] for a in protocol["arms"]] == ["lora", "hira"] and protocol["seeds"] == ["0", "1"]
    for arm in protocol["arms"]:
        # stage 1: one run per lr of the method's own grid, first seed, scored on the selection split
        stage1 = {records[e["run_dir"]]["config"]["method"]["lr"]: records[e["run_dir"]] for e in arm["stage1"]}
        assert sorted(stage1) == sorted(arm["grid"]) and {r["seed"] for r in stage1.values()} == {0}
        assert all(r["select_source"].startswith("carved from train") for r in stage1.values())
        assert all(r["test_source"] == "synthetic:validation" for r in stage1.values())
        best = max(arm["grid"], key=lambda lr: (stage1[lr]["select"]["accuracy"], -arm["grid"].index(lr)))
        assert arm["chosen_lr"] == best
        # stage 2: the chosen lr with every seed; the seed-0 run is the stage-1 run at that lr
        stage2 = [records[name] for name in arm["stage2"]]
        assert {r["config"]["method"]["lr"] for r in stage2} == {best} and sorted(r["seed"] for r in stage2) == [0, 1]
        assert next(e["run_dir"] for e in arm["stage1"] if e["lr"] == best) in arm["stage2"]
        assert all(r["main_metric_value"] == r["test"]["accuracy"] for r in stage2)
    lora, hira = protocol["arms"]
    assert lora["grid"] != hira["grid"]  # each method its own range

    from peft_lab.report import _fmt_lr

    report = (sweep / "report" / "report.md").read_text()
    for arm in protocol["arms"]:
        assert f"lr {_fmt_lr(arm['chosen_lr'])}" in report.split("## Stage 1")[0]  # the chosen lr in the main table
    assert "Stage 1: selection metric per learning rate" in report and "95 %" in report and "Δ" in report
    assert "Holm" in report and (sweep / "report" / "select_lr.png").stat().st_size > 0

    from peft_lab import status

    reported = {name for arm in protocol["arms"] for name in arm["stage2"]}
    for row in status.collect(sweep)["cells"]:  # status never shows a test metric the choice could peek at
        assert row["metric"] == ("accuracy" if row["cell"] in reported else "accuracy (selection)"), row
        rec = records[row["cell"]]
        assert row["value"] == (rec["test"] if row["cell"] in reported else rec["select"])["accuracy"]

    before = {p: p.read_bytes() for p in sweep.glob("*/metrics.json")}
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 completed, 6 skipped" in again.stdout and "0 completed, 4 skipped" in again.stdout
    assert {p: p.read_bytes() for p in sweep.glob("*/metrics.json")} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["method.lr=0.1"], "chooses it from method.lr_grid"),
        (["method.lr_grid=[-0.1,0.001]"], "must list distinct positive learning rates"),
        (["method.lr_grid=[]"], "empty method.lr_grid"),
        (["dataset.select_size=0"], "dataset.select_size=0 is not a positive number"),  # a cell's start-up check
    ],
)
def test_protocol_refuses_before_launching_anything(args, message, run_cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "method=lora", "dataset=sst2", "experiment=smoke", "logger=none", "+protocol=select_lr",
                   *args, f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Nothing was launched" in proc.stderr
    assert not sweep.exists()  # not even multirun.yaml


def test_protocol_without_a_sweep_is_refused(run_cli, tmp_path):
    """Without -m no sweeper runs: a single run at method.lr must not pass for the protocol's result."""
    run_dir = tmp_path / "run"
    proc = run_cli("method=lora", "dataset=sst2", "experiment=smoke", "logger=none", "+protocol=select_lr",
                   f"hydra.run.dir={run_dir}")  # fmt: skip
    assert proc.returncode == 2 and "add -m" in proc.stderr
    assert not (run_dir / "metrics.json").exists()


def test_protocol_does_not_choose_from_an_incomplete_grid(tmp_path, monkeypatch):
    """A stage-1 run that failed for another reason than divergence leaves the grid incomplete: no lr is
    chosen (choosing among the survivors would bias the comparison); a diverged lr is simply out."""
    from peft_lab import protocol
    from peft_lab import runfiles as rf

    def run(name: str, status: str, select: float | None, failure: str | None = None) -> dict:
        rf.RunRecord(status=rf.Status(status), failure=failure, select_metric_value=select).save(tmp_path / name)
        return {"run_dir": name}

    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()
    arm = protocol.Arm(["method=lora"], "lora", "sst2", "accuracy", False, [1e-4, 1e-3, 1e-2])
    arm.stage1 = [run("a", "completed", 0.7), run("b", "completed", 0.8), run("c", "failed", None, "diverged")]
    for e, lr in zip(arm.stage1, arm.grid):
        e["lr"] = lr
    protocol.choose(arm, tmp_path)
    assert arm.chosen_lr == 1e-3 and not arm.problem and not arm.at_edge

    run("c", "failed", None, "error")
    arm.chosen_lr = None
    protocol.choose(arm, tmp_path)
    assert arm.chosen_lr is None and "stage 1 is incomplete" in arm.problem


def test_per_example_outputs_reproduce_the_reported_metric_exactly(compose, tmp_path):
    from peft_lab import report, run
    from peft_lab import runfiles as rf
    from peft_lab.training import classification_metrics

    for dataset, metric in (("sst2", "accuracy"), ("wikitext2", "perplexity")):
        run_dir = tmp_path / dataset
        run.execute(compose("experiment=smoke", f"dataset={dataset}", "logger=none"), run.RunContext(run_dir))
        rec, rows = rf.read_record(run_dir), rf.read_outputs(run_dir)
        assert len(rows) == rec.test_examples and len({r["id"] for r in rows}) == len(rows)
        if metric == "accuracy":
            assert sum(r["pred"] == r["label"] for r in rows) / len(rows) == rec.main_metric_value
            again = classification_metrics([r["pred"] for r in rows], [r["label"] for r in rows])
            assert again["macro_f1"] == rec.test["macro_f1"]
        else:
            nll, tokens = sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
            assert tokens == rec.test["eval_tokens"] and math.exp(nll / tokens) == rec.main_metric_value
        assert report.metric_from_outputs(metric, rows) == rec.main_metric_value


def test_selection_and_test_carved_from_train_are_disjoint_from_training(compose, tmp_path):
    """Carving is seeded and disjoint; a training row whose text repeats a carved one is dropped too."""
    from peft_lab import data

    rows = sentiment_rows(60)
    rows["sentence"][10] = rows["sentence"][11] = "a duplicated sentence"
    write_parquet(tmp_path / "d", "train", rows)
    args = [f"dataset.data_dir={tmp_path / 'd'}", "dataset.select_size=12", "dataset.test_split=null",
            "dataset.max_test_samples=10"]  # fmt: skip
    splits = data.load_splits(compose(*args).dataset)
    ids = {part: set(getattr(splits, part)[data.ROW_ID]) for part in ("train", "select", "test")}
    assert len(ids["select"]) == 12 and len(ids["test"]) == 10
    assert not ids["train"] & ids["select"] and not ids["train"] & ids["test"] and not ids["select"] & ids["test"]
    texts = {part: set(getattr(splits, part)["sentence"]) for part in ("train", "select", "test")}
    assert not texts["train"] & (texts["select"] | texts["test"])
    assert len(ids["train"]) + len(ids["select"]) + len(ids["test"]) + splits.dropped_duplicates == 60
    assert splits.sources["test"].startswith("carved from train")
    same = data.load_splits(compose(*args).dataset)
    assert set(same.select[data.ROW_ID]) == ids["select"]  # seeded: the same carve every time
    other = data.load_splits(compose(*args, "dataset.subset_seed=1").dataset)
    assert set(other.select[data.ROW_ID]) != ids["select"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["dataset.select_size=null"], "dataset.select_size (how many rows to carve) is not set"),
        (["dataset.select_split=validation", "dataset.test_split=validation"], "three different sets"),
        (["dataset.select_size=100"], "leaves no training rows"),
    ],
)
def test_impossible_splits_are_refused(args, message, run_cli, tmp_path, sst2_dir):
    proc = run_cli(*TINY, f"dataset.data_dir={sst2_dir}", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_truncation_side_left_keeps_the_end_of_a_long_text(compose, tmp_path):
    from peft_lab import data, models

    rows = {"sentence": [" ".join(f"w{i}" for i in range(200))] * 4, "label": [0, 1, 0, 1]}
    write_parquet(tmp_path / "d", "train", rows)
    cfg = compose("model=tiny", f"dataset.data_dir={tmp_path / 'd'}", "dataset.max_length=16")
    tok = models.load(cfg.model, "classification", 2, {}, None).tokenizer
    full = tok(rows["sentence"][0])["input_ids"]
    raw, _ = data.load_validated(cfg.dataset, "train")
    right = data.tokenize(cfg.dataset, tok, raw, None)[0]["input_ids"]
    cfg.dataset.truncation_side = "left"
    left = data.tokenize(cfg.dataset, tok, raw, None)[0]["input_ids"]
    assert len(left) == len(right) == 16 and right == full[:16] and left[-8:] == full[-8:]
    assert tok.truncation_side == "right"  # the tokenizer is left as it was


def test_equal_rank_gives_lora_and_hira_the_same_trainable_parameters(compose):
    """Equal budgets by default: HiRA at LoRA's rank trains exactly LoRA's adapter parameters."""
    from peft_lab import metrics, models
    from peft_lab.methods import get_method_class

    counts = {}
    for name in ("lora", "hira"):
        cfg = compose("model=tiny", f"method={name}", "dataset=wikitext2")
        assert cfg.method.r == 8
        method = get_method_class(name)(cfg.method, cfg.model, "causal_lm")
        model = method.adapt(models.load(cfg.model, "causal_lm", 2, {}, None).model)
        counts[name] = metrics.count_parameters(model)["adapter_params"]
    assert counts["lora"] == counts["hira"] > 0
