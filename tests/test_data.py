"""Data loading: local folders in every format, the env-var root, subsets, LM blocks, offline Hub."""

from __future__ import annotations

import json
import time

import pytest
from conftest import sentiment_rows, write_parquet

from peft_lab import data
from peft_lab.errors import UserError


def _write(folder, split, rows, ext):
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    path = folder / f"{split}.{ext}"
    if ext == "parquet":
        df.to_parquet(path)
    elif ext == "csv":
        df.to_csv(path, index=False)
    elif ext == "tsv":
        df.to_csv(path, sep="\t", index=False)
    elif ext == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    return path


@pytest.mark.parametrize("ext", ["parquet", "csv", "tsv", "jsonl"])
def test_local_folder_formats(ext, compose, tmp_path):
    rows = sentiment_rows(10)
    for split in ("train", "validation"):
        _write(tmp_path / "d", split, rows, ext)
    cfg = compose("dataset=sst2", f"dataset.data_dir={tmp_path / 'd'}")
    data.check_config(cfg.dataset)
    loaded, where = data.load_validated(cfg.dataset, "train")
    assert where == f"local:{tmp_path / 'd'}"
    assert list(loaded["sentence"]) == rows["sentence"] and list(loaded["label"]) == rows["label"]


def test_tsv_is_unquoted_as_in_glue(compose, tmp_path):
    """GLUE .tsv files have no quoting: a sentence that starts with '"' must not swallow the next rows."""
    folder = tmp_path / "d"
    folder.mkdir()
    lines = ['" a good film\t1', "a bad film\t0", 'an " odd one\t1']
    for split in ("train", "validation"):
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    cfg = compose("dataset=sst2", f"dataset.data_dir={folder}")
    data.check_config(cfg.dataset)
    loaded, _ = data.load_validated(cfg.dataset, "train")
    assert list(loaded["sentence"]) == ['" a good film', "a bad film", 'an " odd one']
    labels = list(loaded["label"])
    assert labels == [1, 0, 1] and all(type(lab) is int for lab in labels)


def test_txt_folder_for_language_modelling(compose, tmp_path):
    folder = tmp_path / "wt"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.txt").write_text("first line of text\n\nsecond line\n")
    cfg = compose("dataset=wikitext2", f"dataset.data_dir={folder}")
    loaded, _ = data.load_validated(cfg.dataset, "validation")
    assert list(loaded["text"]) == ["first line of text", "second line"]  # the empty row is dropped


def test_env_root_with_one_folder_per_dataset(compose, tmp_path, monkeypatch):
    write_parquet(tmp_path / "root" / "sst2", "train", sentiment_rows(6))
    write_parquet(tmp_path / "root" / "sst2", "validation", sentiment_rows(4))
    # a dataset folder with one sub-folder per Hub config, as in ../shared/data/wikitext2
    for split in ("train", "validation"):
        write_parquet(tmp_path / "root" / "wikitext2" / "wikitext-2-v1", split, {"text": [" a b c \n"] * 3})
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path / "root"))
    cfg = compose("dataset=sst2")
    assert data.local_dir(cfg.dataset) == tmp_path / "root" / "sst2"
    cfg = compose("dataset=wikitext2", "dataset.hub_config=wikitext-2-v1")
    assert data.local_dir(cfg.dataset) == tmp_path / "root" / "wikitext2" / "wikitext-2-v1"
    # data_dir wins over the root
    write_parquet(tmp_path / "own", "train", sentiment_rows(2))
    cfg = compose("dataset=sst2", f"dataset.data_dir={tmp_path / 'own'}")
    assert data.local_dir(cfg.dataset) == tmp_path / "own"


def test_subset_is_seeded_and_stable():
    items = list(range(100))
    a = data.subset(items, 10, seed=0)
    assert a == data.subset(items, 10, seed=0) and len(a) == 10 and a != items[:10]
    assert data.subset(items, 10, seed=1) != a
    assert data.subset(items, None, seed=0) == items and data.subset(items, 500, seed=0) == items


def test_lm_blocks_concatenate_and_drop_remainder():
    from peft_lab.models import byte_tokenizer

    tok = byte_tokenizer()
    blocks = data.lm_blocks(tok, ["abcd", "efgh", "ij"], block_size=4)
    assert [tok.decode(b["input_ids"]) for b in blocks] == ["abcd", "efgh"]


def test_synthetic_data_has_the_dataset_layout(compose):
    cfg = compose("dataset=imdb", "dataset.source=synthetic", "dataset.synthetic_train_size=20")
    train, where = data.load_validated(cfg.dataset, "train")
    assert where == "synthetic" and len(train) == 20 and set(train.column_names) == {"text", "label", data.ROW_ID}
    assert set(train["label"]) == {0, 1}


def test_hub_unreachable_fails_fast_with_the_fix(compose, monkeypatch):
    """No offline env var set, but the endpoint refuses: fail in seconds, naming the options."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", data.DATA_ROOT_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    cfg = compose("dataset=sst2")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        data.load_validated(cfg.dataset, "train")
    assert time.monotonic() - start < 5
    assert "dataset.data_dir" in str(err.value) and "peft_lab.prefetch" in str(err.value)


def test_hub_offline_env_is_honoured(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data.hub_reachable() is False
