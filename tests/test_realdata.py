"""Real staged data, read by path (../shared/data or PEFT_LAB_SHARED_DATA); run with -m realdata."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA, TINY, read_metrics

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason=f"no staged data at {SHARED_DATA}"),
]


def test_sst2_through_the_env_root(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        *TINY,
        "dataset=sst2",
        "dataset.max_train_samples=64",
        "dataset.max_test_samples=64",
        f"hydra.run.dir={run_dir}",
        env={"PEFT_LAB_DATA_ROOT": str(SHARED_DATA)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = read_metrics(run_dir)
    assert m["status"] == "completed" and m["data_source"] == f"local:{SHARED_DATA / 'sst2'}"
    assert m["train_examples"] == 64 and m["test_examples"] == 64


def test_sst2_full_validation_split_counts(compose):
    from peft_lab import data

    cfg = compose("dataset=sst2", f"dataset.data_dir={SHARED_DATA / 'sst2'}")
    val, _ = data.load_validated(cfg.dataset, "validation")
    assert len(val) == 872 and sorted(set(val["label"])) == [0, 1]


def test_sst2_test_split_is_rejected_as_unlabelled(run_cli, tmp_path):
    proc = run_cli(
        *TINY,
        "dataset=sst2",
        f"dataset.data_dir={SHARED_DATA / 'sst2'}",
        "dataset.test_split=test",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2 and "unlabelled rows" in proc.stderr


def test_wikitext2_tokenised_variant_via_data_dir(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        *TINY,
        "dataset=wikitext2",
        f"dataset.data_dir={SHARED_DATA / 'wikitext2' / 'wikitext-2-v1'}",
        "dataset.max_train_samples=24",
        "dataset.max_test_samples=8",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = read_metrics(run_dir)
    assert m["status"] == "completed", m.get("error")
    assert m["test"]["eval_tokens"] == 8 * 31 and m["test"]["perplexity"] > 1


def test_wikitext2_raw_config_under_env_root_names_the_missing_split(run_cli, tmp_path):
    """The staged raw variant has only a test split: the error says which split is missing."""
    proc = run_cli(
        *TINY, "dataset=wikitext2", f"hydra.run.dir={tmp_path / 'run'}", env={"PEFT_LAB_DATA_ROOT": str(SHARED_DATA)}
    )
    assert proc.returncode == 2 and "split 'train' not found" in proc.stderr


def test_imdb_train_only_folder_carves_selection_and_test_from_train(run_cli, tmp_path):
    """The staged IMDB holds train alone: selection and test are carved from it, disjoint from training."""
    if not (SHARED_DATA / "imdb").is_dir():
        pytest.skip("no staged IMDB")
    run_dir = tmp_path / "run"
    proc = run_cli(
        *TINY,
        "dataset=imdb",
        "dataset.test_split=null",
        "dataset.max_test_samples=8",
        "dataset.max_train_samples=16",
        f"hydra.run.dir={run_dir}",
        env={"PEFT_LAB_DATA_ROOT": str(SHARED_DATA)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = read_metrics(run_dir)
    assert m["status"] == "completed" and m["train_examples"] == 16
    assert m["select_examples"] == 4 and m["test_examples"] == 8
    assert m["select_source"].startswith("carved from train") and m["test_source"].startswith("carved from train")
