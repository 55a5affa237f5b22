"""Shared fixtures: the real config tree, the CLI as a user runs it, and data files made here.

No test downloads anything: HF_HUB_OFFLINE is set for every subprocess, models are
built from a config and data is written by the tests (or read from
../shared/data by path in the `realdata` tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_DATA = Path(os.environ.get("PEFT_LAB_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One model cache for the session, so the tiny models are built once."""
    return tmp_path_factory.mktemp("peft_lab_cache")


@pytest.fixture(scope="session")
def cli_env(cache_dir) -> dict:
    env = dict(os.environ)
    env.update(
        PEFT_LAB_CACHE=str(cache_dir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        PEFT_LAB_THREADS="1",
    )
    env.pop("PEFT_LAB_DATA_ROOT", None)
    env.pop("WANDB_API_KEY", None)
    return env


def train_cli(args: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in ``cwd``, as a user runs it; output captured."""
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_cli(cli_env, tmp_path):
    """Run `python train.py ...` in the test's tmp dir; returns the CompletedProcess."""

    def run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
        return train_cli(list(args), tmp_path, dict(cli_env, **(env or {})), timeout)

    return run


def read_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture
def compose():
    """Compose the real config tree in-process (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import peft_lab.config  # noqa: F401

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))

    return _compose


def write_parquet(folder: Path, split: str, rows: dict) -> Path:
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def sentiment_rows(n: int, text_col: str = "sentence", label_col: str = "label") -> dict:
    pos = ["a great and moving film", "wonderful acting , superb story", "fun and charming"]
    neg = ["a dull , boring mess", "awful plot and weak acting", "tedious and bland"]
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        texts.append((pos if label else neg)[i % 3] + f" {i}")
        labels.append(label)
    return {text_col: texts, label_col: labels}


@pytest.fixture
def sst2_dir(tmp_path) -> Path:
    """A small SST-2-layout folder: train.parquet and validation.parquet (sentence, label, idx)."""
    folder = tmp_path / "sst2"
    for split, n in (("train", 48), ("validation", 16)):
        rows = sentiment_rows(n)
        rows["idx"] = list(range(n))
        write_parquet(folder, split, rows)
    return folder


TINY = [
    "model=tiny",
    "logger=none",
    "train.max_steps=3",
    "train.batch_size=8",
    "train.log_every=1",
    "dataset.max_length=32",
    "dataset.block_size=32",
    "dataset.select_size=4",  # the selection split: 4 rows carved from train (sst2, imdb), or a cap (wikitext2)
]


def build_model(cfg, device: str = "cpu"):
    """Base model + method exactly as a run builds them: (peft model, method, tokenizer, task, base outputs fn)."""
    import torch

    from peft_lab import models
    from peft_lab.methods import get_method_class

    task = models.resolve_task(cfg.model, str(getattr(cfg.dataset.task, "value", cfg.dataset.task)))
    method = get_method_class(cfg.method.name)(cfg.method, cfg.model, task)
    method.validate()
    loaded = models.load(cfg.model, task, cfg.dataset.num_labels, method.load_kwargs(device), torch.float32)
    loaded.model = method.prepare_base(loaded.model)
    return loaded, method, task


def train_loop(model, method, cfg, tok, task, examples, run_dir, on_log=None):
    """peft_lab.training.train on CPU with no-op callbacks unless given (as a run calls it)."""
    import contextlib

    from peft_lab import training

    return training.train(
        model,
        method,
        examples,
        cfg=cfg,
        task=task,
        tokenizer=tok,
        device="cpu",
        autocast=contextlib.nullcontext,
        run_dir=run_dir,
        on_log=on_log or (lambda *a: None),
        on_eval=lambda s: None,
    )


def check_merge(model, method, examples, task, tok, trained_out, probe, expect_match: bool = True) -> dict:
    """Merge a trained model as a run's inference-cost step does (``peft_lab.inference.measure``) and check what it
    reports against an independent forward of the merged model: PEFT's adapter layers gone, outputs equal the
    trained (unmerged) ones on ``probe`` (within 1e-5) exactly when ``expect_match``, merged footprint below the
    unmerged one. A model without an adapter (full, head) must report ``not_applicable``. Returns the record."""
    import contextlib

    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peft_lab import inference

    res = inference.measure(model, examples[:8], task, tok, 4, "cpu", contextlib.nullcontext, method, 1, "float32")
    assert res["examples"] == len(examples[:8]) and res["latency_ms"] > 0
    if not hasattr(model, "merge_and_unload"):
        assert res["merge"] == "not_applicable" and res["merged_latency_ms"] is None
        return res
    assert res["merge"] == "merged", res
    merged = model.get_base_model()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules()), "adapter layers left after the merge"
    model.eval()
    if method is not None:
        method.before_forward(probe, 0, 1, training=False)
    with torch.no_grad():
        merged_out = merged(**{k: v for k, v in probe.items() if k != "labels"}).logits
    assert torch.allclose(merged_out, trained_out, atol=1e-5) is expect_match, (merged_out - trained_out).abs().max()
    assert res["outputs_match"] is expect_match, res
    assert res["merged_latency_ms"] > 0 and res["merged_footprint_bytes"] < res["footprint_bytes"]
    return res
