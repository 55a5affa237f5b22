"""The loop's pieces on tiny models built from a config: batches, metrics, parameter counts, resume."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import build_model, train_loop

from peft_lab import data, models, training
from peft_lab.metrics import count_parameters


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(cache_dir))
    torch.set_num_threads(1)


def _build(cfg):
    loaded, method, task = build_model(cfg)
    return method.adapt(loaded.model), method, loaded.tokenizer, task


def test_collate_masks_padding_in_lm_labels():
    tok = models.byte_tokenizer()
    batch = training.collate([{"input_ids": [10, 11, 12]}, {"input_ids": [13]}], "causal_lm", tok)
    assert batch["input_ids"][1].tolist() == [13, tok.pad_token_id, tok.pad_token_id]
    assert batch["labels"][1].tolist() == [13, -100, -100]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_classification_metrics_known_values():
    m = training.classification_metrics([1, 1, 0, 0], [1, 0, 0, 0])
    assert m["accuracy"] == 0.75
    # class 0: tp 2 fp 0 fn 1 -> 0.8; class 1: tp 1 fp 1 fn 0 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_perplexity_is_exp_of_mean_token_nll(compose):
    cfg = compose("experiment=smoke", "dataset=wikitext2", "logger=none")
    model, _, tok, task = _build(cfg)
    raw, _ = data.load_validated(cfg.dataset, cfg.dataset.eval_split)
    blocks = data.tokenize(cfg.dataset, tok, raw, 6)
    result = training.evaluate(model, blocks, task, tok, 4, "cpu", contextlib.nullcontext)
    ids = torch.tensor([b["input_ids"] for b in blocks])
    with torch.no_grad():
        hf_loss = model.eval()(input_ids=ids, labels=ids).loss.item()  # mean over all shifted tokens
    assert result["eval_tokens"] == 6 * (cfg.dataset.block_size - 1)
    assert result["perplexity"] == pytest.approx(math.exp(hf_loss), rel=1e-5)


def test_encoder_on_lm_dataset_reports_masked_lm_perplexity(compose):
    cfg = compose("experiment=smoke", "dataset=wikitext2", "model=tiny-distilbert", "logger=none")
    model, _, tok, task = _build(cfg)
    assert task == "masked_lm"
    raw, _ = data.load_validated(cfg.dataset, cfg.dataset.eval_split)
    result = training.evaluate(
        model, data.tokenize(cfg.dataset, tok, raw, 4), task, tok, 4, "cpu", contextlib.nullcontext
    )
    assert "mlm_perplexity" in result and "perplexity" not in result and result["mlm_perplexity"] > 1


def test_parameter_counts_walk_adapter_layers(compose):
    cfg = compose("experiment=smoke", "dataset=sst2", "model=tiny-distilbert", "logger=none")
    model, _, _, _ = _build(cfg)
    counts = count_parameters(model)
    r, dim, layers = 8, 64, 2
    assert counts["adapter_params"] == layers * 2 * (dim * r + r * dim)  # q_lin and v_lin per layer
    assert counts["head_params"] == (dim * dim + dim) + (dim * 2 + 2)  # pre_classifier + classifier
    assert counts["trainable_params"] == counts["adapter_params"] + counts["head_params"]
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    assert counts["total_params"] == base + counts["adapter_params"]


@pytest.mark.parametrize(
    "task_args", [["dataset=sst2"], ["dataset=wikitext2", "model=tiny-distilbert"]], ids=["classification", "masked_lm"]
)
def test_resume_continues_exactly(task_args, compose, tmp_path):
    """6 steps straight == killed after step 4 (checkpoint at 3), restarted with a fresh model, resumed."""
    common = [
        "experiment=smoke",
        *task_args,
        "logger=none",
        "train.max_steps=6",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "method.lora_dropout=0.1",
    ]

    class Killed(Exception):
        pass

    def on_log(entry, step, kill_at=None):
        if step == kill_at:
            raise Killed

    def run(run_dir, kill_at=None):
        cfg = compose(*common)
        torch.manual_seed(cfg.seed)
        model, method, tok, task = _build(cfg)
        raw, _ = data.load_validated(cfg.dataset, "train")
        ex = data.tokenize(cfg.dataset, tok, raw, None)
        torch.manual_seed(cfg.seed)
        result = train_loop(model, method, cfg, tok, task, ex, run_dir, lambda e, s: on_log(e, s, kill_at))
        return model, result

    straight, r1 = run(tmp_path / "a")
    with pytest.raises(Killed):
        run(tmp_path / "b", kill_at=4)
    resumed, r2 = run(tmp_path / "b")
    assert r2.resumed_from == 3 and r2.steps == 6 and r2.history[0]["step"] == 4
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert r1.final_loss == r2.final_loss
