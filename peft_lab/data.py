"""Data: a local folder, the Hub or synthetic text -> validated, tokenised splits.

Column names, the task and metrics come from the dataset config; nothing here
branches on a dataset's name. Every check raises a ``UserError`` that names the
problem and the option that fixes it.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from peft_lab.errors import fail
from peft_lab.schemas import plain

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "PEFT_LAB_DATA_ROOT"
ROW_ID = "__row_id"  # added to every loaded split: the example's row in its file (the id in test_outputs)
# file extension -> datasets builder (and its extra kwargs).
# .tsv follows the GLUE convention: tab-separated, no quoting (csv.QUOTE_NONE == 3), so a text
# that starts with '"' is read as it is instead of swallowing the following rows.
FORMATS = {
    "parquet": ("parquet", {}),
    "csv": ("csv", {}),
    "tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
    "jsonl": ("json", {}),
    "json": ("json", {}),
    "txt": ("text", {}),
}


# ----------------------------------------------------------------------------- checks


def check_config(ds: Any) -> None:
    """Checks that need no data: run before any heavy import.

    Raises ``UserError`` naming the option to fix (non-positive sample counts, a
    classification dataset without labels, ``data_dir`` together with
    ``source=synthetic``, a local folder missing a split).
    """
    carving = {"select_size": ds.select_split is None, "max_test_samples": ds.test_split is None}
    for key in ("max_train_samples", "max_test_samples", "select_size"):
        value = getattr(ds, key)
        if value is not None and value <= 0:
            raise fail(
                f"dataset.{key}={value} is not a positive number of samples",
                "give a positive integer"
                + ("" if carving.get(key) else f", or dataset.{key}=null to use the whole split"),
            )
    if ds.task == "classification" and not ds.label_column:
        raise fail(f"dataset '{ds.name}' is a classification task without a label column", "set dataset.label_column")
    if ds.num_labels < 2 and ds.task == "classification":
        raise fail(f"dataset.num_labels={ds.num_labels}", "a classifier needs num_labels >= 2")
    if ds.source == "synthetic" and ds.data_dir:
        raise fail(
            f"dataset.data_dir='{ds.data_dir}' is set but dataset.source=synthetic (set by you, or by experiment=smoke) "
            "makes toy data in-process, so the folder would be ignored",
            "drop dataset.data_dir to run on synthetic data, or add dataset.source=local (or auto) "
            "to train on the folder (it overrides the experiment preset)",
        )
    for split_key, size_key in (("select_split", "select_size"), ("test_split", "max_test_samples")):
        if getattr(ds, split_key) is None and getattr(ds, size_key) is None:
            raise fail(
                f"dataset.{split_key}=null carves that split out of dataset.train_split='{ds.train_split}', "
                f"but dataset.{size_key} (how many rows to carve) is not set",
                f"set dataset.{size_key}=<rows>, or dataset.{split_key}=<a split that exists>",
            )
    named = [s for s in (ds.select_split, ds.test_split) if s is not None]
    if ds.train_split in named or len(set(named)) < len(named):
        raise fail(
            f"the train / selection / test splits must be three different sets (train_split={ds.train_split}, "
            f"select_split={ds.select_split}, test_split={ds.test_split})",
            "name three different splits, or set select_split (or test_split) to null to carve it from train",
        )
    if ds.source in ("auto", "local"):
        folder = local_dir(ds)
        if folder is not None:
            for split in [ds.train_split] + named:
                split_file(folder, split)
        elif ds.source == "local":
            raise fail(
                f"dataset.source=local but no folder is given for '{ds.name}'",
                f"set dataset.data_dir=<folder> or {DATA_ROOT_ENV}=<root>/{ds.name}",
            )


def local_dir(ds: Any) -> Optional[Path]:
    """dataset.data_dir, else $PEFT_LAB_DATA_ROOT/<name>[/<hub_config>], else None."""
    if ds.data_dir:
        folder = Path(ds.data_dir).expanduser()
        if not folder.is_dir():
            raise fail(
                f"dataset.data_dir '{folder}' does not exist or is not a folder",
                "point dataset.data_dir at a folder holding {split}.parquet (or .csv/.tsv/.jsonl/.txt) files",
            )
        _check_not_empty(folder, "dataset.data_dir")
        return folder
    root = os.environ.get(DATA_ROOT_ENV)
    if not root:
        return None
    folder = Path(root).expanduser() / ds.name
    if ds.hub_config and (folder / ds.hub_config).is_dir():
        folder = folder / ds.hub_config
    if not folder.is_dir():
        return None
    _check_not_empty(folder, f"{DATA_ROOT_ENV}/{ds.name}")
    return folder


def _check_not_empty(folder: Path, what: str) -> None:
    if not any(p.suffix.lstrip(".") in FORMATS for p in folder.iterdir() if p.is_file()):
        raise fail(
            f"{what} '{folder}' holds no data files",
            "put {split}.parquet (or .csv/.tsv/.jsonl/.txt) files in it, e.g. with python -m peft_lab.prefetch",
        )


def split_file(folder: Path, split: str) -> Path:
    for ext in FORMATS:
        path = folder / f"{split}.{ext}"
        if path.is_file():
            return path
    present = sorted(p.stem for p in folder.iterdir() if p.suffix.lstrip(".") in FORMATS)
    raise fail(
        f"split '{split}' not found in '{folder}' (expected {split}.parquet/.csv/.tsv/.jsonl/.txt; found {present})",
        "add the file, or set dataset.train_split / dataset.eval_split to a split that exists",
    )


# ----------------------------------------------------------------------------- loading


def load_raw(ds: Any, split: str):
    """The split as a ``datasets.Dataset`` in the Hub's column layout, plus where it came from."""
    if ds.source == "synthetic":
        return synthetic(ds, split), "synthetic"
    folder = local_dir(ds) if ds.source in ("auto", "local") else None
    if folder is not None:
        return _load_file(split_file(folder, split)), f"local:{folder}"
    return _load_hub(ds, split), f"hub:{ds.hub_path}" + (f"/{ds.hub_config}" if ds.hub_config else "")


def _load_file(path: Path):
    from datasets import load_dataset

    builder, kwargs = FORMATS[path.suffix.lstrip(".")]
    try:
        return load_dataset(builder, data_files={"split": str(path)}, split="split", **kwargs)
    except Exception as err:  # pyarrow / pandas / json errors differ by format
        raise fail(
            f"could not read '{path}' as {path.suffix.lstrip('.')}: {type(err).__name__}: {err}",
            "check that the file is complete and in the format its extension says",
        ) from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the Hub host does not answer within `timeout` s."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(ds: Any, split: str):
    if not hub_reachable():
        raise fail(
            f"dataset '{ds.name}' has no local copy and the Hugging Face Hub is unreachable (offline)",
            f"set dataset.data_dir=<folder with {ds.train_split}.parquet and the other splits' files> "
            f"or {DATA_ROOT_ENV}=<root with one folder per dataset>; make the folder on a machine "
            f"with internet with: python -m peft_lab.prefetch dataset={ds.name} out=<root>",
        )
    from datasets import load_dataset

    return load_dataset(ds.hub_path, ds.hub_config, split=split)


# ----------------------------------------------------------------------------- validation


def validate_rows(ds: Any, data: Any, split: str, where: str):
    """Check columns and labels, drop empty texts; return the filtered dataset."""
    columns = list(data.column_names)
    if ds.text_column not in columns:
        raise fail(
            f"split '{split}' ({where}) has no text column '{ds.text_column}' (columns: {columns})",
            "set dataset.text_column to the column holding the text",
        )
    if ds.task == "classification":
        if ds.label_column not in columns:
            raise fail(
                f"split '{split}' ({where}) has no label column '{ds.label_column}' (columns: {columns})",
                "set dataset.label_column to the column holding integer labels",
            )
        labels = data[ds.label_column]
        bad = sorted({lab for lab in labels if not isinstance(lab, int) or not 0 <= lab < ds.num_labels}, key=str)
        if bad:
            raise fail(
                f"split '{split}' ({where}) has labels {bad[:5]} outside 0..{ds.num_labels - 1}"
                + (" (-1 marks unlabelled rows, as in GLUE's test split)" if -1 in bad else ""),
                "use a labelled split (dataset.test_split / select_split), map labels to 0..num_labels-1, "
                "or set dataset.num_labels",
            )
    texts = data[ds.text_column]
    keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    if not keep:
        raise fail(
            f"split '{split}' ({where}) is empty after dropping empty texts ({len(texts)} rows read)",
            "point the dataset at a file with non-empty text rows",
        )
    if ROW_ID in columns:
        data = data.remove_columns(ROW_ID)
    data = data.add_column(ROW_ID, list(range(len(texts))))  # the example id: the row in the file
    return data.select(keep) if len(keep) < len(texts) else data


@dataclass
class Splits:
    """The three splits of a run as validated ``datasets.Dataset`` s (column ``ROW_ID``: the row in its
    file), where each came from, and how many training rows were dropped as duplicates of a carved text."""

    train: Any
    select: Any
    test: Any
    sources: dict  # train / select / test -> "local:<folder>:<split>", "carved from train", ...
    dropped_duplicates: int = 0


def load_splits(ds: Any) -> Splits:
    """Load train, selection and test; carve the null ones out of the train split.

    Carving shuffles the train rows with ``subset_seed``: the first ``select_size`` rows are the
    selection split, the next ``max_test_samples`` the test split (when ``test_split`` is null), the
    rest remain for training; training rows whose text equals a carved row's text are dropped too, so
    no selection or test text is ever trained on. A named selection split is capped at ``select_size``.
    Raises ``UserError`` when a carve leaves no training rows.
    """
    train, where = load_validated(ds, ds.train_split)
    sources, parts = {"train": where}, {}
    for part, split in (("select", ds.select_split), ("test", ds.test_split)):
        if split is not None:  # named splits are read (and checked) before anything is carved
            parts[part], src = load_validated(ds, split)
            sources[part] = f"{src}:{split}"
    order = list(range(len(train)))
    random.Random(ds.subset_seed).shuffle(order)
    carved: dict[str, list[int]] = {}  # part -> row indices of the train split
    for part, split, size in (
        ("select", ds.select_split, ds.select_size),
        ("test", ds.test_split, ds.max_test_samples),
    ):
        if split is None:
            start = sum(map(len, carved.values()))
            carved[part] = sorted(order[start : start + size])
            sources[part] = f"carved from {ds.train_split} ({size} rows, subset_seed={ds.subset_seed})"
    rest = sorted(order[sum(map(len, carved.values())) :])
    texts = train[ds.text_column] if carved else []
    held = {texts[i] for idx in carved.values() for i in idx}
    kept = [i for i in rest if texts[i] not in held] if held else rest
    dropped, rest = len(rest) - len(kept), kept
    if not rest:
        raise fail(
            f"carving the selection / test rows out of '{ds.train_split}' ({len(train)} rows) leaves no training rows",
            "lower dataset.select_size / dataset.max_test_samples, or name existing splits (dataset.select_split=...)",
        )
    parts.update({part: train.select(idx) for part, idx in carved.items()})
    if dropped:
        log.info(f"dropped {dropped} training rows whose text is also in the selection / test rows carved from train")
    return Splits(train.select(rest), parts["select"], parts["test"], sources, dropped)


def subset(items: list, n: Optional[int], seed: int) -> list:
    """A seeded shuffled subset of n items (all of them, in order, when n is None)."""
    if n is None or n >= len(items):
        return items
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


# ----------------------------------------------------------------------------- tokenising


def load_validated(ds: Any, split: str):
    """Load one split and run every data check; returns (dataset, where it came from)."""
    data, where = load_raw(ds, split)
    return validate_rows(ds, data, split, where), where


def tokenize(ds: Any, tokenizer: Any, data: Any, max_samples: Optional[int]) -> list[dict]:
    """Classification: one example per row (``id``: its row in the file). LM: blocks of block_size tokens
    (``id``: the block's index in the split; the subset is taken over blocks). Texts longer than
    ``max_length`` lose their ``dataset.truncation_side`` end (the tokenizer's own setting)."""
    texts = list(data[ds.text_column])
    if ds.task == "classification":
        rows = list(zip(texts, data[ds.label_column], data[ROW_ID]))
        rows = subset(rows, max_samples, ds.subset_seed)
        side = tokenizer.truncation_side
        tokenizer.truncation_side = plain(ds.truncation_side)
        try:
            enc = tokenizer([t for t, _, _ in rows], truncation=True, max_length=ds.max_length)
        finally:
            tokenizer.truncation_side = side
        return [{"input_ids": ids, "labels": lab, "id": rid} for ids, (_, lab, rid) in zip(enc["input_ids"], rows)]
    examples = lm_blocks(tokenizer, texts, ds.block_size)
    if not examples:
        raise fail(
            f"the {ds.name} text has fewer than block_size={ds.block_size} tokens",
            "lower dataset.block_size or give more text",
        )
    return subset(examples, max_samples, ds.subset_seed)


def lm_blocks(tokenizer: Any, texts: list[str], block_size: int) -> list[dict]:
    """Concatenate the token streams of all rows and cut non-overlapping blocks (remainder dropped)."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
    n = len(stream) // block_size
    return [{"input_ids": stream[i * block_size : (i + 1) * block_size], "id": i} for i in range(n)]


# ----------------------------------------------------------------------------- synthetic

_POS = "good great excellent wonderful moving superb delightful fun charming brilliant".split()
_NEG = "bad awful boring dull terrible weak poor tedious clumsy bland".split()
_FILL = "the film movie story was plot acting and a really quite very this it is with of".split()
_LM = [
    "the cat sat on the mat .",
    "a dog ran in the park .",
    "the sun rose over the hills .",
    "she read a book by the window .",
    "rain fell on the quiet town .",
    "he wrote a letter to his friend .",
]


def synthetic(ds: Any, split: str):
    """Learnable toy data in the dataset's own column layout (made in-process, no files)."""
    from datasets import Dataset

    train = split == ds.train_split
    n = ds.synthetic_train_size if train else ds.synthetic_eval_size
    rng = random.Random(f"{ds.name}/{split}/{ds.subset_seed}")
    if ds.task == "classification":
        long = ds.max_length > 128
        rows = {ds.text_column: [], ds.label_column: []}
        for _ in range(n):
            label = rng.randrange(ds.num_labels)
            words = rng.choices(_FILL, k=rng.randint(20, 60) if long else rng.randint(3, 8))
            for _ in range(rng.randint(1, 2)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(_POS if label % 2 else _NEG))
            rows[ds.text_column].append(" ".join(words))
            rows[ds.label_column].append(label)
        return Dataset.from_dict(rows)
    lines = [" ".join(rng.choice(_LM) for _ in range(rng.randint(2, 5))) + "\n" for _ in range(n)]
    return Dataset.from_dict({ds.text_column: lines})
