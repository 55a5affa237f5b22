"""The inference cost a run records (``peft_lab.inference``, metrics.json ``inference``), through the run pipeline.

The method contracts (tests/test_methods.py, tests/test_peft_methods.py) check the merge of every method against
an independent forward; here: what a user reads in metrics.json, and the settings.
"""

from __future__ import annotations

import pytest
from conftest import TINY, read_metrics

from peft_lab import run
from peft_lab import runfiles as rf


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv("PEFT_LAB_CACHE", str(cache_dir))


def _run(compose, tmp_path, *args):
    run_dir = tmp_path / "run"
    run.execute(compose(*TINY, "experiment=smoke", "train.threads=1", *args), run.RunContext(run_dir))
    return read_metrics(run_dir)


@pytest.mark.parametrize("dataset", ["sst2", "wikitext2"])
def test_a_lora_run_records_latency_merge_and_footprints(dataset, compose, tmp_path):
    m = _run(compose, tmp_path, f"dataset={dataset}", "train.inference.examples=10", "train.inference.repeats=2")
    inf = m["inference"]
    assert m["status"] == "completed"
    assert inf["examples"] == min(10, m["test_examples"]) and inf["repeats"] == 2
    assert inf["merge"] == "merged" and inf["outputs_match"] is True and inf["merge_error"] is None
    assert 0 <= inf["max_abs_diff"] <= inf["tolerance"]
    assert inf["latency_ms"] > 0 and inf["merged_latency_ms"] > 0
    # merged = the base model's size (the adapter folded in, the trained head replacing the original);
    # unmerged = base + every trained tensor (adapter factors, and the head's trainable copy)
    assert inf["merged_footprint_bytes"] == m["model_footprint_bytes"]
    assert inf["footprint_bytes"] - inf["merged_footprint_bytes"] == 4 * m["trainable_params"]
    if dataset == "sst2":
        assert inf["pred_agreement"] == 1.0
    else:
        assert inf["pred_agreement"] is None


def test_full_fine_tuning_has_nothing_to_merge(compose, tmp_path):
    inf = _run(compose, tmp_path, "method=full", "method.lr=1e-4")["inference"]
    assert inf["merge"] == "not_applicable" and inf["merged_latency_ms"] is None and inf["outputs_match"] is None
    assert inf["latency_ms"] > 0


def test_measure_false_records_nothing_and_is_another_cell(compose, tmp_path):
    m = _run(compose, tmp_path, "train.inference.measure=false")
    assert m["status"] == "completed" and m["inference"] is None
    # the setting is part of the run's identity: a completed run without the measurement is not "already done"
    # for a command that asks for it
    on, off = (rf.fingerprint(rf.computation_config(compose(*TINY, f"train.inference.measure={v}"))) for v in (1, 0))
    assert on != off
