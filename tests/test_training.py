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
    raw, _ = data.load_validated(cfg.dataset, cfg.dataset.test_split)
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
    raw, _ = data.load_validated(cfg.dataset, cfg.dataset.test_split)
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


# ----------------------------------------------------------------------------- gradient accumulation


def _examples(task: str, lengths: list[int], seed: int = 5) -> list[dict]:
    """Random token sequences of the given lengths (never the pad/eos ids), alternating labels for classification."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ex = {"input_ids": torch.randint(3, 250, (n,), generator=g).tolist()}
        if task == "classification":
            ex["labels"] = i % 2
        out.append(ex)
    return out


def _trained(compose, tmp_path, overrides, examples):
    """(trainable weights after training, TrainResult, loss of the initial model on all examples as one batch,
    the method's extra loss on the initial model or None)."""
    cfg = compose("model=tiny", "logger=none", "train.checkpoint_every=0", "train.warmup_ratio=0", *overrides)
    torch.manual_seed(cfg.seed)
    model, method, tok, task = _build(cfg)
    whole = training.collate(examples, task, tok)
    with torch.no_grad():
        reference = model.eval()(**whole).loss.item()  # the mean over every example / predicted token
        extra = method.extra_loss(model)
    model.train()
    result = train_loop(model, method, cfg, tok, task, examples, tmp_path)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return weights, result, reference, None if extra is None else float(extra)


@pytest.mark.parametrize(
    "dataset, lengths, split",
    [
        ("sst2", [5, 9, 17, 6, 12, 20, 7, 15, 11, 8, 19, 4], ("train.batch_size=8", "train.grad_accum=2")),
        ("wikitext2", [30, 4, 9, 22, 6, 13], ("train.batch_size=4", "train.grad_accum=2")),
    ],
    ids=["classification_8+4_examples", "causal_lm_unequal_tokens"],
)
def test_grad_accum_over_a_short_last_micro_batch_equals_one_big_batch(compose, tmp_path, dataset, lengths, split):
    """One step over micro-batches of unequal size (8 + 4 examples; 4 + 2 sequences of unequal length) gives the
    loss and the weights of one batch of them all: each micro-batch weighted by its examples / predicted tokens."""
    task = "classification" if dataset == "sst2" else "causal_lm"
    examples = _examples(task, lengths)
    common = [f"dataset={dataset}", "train.max_steps=1", "method.lora_dropout=0", "train.max_grad_norm=0"]
    if task == "causal_lm":  # the micro-batches really predict different numbers of tokens
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0 * 100003)).tolist()
        first = sum(lengths[i] - 1 for i in order[:4])
        rest = sum(lengths[i] - 1 for i in order[4:])
        assert first != 2 * rest, "the test needs micro-batches with unequal token counts"
    big = len(examples)
    w_acc, r_acc, reference, _ = _trained(compose, tmp_path / "acc", [*common, *split], examples)
    w_one, r_one, reference2, _ = _trained(
        compose, tmp_path / "one", [*common, f"train.batch_size={big}", "train.grad_accum=1"], examples
    )
    assert reference == reference2  # the same initial model
    assert r_one.final_loss == pytest.approx(reference, rel=1e-6, abs=1e-7)
    assert r_acc.final_loss == pytest.approx(reference, rel=1e-6, abs=1e-7)
    assert r_acc.samples == r_one.samples == big
    assert w_acc.keys() == w_one.keys()
    diff = max((w_acc[n] - w_one[n]).abs().max().item() for n in w_acc)
    assert diff < 1e-6, f"weights differ by {diff:.3g}"
    cfg = compose("model=tiny", "logger=none", f"dataset={dataset}")
    torch.manual_seed(cfg.seed)
    initial = {n: p for n, p in _build(cfg)[0].named_parameters() if p.requires_grad}
    assert max((w_one[n] - initial[n]).abs().max().item() for n in w_one) > 1e-5, "the step did not train"


def test_extra_loss_counts_once_per_step_whatever_the_accumulation(compose, tmp_path):
    """Sparse's L1 penalty is added once per optimizer step: 8 + 4 micro-batches == one batch of 12."""
    examples = _examples("classification", [5, 9, 17, 6, 12, 20, 7, 15, 11, 8, 19, 4])
    # no pruning (sparsity 0, the penalty alone): after one Adam step many |w| tie, and ties make masks arbitrary
    common = ["method=sparse", "method.criterion=l1", "method.l1_lambda=0.01", "method.lora_dropout=0",
              "method.sparsity=0", "dataset=sst2", "train.max_steps=1", "train.max_grad_norm=0"]  # fmt: skip
    acc = [*common, "train.batch_size=8", "train.grad_accum=2"]
    w_acc, r_acc, reference, penalty = _trained(compose, tmp_path / "acc", acc, examples)
    w_one, r_one, _, _ = _trained(
        compose, tmp_path / "one", [*common, "train.batch_size=12", "train.grad_accum=1"], examples
    )
    assert penalty is not None and penalty > 1e-3 * reference  # large enough that counting it twice would show
    assert r_acc.final_loss == pytest.approx(reference + penalty, rel=1e-6)
    assert r_one.final_loss == pytest.approx(reference + penalty, rel=1e-6)
    assert max((w_acc[n] - w_one[n]).abs().max().item() for n in w_acc) < 1e-6


# ----------------------------------------------------------------------------- divergence


class Killed(Exception):
    """Stops a run after a step, as a kill would."""


def _smoke_run(
    compose,
    run_dir,
    overrides,
    *,
    autocast=contextlib.nullcontext,
    grad_scaler=False,
    wrap=None,
    kill_at=0,
    on_progress=None,
):
    """experiment=smoke on sst2 (96 synthetic examples), optionally stopped (Killed) after step ``kill_at``:
    (model, TrainResult or the exception raised, logged entries)."""

    def on_log(entry, step):
        logged.append(entry)
        if step == kill_at:
            raise Killed

    cfg = compose("experiment=smoke", "dataset=sst2", "logger=none", "train.log_every=1", *overrides)
    torch.manual_seed(cfg.seed)
    model, method, tok, task = _build(cfg)
    raw, _ = data.load_validated(cfg.dataset, "train")
    ex = data.tokenize(cfg.dataset, tok, raw, None)
    logged = []
    torch.manual_seed(cfg.seed)
    try:
        result = training.train(
            model, wrap(method) if wrap else method, ex, cfg=cfg, task=task, tokenizer=tok, device="cpu",
            autocast=autocast, run_dir=run_dir, on_log=on_log, on_eval=lambda s: None,
            grad_scaler=grad_scaler, on_progress=on_progress,
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - returned for the test to inspect
        result = err
    return model, result, logged


def _fp16():
    return torch.autocast("cpu", dtype=torch.float16)


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fp16_divergence_raises_at_the_step_and_keeps_the_last_good_checkpoint(compose, tmp_path):
    """fp16 with lr 1e12 and no clipping: the loss turns nan at an optimizer step -> DivergedError naming it;
    no checkpoint is written for it (the one of the step before stays, finite). The losses are read at
    checkpoint steps (here every step), so the error comes before that step's checkpoint."""
    from peft_lab.errors import DivergedError

    overrides = ["method.lr=1e12", "train.max_grad_norm=0", "train.max_steps=6", "train.checkpoint_every=1"]
    model, err, logged = _smoke_run(compose, tmp_path, overrides, autocast=_fp16)
    assert isinstance(err, DivergedError), err
    assert err.step == len(logged) + 1 and err.step >= 2 and [e["step"] for e in logged] == list(range(1, err.step))
    assert all(math.isfinite(e["loss"]) for e in logged) and not math.isfinite(err.loss)
    assert err.total_steps == 6 and str(err).startswith(f"training diverged: loss {err.loss} at step {err.step} of 6")
    state = training.json.loads((tmp_path / training.CKPT_DIR / "state.json").read_text())
    assert state["step"] == err.step - 1
    saved = torch.load(tmp_path / training.CKPT_DIR / "trainable.pt", weights_only=True)
    assert saved.keys() == _trainable(model).keys() and all(torch.isfinite(v).all() for v in saved.values())


def test_a_nan_loss_from_a_method_hook_names_its_step(compose, tmp_path):
    """A method whose penalty turns nan before step 3: DivergedError(step=3), picklable, message as documented."""
    import pickle

    from peft_lab.errors import DivergedError

    class NanAtStep3:
        def __init__(self, method):
            self.method, self.done = method, 0

        def __getattr__(self, name):
            return getattr(self.method, name)

        def after_optimizer_step(self, model, step, total):
            self.done = step
            self.method.after_optimizer_step(model, step, total)

        def extra_loss(self, model):
            return torch.tensor(float("nan")) if self.done == 2 else self.method.extra_loss(model)

    _, err, logged = _smoke_run(compose, tmp_path, ["train.max_steps=6", "train.checkpoint_every=0"], wrap=NanAtStep3)
    assert isinstance(err, DivergedError), err
    assert (err.step, err.total_steps, len(logged)) == (3, 6, 2) and math.isnan(err.loss)
    assert str(err).startswith("training diverged: loss nan at step 3 of 6")
    assert not (tmp_path / training.CKPT_DIR).exists()  # not even the end-of-training checkpoint
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, DivergedError) and again.step == 3 and str(again) == str(err)


# ----------------------------------------------------------------------------- fp16 gradient scaler


def test_fp16_grad_scaler_trains(compose, tmp_path):
    """fp16 autocast on CPU with the default GradScaler: every step finite, weights move, scaler state saved."""
    cfg = compose("experiment=smoke", "dataset=sst2", "logger=none")
    torch.manual_seed(cfg.seed)
    initial = _trainable(_build(cfg)[0])
    progress = []
    model, result, logged = _smoke_run(
        compose, tmp_path, ["train.max_steps=3"], autocast=_fp16, grad_scaler=True,
        on_progress=lambda *a: progress.append(a),
    )  # fmt: skip
    assert progress == [(0, 3, 0), (1, 3, 0), (2, 3, 0), (3, 3, 0)]  # (steps done, total, resumed from)
    assert isinstance(result, training.TrainResult), result
    assert len(logged) == 3 and all(math.isfinite(e["loss"]) for e in logged)
    trained = _trainable(model)
    assert all(not torch.equal(initial[n], trained[n]) for n in trained if "lora_B" in n or "score" in n)
    state = torch.load(tmp_path / training.CKPT_DIR / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] == 2.0**16 and state["scaler"]["_growth_tracker"] == 3  # no step skipped


def test_fp16_grad_scaler_resume_continues_exactly(compose, tmp_path, monkeypatch):
    """With a scaler whose scale moves (init 2**20, x64 after each good step, /2 after each overflow), 6 steps
    straight == killed after step 4 (checkpoint at 3) and resumed: the scale is restored from the checkpoint."""
    real = torch.amp.GradScaler
    scales: list[list[float]] = []

    class Recording(real):
        def __init__(self, device_type):
            super().__init__(device_type, init_scale=2.0**20, growth_factor=64.0, growth_interval=1)
            scales.append([])

        def update(self, new_scale=None):
            super().update(new_scale)
            scales[-1].append(self.get_scale())

    monkeypatch.setattr(torch.amp, "GradScaler", Recording)
    overrides = ["train.max_steps=6", "train.checkpoint_every=3", "method.lora_dropout=0.1"]
    straight, r1, log1 = _smoke_run(compose, tmp_path / "a", overrides, autocast=_fp16, grad_scaler=True)
    assert isinstance(r1, training.TrainResult), r1
    s1 = scales[-1]
    assert len(s1) == 6 and any(b < a for a, b in zip(s1, s1[1:])) and any(b > a for a, b in zip(s1, s1[1:])), (
        f"the scale should both back off and grow in this test: {s1}"
    )
    assert all(math.isfinite(e["loss"]) for e in log1)
    _, killed, _ = _smoke_run(compose, tmp_path / "b", overrides, autocast=_fp16, grad_scaler=True, kill_at=4)
    assert isinstance(killed, Killed), killed
    resumed, r2, _ = _smoke_run(compose, tmp_path / "b", overrides, autocast=_fp16, grad_scaler=True)
    assert isinstance(r2, training.TrainResult), r2
    assert r2.resumed_from == 3 and r2.steps == 6
    assert scales[-1] == s1[3:], "the resumed run's scale did not continue from the checkpoint's"
    a, b = _trainable(straight), _trainable(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert r1.final_loss == r2.final_loss


@pytest.mark.slow
def test_compiled_training_matches_eager(compose, tmp_path):
    """train.compile=true (torch.compile of the training forward; about a minute to compile on this CPU)
    trains the same steps as eager mode, within float tolerance, and metrics.json says it was compiled."""
    from peft_lab import run

    base = ["experiment=smoke", "logger=none", "method.lora_dropout=0", "train.log_every=1"]
    run.execute(compose(*base), run.RunContext(tmp_path / "eager"))
    run.execute(compose(*base, "train.compile=true"), run.RunContext(tmp_path / "compiled"))
    eager, compiled = (training.json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("eager", "compiled"))
    assert compiled["compiled"] is True and eager["compiled"] is False
    for a, b in zip(eager["train_history"], compiled["train_history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert compiled["main_metric_value"] == eager["main_metric_value"]
