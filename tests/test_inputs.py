"""Inputs that used to fail late or be silently ignored: refused at start-up, or warned and recorded."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import build_model, sentiment_rows, write_parquet

from peft_lab import data, models
from peft_lab.errors import UserError


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(cache_dir))
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- input length vs positions


def _loaded(compose, *overrides):
    cfg = compose("logger=none", *overrides)
    task = models.resolve_task(cfg.model, str(getattr(cfg.dataset.task, "value", cfg.dataset.task)))
    loaded = models.load(cfg.model, task, cfg.dataset.num_labels, {}, torch.float32)
    return cfg, task, loaded


@pytest.mark.parametrize(
    "dataset, key",
    [("dataset=imdb", "max_length"), ("dataset=wikitext2", "block_size")],  # classification / masked LM
)
def test_input_longer_than_the_models_positions_is_refused(dataset, key, compose):
    cfg, task, loaded = _loaded(compose, "model=tiny-distilbert", dataset, f"dataset.{key}=1024")
    with pytest.raises(UserError) as err:
        models.check_input_length(cfg.dataset, task, loaded.model.config)
    msg = str(err.value)
    assert f"dataset.{key}=1024" in msg and "512" in msg and f"Fix: set dataset.{key}=512 or less" in msg


def test_input_at_the_limit_passes_and_the_limit_is_the_models_own(compose):
    cfg, task, loaded = _loaded(compose, "model=tiny-distilbert", "dataset=imdb", "dataset.max_length=512")
    models.check_input_length(cfg.dataset, task, loaded.model.config)  # no error
    model = loaded.model.eval()
    with torch.no_grad():
        model(input_ids=torch.full((1, 512), 7))  # the limit runs
        with pytest.raises((RuntimeError, IndexError)):
            model(input_ids=torch.full((1, 513), 7))  # one more token is the tensor-size crash the check prevents


def test_rope_model_is_refused_by_the_same_rule(compose):
    """One rule for every architecture: the tiny Llama (RoPE) has max_position_embeddings=512."""
    cfg, task, loaded = _loaded(compose, "model=tiny", "dataset=wikitext2", "dataset.block_size=1024")
    assert task == "causal_lm"
    with pytest.raises(UserError, match=r"dataset\.block_size=1024 .*512"):
        models.check_input_length(cfg.dataset, task, loaded.model.config)
    cfg.dataset.block_size = 512
    models.check_input_length(cfg.dataset, task, loaded.model.config)


def test_position_limit_attributes_and_roberta_offset():
    ds = SimpleNamespace(max_length=100, block_size=100)
    assert models.max_input_length(SimpleNamespace(model_type="gpt2", n_positions=64)) == 64
    with pytest.raises(UserError, match="dataset.max_length=100"):
        models.check_input_length(ds, "classification", SimpleNamespace(n_positions=64))
    # no known limit: nothing is checked
    assert models.max_input_length(SimpleNamespace(model_type="t5")) is None
    models.check_input_length(ds, "causal_lm", SimpleNamespace(model_type="t5"))


def test_roberta_limit_counts_its_position_offset():
    """RoBERTa's positions start after pad_token_id, so 514 embeddings take 512 tokens: checked on a real model."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=514, pad_token_id=1,
    )  # fmt: skip
    limit = models.max_input_length(config)
    assert limit == 512
    model = RobertaModel(config).eval()
    with torch.no_grad():
        model(input_ids=torch.full((1, limit), 7))
        with pytest.raises((RuntimeError, IndexError)):
            model(input_ids=torch.full((1, limit + 1), 7))


# ----------------------------------------------------------------------------- explicit settings not ignored


def test_data_dir_with_synthetic_source_is_refused(compose, tmp_path):
    for split in ("train", "validation"):
        write_parquet(tmp_path / "d", split, sentiment_rows(6))
    cfg = compose("experiment=smoke", "dataset=sst2", f"dataset.data_dir={tmp_path / 'd'}")
    assert cfg.dataset.source == "synthetic"  # set by the preset
    with pytest.raises(UserError) as err:
        data.check_config(cfg.dataset)
    msg = str(err.value)
    assert str(tmp_path / "d") in msg and "source=synthetic" in msg and "experiment=smoke" in msg
    assert "drop dataset.data_dir" in msg and "dataset.source=local" in msg
    # the fix named in the message works: the folder is used
    cfg = compose("experiment=smoke", "dataset=sst2", f"dataset.data_dir={tmp_path / 'd'}", "dataset.source=local")
    data.check_config(cfg.dataset)
    assert data.load_validated(cfg.dataset, "train")[1] == f"local:{tmp_path / 'd'}"
    # synthetic without a folder stays fine
    data.check_config(compose("experiment=smoke", "dataset=sst2").dataset)


def _sparselora(compose, mlp, caplog):
    extra = [] if mlp is None else [f"method.mlp_sparsity={mlp}"]
    cfg = compose("experiment=smoke", "method=sparselora", "dataset=sst2", "logger=none", *extra)
    loaded, method, _ = build_model(cfg)
    with caplog.at_level(logging.WARNING, logger="peft_lab.methods.sparselora"):
        model = method.adapt(loaded.model)
    warned = [r for r in caplog.records if r.name == "peft_lab.methods.sparselora" and r.levelno == logging.WARNING]
    return method.metrics(model), warned


def test_sparselora_without_a_sparse_layer_warns_and_records_it(compose, caplog):
    # the default deep band (53 %-95 % of the depth) holds no layer of the 2-layer tiny model
    report, warned = _sparselora(compose, None, caplog)
    assert len(warned) == 1
    msg = warned[0].getMessage()
    assert "method.mlp_sparsity={'53%-95%': 0.75}" in msg and "none of the 2 layers" in msg
    assert "Fix:" in msg
    assert report["sparselora_sparse_layers"] == 0 and report["sparselora_layers"] == 2
    assert report["sparselora_warnings"] == [msg]
    json.dumps(report)  # goes into metrics.json as it is


def test_sparselora_with_a_sparse_layer_does_not_warn(compose, caplog):
    report, warned = _sparselora(compose, "1:0.5", caplog)
    assert warned == [] and report["sparselora_warnings"] == []
    assert report["sparselora_sparse_layers"] == 1 and report["sparselora_layers"] == 2
    assert report["sparselora_mlp_layers"] == {"1": 0.5} and report["sparselora_attn_layers"] == {}


def test_bench_reports_the_sparselora_warning(cache_dir, tmp_path, monkeypatch, capsys):
    from peft_lab import bench

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "bench.json"
    variant = "sparselora:method.mlp_sparsity=''"
    argv = ["--model", "tiny", "--methods", variant, "--steps", "1", "--warmup", "0", "--repeats", "1",
            "--threads", "1", "--batch", "2", "--seq", "16", "--no-bare", "--no-memory", "--no-startup",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith(f"| {variant} |"))
    assert "WARNING: 0 of 2 layers sparse" in row
    res = json.loads(out.read_text())["results"][variant]
    assert res["method_metrics"]["sparselora_sparse_layers"] == 0
    assert len(res["warnings"]) == 1 and "method.mlp_sparsity=''" in res["warnings"][0]
