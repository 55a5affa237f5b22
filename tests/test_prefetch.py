"""prefetch writes the local-folder layout that dataset.data_dir reads."""

from __future__ import annotations

from datasets import Dataset

from peft_lab import data
from peft_lab.prefetch import write_dataset_splits


def test_written_splits_read_back_through_data_dir(tmp_path, compose):
    splits = {
        "train": Dataset.from_dict({"sentence": ["good film", "bad film"], "label": [1, 0], "idx": [0, 1]}),
        "validation": Dataset.from_dict({"sentence": ["great"], "label": [1], "idx": [0]}),
    }
    written = write_dataset_splits(splits, tmp_path / "sst2")
    assert sorted(p.name for p in written) == ["train.parquet", "validation.parquet"]
    assert not list((tmp_path / "sst2").glob(".*tmp"))
    cfg = compose("dataset=sst2", f"dataset.data_dir={tmp_path / 'sst2'}")
    train, where = data.load_validated(cfg.dataset, "train")
    assert list(train["sentence"]) == ["good film", "bad film"] and list(train["label"]) == [1, 0]
