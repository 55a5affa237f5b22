"""Every registered method through one contract, then each method's own faithfulness checks."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, check_merge, train_loop

from peft_lab import data, models, training
from peft_lab.methods import generic_names, names
from peft_lab.metrics import count_parameters

TASKS = {"classification": "sst2", "causal_lm": "wikitext2"}
BASELINES = {"full", "head"}  # methods with no adapter (peft_lab/methods/full.py, head.py)
# methods with a module of their own; the generic PEFT methods (one YAML each) have their contract in
# tests/test_peft_methods.py
MODULE_METHODS = [n for n in names() if n not in generic_names()]


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(cache_dir))
    torch.set_num_threads(1)


def _cfg(compose, method, dataset, *extra):
    return compose("experiment=smoke", f"method={method}", f"dataset={dataset}", "logger=none", *extra)


def _examples(cfg, tok, split, n):
    raw, _ = data.load_validated(cfg.dataset, split)
    return data.tokenize(cfg.dataset, tok, raw, n)


def _outputs(model, method, batch):
    model.eval()
    b = {k: v for k, v in batch.items() if k != "labels"}
    if method is not None:
        method.before_forward(batch, 0, 1, training=False)
    with torch.no_grad():
        return model(**b).logits


def _train(model, method, cfg, tok, task, examples, tmp_path, steps):
    cfg.train.max_steps = steps
    cfg.train.checkpoint_every = 0
    return train_loop(model, method, cfg, tok, task, examples, tmp_path)


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("method_name", MODULE_METHODS)
def test_method_contract(method_name, task, compose, tmp_path):
    extra = ["method.lr=1e-2", "train.log_every=1", "train.warmup_ratio=0"]
    if method_name == "sparselora":
        extra += [
            "method.mlp_sparsity=0-1:0.5",
            "method.attn_sparsity=0-1:0.5",
            "method.warmup_frac=0",
            "method.dense_output_tokens=false",
        ]
    cfg = _cfg(compose, method_name, TASKS[task], *extra)
    loaded, method, task_ = build_model(cfg)
    tok = loaded.tokenizer
    examples = _examples(cfg, tok, cfg.dataset.train_split, 64)
    probe = training.collate(examples[:4], task_, tok)
    base_out = _outputs(loaded.model, None, probe)

    model = method.adapt(loaded.model)

    # 1. only adapter parameters (plus the task head for classification) train
    counts = count_parameters(model)
    if method_name in BASELINES:  # no adapter: full trains everything, head only the task head
        _check_baseline_trainable(method_name, method, model, counts, cfg)
    else:
        assert counts["adapter_params"] > 0
        expected = counts["adapter_params"] + (counts["head_params"] if task == "classification" else 0)
        assert counts["trainable_params"] == expected
        if task == "classification":
            assert counts["head_params"] > 0
        else:
            assert counts["head_params"] == 0

    # 2. zero-initialised adapters reproduce the base model at init
    assert torch.allclose(_outputs(model, method, probe), base_out, atol=1e-5)

    if not method.trains():  # nothing to train (head on an LM task): the base as it is, saved as nothing
        assert method.saved_weights == "none"
        method.save_adapter(model, tmp_path / "adapter")
        assert not any((tmp_path / "adapter").iterdir())
        fresh, _, _ = build_model(cfg)
        reloaded = method.load_adapter(fresh.model, tmp_path / "adapter")
        assert torch.allclose(_outputs(reloaded, None, probe), base_out, atol=1e-5)
        return

    # 3. loss falls on a learnable tiny task
    model.train()
    result = _train(model, method, cfg, tok, task_, examples, tmp_path, steps=16)
    first, last = result.history[0]["loss"], sum(h["loss"] for h in result.history[-3:]) / 3
    assert last < first, (first, last)

    # 4. save + load reproduces the outputs
    trained_out = _outputs(model, method, probe)
    assert not torch.allclose(trained_out, base_out, atol=1e-5), "training changed nothing"
    method.save_adapter(model, tmp_path / "adapter")
    fresh, _, _ = build_model(cfg)
    reloaded = method.load_adapter(fresh.model, tmp_path / "adapter")
    assert torch.allclose(_outputs(reloaded, None, probe), trained_out, atol=1e-5)

    # 5. merging (the inference-cost step): same outputs, except 4-bit weights, which the merge re-quantises
    check_merge(model, method, examples, task_, tok, trained_out, probe, expect_match=method_name != "qlora")


def _head_param_names(model, cfg):
    wanted = list(cfg.model.cls_head_modules)
    return {
        f"{m}.{p}" if m else p
        for m, module in model.named_modules()
        if m and any(m == w or m.endswith("." + w) for w in wanted)
        for p, _ in module.named_parameters()
    }


def _check_baseline_trainable(method_name, method, model, counts, cfg):
    """full: every parameter, counted once; head: exactly the head for classification, nothing for LM."""
    assert counts["adapter_params"] == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method_name == "full":
        assert all(p.requires_grad for p in model.parameters())
        assert counts["trainable_params"] == counts["total_params"] == sum(p.numel() for p in model.parameters())
        assert method.saved_weights == "full_model" and method.trains()
    elif method.task == "classification":
        heads = _head_param_names(model, cfg)
        assert heads and trainable == heads
        assert counts["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in heads)
        assert method.metrics(model)["head_params"] == counts["trainable_params"]
        assert method.saved_weights == "head" and method.trains()
    else:
        assert not trainable and counts["trainable_params"] == 0
        assert not method.trains()


# ----------------------------------------------------------------------------- full fine-tuning


def _full_round_trip(compose, dataset, tmp_path, *extra):
    """Train method=full a few steps, save, reload onto a fresh base: (model, reloaded, probe, counts)."""
    cfg = _cfg(compose, "full", dataset, "method.lr=1e-3", "train.log_every=1", "train.warmup_ratio=0", *extra)
    loaded, method, task = build_model(cfg)
    tok = loaded.tokenizer
    examples = _examples(cfg, tok, cfg.dataset.train_split, 32)
    probe = training.collate(examples[:4], task, tok)
    base_out = _outputs(loaded.model, None, probe)
    model = method.adapt(loaded.model)
    counts = count_parameters(model)
    model.train()
    _train(model, method, cfg, tok, task, examples, tmp_path, steps=3)
    trained_out = _outputs(model, method, probe)
    assert not torch.allclose(trained_out, base_out, atol=1e-5)
    method.save_adapter(model, tmp_path / "adapter")
    fresh, _, _ = build_model(cfg)
    reloaded = method.load_adapter(fresh.model, tmp_path / "adapter")
    assert reloaded is fresh.model and type(reloaded) is type(model)
    assert torch.allclose(_outputs(reloaded, None, probe), trained_out, atol=1e-5)
    return model, reloaded, counts


@pytest.mark.parametrize(
    "dataset,extra",
    [
        ("wikitext2", ["+model.config_kwargs.tie_word_embeddings=true"]),  # SmolLM2 ties lm_head to embed_tokens
        ("wikitext2", ["model=tiny-distilbert"]),  # masked LM: vocab_projector tied to word_embeddings
        ("sst2", ["model=tiny-distilbert"]),
    ],
    ids=["llama-tied-causal", "distilbert-mlm-tied", "distilbert-cls"],
)
def test_full_counts_tied_weights_once_and_round_trips(dataset, extra, compose, tmp_path):
    model, reloaded, counts = _full_round_trip(compose, dataset, tmp_path, *extra)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert counts["trainable_params"] == counts["total_params"] == sum(unique.values())
    if dataset == "wikitext2":
        out_emb = model.get_output_embeddings().weight
        assert out_emb is model.get_input_embeddings().weight, "the tie is kept through training"
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
        saved = sum(p.numel() for p in model.state_dict().values())
        assert counts["total_params"] < saved  # state_dict lists the tied tensor twice; the count once


def test_full_needs_no_target_modules_and_has_its_own_lr(compose):
    cfg = _cfg(compose, "full", "sst2", "model.target_modules=[]")
    _, method, _ = build_model(cfg)  # validate() passes without target modules
    assert cfg.method.lr == 5e-5 and list(cfg.method.lr_grid) == [1.5e-5, 5e-5, 1.5e-4]
    assert cfg.method.lr < compose("method=lora").method.lr


def test_full_load_adapter_refuses_a_mismatched_folder(compose, tmp_path):
    from peft_lab.errors import UserError

    cfg = _cfg(compose, "full", "sst2")
    loaded, method, _ = build_model(cfg)
    with pytest.raises(UserError, match="no \\*.safetensors"):
        method.load_adapter(loaded.model, tmp_path)
    method.save_adapter(method.adapt(loaded.model), tmp_path / "cls")
    lm_cfg = _cfg(compose, "full", "wikitext2")
    lm, lm_method, _ = build_model(lm_cfg)
    with pytest.raises(UserError, match="does not match"):
        lm_method.load_adapter(lm.model, tmp_path / "cls")


@pytest.mark.parametrize("method_name", ["full", "head"])
def test_baseline_resume_from_checkpoint_equals_straight_run(method_name, compose, tmp_path):
    """The loop's checkpoint (trainable tensors by name) restores a model that is not a PeftModel."""
    extra = ["train.log_every=1", "train.warmup_ratio=0", "train.scheduler=constant", "method.lr=1e-3"]
    outs = []
    for name, plan in (("straight", [4]), ("resumed", [2, 4])):
        cfg = _cfg(compose, method_name, "sst2", *extra)
        for steps in plan:
            loaded, method, task = build_model(cfg)
            model = method.adapt(loaded.model)
            examples = _examples(cfg, loaded.tokenizer, cfg.dataset.train_split, 32)
            cfg.train.max_steps = steps
            cfg.train.checkpoint_every = 0
            result = train_loop(model, method, cfg, loaded.tokenizer, task, examples, tmp_path / name)
        assert result.steps == 4 and result.resumed_from == (2 if name == "resumed" else 0)
        outs.append(_outputs(model, None, training.collate(examples[:4], task, loaded.tokenizer)))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


# ----------------------------------------------------------------------------- head only (linear probe)


def test_head_on_distilbert_trains_only_its_head_and_round_trips(compose, tmp_path):
    cfg = _cfg(compose, "head", "sst2", "model=tiny-distilbert", "train.log_every=1", "train.warmup_ratio=0")
    loaded, method, task = build_model(cfg)
    tok = loaded.tokenizer
    model = method.adapt(loaded.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in ("pre_classifier", "classifier") for p in ("weight", "bias")}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    examples = _examples(cfg, tok, cfg.dataset.train_split, 64)
    probe = training.collate(examples[:4], task, tok)
    model.train()
    result = _train(model, method, cfg, tok, task, examples, tmp_path, steps=16)
    first, last = result.history[0]["loss"], sum(h["loss"] for h in result.history[-3:]) / 3
    assert last < first, (first, last)
    for n, p in model.named_parameters():  # the base did not move
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    trained_out = _outputs(model, method, probe)
    method.save_adapter(model, tmp_path / "adapter")
    assert [f.name for f in (tmp_path / "adapter").iterdir()] == ["head.safetensors"]
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "adapter" / "head.safetensors"))) == trainable
    fresh, _, _ = build_model(cfg)
    reloaded = method.load_adapter(fresh.model, tmp_path / "adapter")
    assert torch.allclose(_outputs(reloaded, None, probe), trained_out, atol=1e-5)


@pytest.mark.parametrize("model_name,dataset", [("tiny", "wikitext2"), ("tiny-distilbert", "wikitext2")])
def test_head_on_a_language_model_trains_nothing(model_name, dataset, compose):
    cfg = _cfg(compose, "head", dataset, f"model={model_name}")
    loaded, method, task = build_model(cfg)
    assert task in ("causal_lm", "masked_lm")
    model = method.adapt(loaded.model)
    assert not method.trains() and method.saved_weights == "none"
    assert not any(p.requires_grad for p in model.parameters())
    assert count_parameters(model)["trainable_params"] == 0


def test_head_refuses_classification_without_head_modules(compose):
    from peft_lab.errors import UserError

    cfg = _cfg(compose, "head", "sst2", "model.cls_head_modules=[]")
    with pytest.raises(UserError, match="cls_head_modules"):
        build_model(cfg)  # validate() runs before any weights load
    build_model(_cfg(compose, "head", "wikitext2", "model.cls_head_modules=[]"))  # LM: no head needed
    cfg = _cfg(compose, "head", "sst2", "model.cls_head_modules=[no_such_head]")
    loaded, method, _ = build_model(cfg)
    with pytest.raises(UserError, match="matches no module"):
        method.adapt(loaded.model)


def test_head_has_a_probe_learning_rate(compose):
    cfg = compose("method=head")
    assert cfg.method.lr == 1e-2 and list(cfg.method.lr_grid) == [3e-3, 1e-2, 3e-2]


# ----------------------------------------------------------------------------- HiRA


def test_hira_effective_weight_is_hadamard_with_w0(compose):
    cfg = _cfg(compose, "hira", "wikitext2")
    loaded, method, _ = build_model(cfg)
    model = method.adapt(loaded.model)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    a, b = layer.hira_A["default"], layer.hira_B["default"]
    with torch.no_grad():
        b.copy_(torch.randn_like(b))  # B = 0 at init: make the update non-trivial
    w0 = layer.get_base_layer().weight
    x = torch.randn(3, w0.shape[1])
    with torch.no_grad():
        got = layer(x)
        want = x @ (w0 + w0 * (b @ a)).T
    assert torch.allclose(got, want, atol=1e-5)
    # same trainable count as LoRA at the same r
    lora_cfg = _cfg(compose, "lora", "wikitext2", f"method.r={cfg.method.r}")
    lora_loaded, lora_method, _ = build_model(lora_cfg)
    lora_model = lora_method.adapt(lora_loaded.model)
    assert count_parameters(model)["adapter_params"] == count_parameters(lora_model)["adapter_params"]


def test_hira_has_its_own_learning_rate(compose):
    assert compose("method=hira").method.lr > 3 * compose("method=lora").method.lr


# ----------------------------------------------------------------------------- QLoRA


def test_qlora_layers_are_nf4_with_double_quant_and_heads_full_precision(compose):
    import bitsandbytes as bnb

    cfg = _cfg(compose, "qlora", "sst2")
    loaded, method, _ = build_model(cfg)
    model = method.adapt(loaded.model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every projection of both decoder layers
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in layers)
    head = model.get_base_model().score
    assert not isinstance(head.original_module, bnb.nn.Linear4bit)
    report = method.metrics(model)
    assert report["quant_type"] == "nf4" and report["double_quant"] is True
    assert report["quant_linear_bytes_ratio_vs_bf16"] <= 0.30

    # the footprint against the unquantised model, measured
    plain_cfg = _cfg(compose, "lora", "sst2")
    plain, _, _ = build_model(plain_cfg)
    ratio = loaded.model.get_memory_footprint() / plain.model.get_memory_footprint()
    assert ratio < 0.7, ratio  # the tiny model's embeddings and head stay fp32


def test_qlora_cpu_eval_takes_the_avx512bf16_repack_path(compose):
    """With cpu_fast_eval, dims that are multiples of 64 repack under eval + no_grad on an AVX512-BF16 CPU,
    and training after that evaluation still sends gradients through every 4-bit layer."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU lacks AVX512-BF16, so bitsandbytes has no 4-bit CPU repack path to check here")
    cfg = _cfg(compose, "qlora", "sst2", "method.cpu_fast_eval=true")
    loaded, method, task = build_model(cfg)
    model = method.adapt(loaded.model)
    probe = training.collate(_examples(cfg, loaded.tokenizer, "validation", 4), task, loaded.tokenizer)
    _outputs(model, method, probe)
    packed = [
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    ]
    assert packed and all(packed), f"{packed.count(False)} of {len(packed)} 4-bit layers not repacked for eval"
    # training after an evaluation: the packed kernel has no autograd, so the method unpacks first
    model.train()
    method.before_forward(probe, 1, 2, training=True)
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )
    loss = model(**probe).loss
    loss.backward()
    grad = model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad
    assert torch.isfinite(loss) and grad is not None and grad.abs().sum() > 0, "no gradient reached layer 0"


def test_qlora_odd_dims_are_guarded(compose):
    """A model whose dims break the repack rule still evaluates (those layers use the generic path)."""
    cfg = _cfg(
        compose,
        "qlora",
        "sst2",
        "method.cpu_fast_eval=true",
        "model.config_kwargs.hidden_size=48",
        "model.config_kwargs.intermediate_size=80",
        "model.config_kwargs.num_attention_heads=4",
        "model.config_kwargs.num_key_value_heads=2",
    )
    loaded, method, task = build_model(cfg)
    model = method.adapt(loaded.model)
    probe = training.collate(_examples(cfg, loaded.tokenizer, "validation", 4), task, loaded.tokenizer)
    out = _outputs(model, method, probe)
    assert torch.isfinite(out).all()
    assert torch.equal(out, _outputs(model, method, probe))
    model.train()
    method.before_forward(probe, 1, 2, training=True)
    model(**probe).loss.backward()


def test_qlora_on_cpu_falls_back_from_the_paged_optimizer(compose, caplog):
    cfg = _cfg(compose, "qlora", "sst2")
    _, method, _ = build_model(cfg)
    with caplog.at_level("WARNING"):
        cls, name = method.optimizer_class("cpu")
    assert cls is torch.optim.AdamW and "needs CUDA" in caplog.text


# ----------------------------------------------------------------------------- Sparse LoRA


@pytest.mark.parametrize("criterion", ["magnitude", "topk", "l1"])
@pytest.mark.parametrize("schedule", ["oneshot", "gradual"])
def test_sparse_lora_reaches_target_and_pruned_stay_zero(criterion, schedule, compose, tmp_path):
    cfg = _cfg(
        compose,
        "sparse",
        "sst2",
        f"method.criterion={criterion}",
        f"method.schedule={schedule}",
        "method.prune_step=3",
        "method.start_step=1",
        "method.end_step=5",
        "train.log_every=1",
    )
    loaded, method, task = build_model(cfg)
    model = method.adapt(loaded.model)
    examples = _examples(cfg, loaded.tokenizer, "train", 64)
    assert method.target_at(0, 10) == 0.0
    _train(model, method, cfg, loaded.tokenizer, task, examples, tmp_path, steps=5)
    zeros_at_5 = {n: (p == 0).clone() for n, p in method.factors.items()}
    _train(model, method, cfg, loaded.tokenizer, task, examples, tmp_path / "more", steps=10)
    report = method.metrics(model)
    assert abs(report["sparsity_achieved"] - 0.5) <= 0.01, report
    for name, p in method.factors.items():
        assert bool((p[zeros_at_5[name]] == 0).all()), f"{name}: a pruned weight came back"
    # stored sparsely: the adapter file is smaller than the dense one
    method.save_adapter(model, tmp_path / "sparse")
    from peft_lab.methods.lora import Method as LoraMethod

    LoraMethod.save_adapter(method, model, tmp_path / "dense")
    sparse_bytes = sum(f.stat().st_size for f in (tmp_path / "sparse").iterdir())
    dense_bytes = sum(f.stat().st_size for f in (tmp_path / "dense").iterdir())
    assert sparse_bytes < 0.8 * dense_bytes, (sparse_bytes, dense_bytes)


def test_sparse_gradual_schedule_is_cubic(compose):
    cfg = _cfg(compose, "sparse", "sst2", "method.schedule=gradual", "method.start_step=10", "method.end_step=20")
    _, method, _ = build_model(cfg)
    assert method.target_at(10, 100) == 0.0 and method.target_at(20, 100) == pytest.approx(0.5)
    assert method.target_at(15, 100) == pytest.approx(0.5 * (1 - 0.5**3))


def _push_one_pruned_weight(compose, score: str, steps: int = 30):
    """A gradual ramp over 40 steps; after the first mask, one pruned entry of a lora_A factor gets a small
    update every step (as an optimizer would give it), far below the pruning threshold per step."""
    cfg = _cfg(compose, "sparse", "sst2", f"method.score={score}", "method.start_step=0", "method.end_step=40")
    loaded, method, _ = build_model(cfg)
    model = method.adapt(loaded.model)
    method.after_optimizer_step(model, 1, 40)
    name = next(n for n in method.factors if "lora_A" in n)
    p, mask = method.factors[name], method.masks[name]
    j = tuple(int(i) for i in (mask == 0).nonzero()[0])
    v0 = float(method.shadow[name][j]) if score != "weight" else 0.0  # its value when it was pruned
    delta = 0.05 * float(p.detach().abs().max())  # |A| is uniform: the lowest 13 % and more are pruned, i.e. > 0.13 max
    for step in range(2, 2 + steps):
        with torch.no_grad():
            p[j] += delta
        method.after_optimizer_step(model, step, 40)
    return method, p, name, j, v0 + steps * delta


def test_sparse_lora_lets_a_pruned_weight_regrow_under_the_shadow_schedule(compose):
    method, p, name, j, pushed = _push_one_pruned_weight(compose, "shadow")
    assert method.masks[name][j] == 1, "the pushed weight should have come back"
    assert float(p[j]) == pytest.approx(pushed, rel=1e-5)  # every update it got while pruned was kept
    assert method.metrics(None)["sparsity_regrown"] >= 1


def test_sparse_lora_weight_score_never_regrows(compose):
    """The seed's criterion: a pruned weight is zero after every step, so it is never chosen again."""
    method, p, name, j, _ = _push_one_pruned_weight(compose, "weight")
    assert method.masks[name][j] == 0 and float(p[j]) == 0.0


def test_sparse_lora_mask_freezes_at_the_end_of_the_ramp_at_the_target(compose):
    cfg = _cfg(compose, "sparse", "sst2", "method.start_step=0", "method.end_step=4")
    loaded, method, _ = build_model(cfg)
    model = method.adapt(loaded.model)
    with torch.no_grad():
        for q in method.factors.values():
            q.copy_(torch.randn_like(q))
    for step in range(1, 5):
        method.after_optimizer_step(model, step, 10)
    assert method.frozen and method.shadow == {}
    frozen = {n: m.clone() for n, m in method.masks.items()}
    with torch.no_grad():
        for q in method.factors.values():
            q.add_(1.0)  # every entry pushed: the frozen mask holds the pruned ones at zero
    method.after_optimizer_step(model, 5, 10)
    assert all(torch.equal(frozen[n], method.masks[n]) for n in frozen)
    assert method.metrics(None)["sparsity_achieved"] == pytest.approx(0.5, abs=1e-3)


def test_sparse_lora_at_sparsity_zero_trains_exactly_as_lora(compose, tmp_path):
    """The study's sparsity-0 point is LoRA: same init, same steps, the same weights bit for bit."""
    weights = {}
    for name, extra in (("lora", []), ("sparse", ["method.sparsity=0"])):
        cfg = _cfg(compose, name, "sst2", *extra)
        loaded, method, task = build_model(cfg)
        torch.manual_seed(0)
        model = method.adapt(loaded.model)
        examples = _examples(cfg, loaded.tokenizer, "train", 32)
        torch.manual_seed(0)
        _train(model, method, cfg, loaded.tokenizer, task, examples, tmp_path / name, steps=4)
        weights[name] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert weights["lora"].keys() == weights["sparse"].keys()
    assert all(torch.equal(weights["lora"][n], weights["sparse"][n]) for n in weights["lora"])


def test_sparse_lora_defaults_prune_after_the_adapters_learn(compose):
    _, method, _ = build_model(_cfg(compose, "sparse", "sst2"))
    assert method.window(100) == (25, 75)
    assert method.target_at(25, 100) == 0.0 and method.target_at(75, 100) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- SparseLoRA


def _sparselora_pair(compose, mlp, attn, *extra):
    """A LoRA and a SparseLoRA model with identical weights and non-zero B (so gradients reach A)."""
    common = [
        "method.warmup_frac=0",
        f"method.mlp_sparsity=0-1:{mlp}",
        f"method.attn_sparsity=0-1:{attn}",
        *extra,
    ]
    out = []
    for name in ("lora", "sparselora"):
        cfg = _cfg(compose, name, "wikitext2", *(common if name == "sparselora" else []))
        loaded, method, task = build_model(cfg)
        torch.manual_seed(0)
        model = _random_b(method.adapt(loaded.model))
        out.append((model, method, loaded.tokenizer, task, cfg))
    return out


def _random_b(model):
    """LoRA's B is zero at init; a random B (seeded) makes the adapters change outputs and pass gradients to A."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def test_sparselora_at_sparsity_zero_equals_lora(compose):
    (lora_m, _, tok, task, cfg), (sp_m, sp_method, _, _, _) = _sparselora_pair(compose, 0.0, 0.0)
    batch = training.collate(_examples(cfg, tok, "train", 4), task, tok)
    lora_m.train(), sp_m.train()
    torch.manual_seed(5)
    out_a = lora_m(**batch)
    out_a.loss.backward()
    sp_method.before_forward(batch, 10, 10, training=True)
    torch.manual_seed(5)
    out_b = sp_m(**batch)
    out_b.loss.backward()
    assert sp_method.controller.active
    assert torch.allclose(out_a.logits, out_b.logits, atol=1e-5)
    grads_a = {n: p.grad for n, p in lora_m.named_parameters() if p.requires_grad}
    grads_b = {n: p.grad for n, p in sp_m.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-5), n


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_sparselora_skips_the_expected_share_of_mlp_flops(sparsity, compose):
    (_, _, tok, task, cfg), (sp_m, sp_method, _, _, _) = _sparselora_pair(
        compose, sparsity, 0.5, "method.dense_output_tokens=false"
    )
    batch = training.collate(_examples(cfg, tok, "train", 4), task, tok)
    sp_method.before_forward(batch, 10, 10, training=True)
    sp_m.train()
    out = sp_m(**batch)
    out.loss.backward()
    report = sp_method.metrics(sp_m)
    assert report["sparselora_mlp_flops_skipped"] == pytest.approx(sparsity, abs=1e-9)
    assert report["sparselora_attn_flops_skipped"] == pytest.approx(0.5, abs=0.02)
    assert 0 < report["sparselora_flops_skipped"] < 1


def test_sparselora_keeps_output_tokens_dense(compose):
    (_, _, tok, task, cfg), (sp_m, sp_method, _, _, _) = _sparselora_pair(compose, 0.5, 0.0)
    batch = training.collate(_examples(cfg, tok, "train", 2), task, tok)
    batch["labels"][:, : batch["labels"].shape[1] // 2] = -100  # the first half is context
    sp_method.before_forward(batch, 10, 10, training=True)
    sp_m(**batch)
    # half the tokens sparse at 50 %: a quarter of the MLP work skipped
    assert sp_method.metrics(sp_m)["sparselora_mlp_flops_skipped"] == pytest.approx(0.25, abs=1e-9)


def test_sparselora_patches_nothing_globally(compose):
    import torch.nn as nn
    from transformers.models.llama import modeling_llama

    forwards = (nn.Linear.forward, modeling_llama.LlamaMLP.forward, modeling_llama.LlamaAttention.forward)
    _sparselora_pair(compose, 0.5, 0.25)
    assert (nn.Linear.forward, modeling_llama.LlamaMLP.forward, modeling_llama.LlamaAttention.forward) == forwards
    cfg = _cfg(compose, "lora", "wikitext2")
    loaded, method, _ = build_model(cfg)
    plain = method.adapt(loaded.model)
    assert all(type(m).__name__ != "SparseLinear" for m in plain.modules())


def test_sparselora_rejects_an_encoder_at_start_up(compose):
    from peft_lab.errors import UserError

    for dataset in ("sst2", "wikitext2"):
        cfg = _cfg(compose, "sparselora", dataset, "model=tiny-distilbert")
        with pytest.raises(UserError, match="encoder"):
            build_model(cfg)  # validate() runs before any weights load
    # a model config that claims to be a decoder but is not Llama-shaped still fails before training
    cfg = _cfg(compose, "sparselora", "sst2", "model=tiny-distilbert", "model.tasks=[classification,causal_lm]")
    loaded, method, _ = build_model(cfg)
    with pytest.raises(UserError, match="Llama-style decoder"):
        method.adapt(loaded.model)


def test_sparselora_compact_mlp_kernels_equal_masked_dense_lora_layers():
    """The compact path (k rows of gate/up, k columns of down, LoRA included) equals the dense
    LoRA layers with the unselected intermediate channels zeroed."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    from peft_lab.methods.sparselora import _linear_cols, _linear_rows

    torch.manual_seed(0)
    net = nn.ModuleDict({"gate": nn.Linear(16, 48), "down": nn.Linear(48, 16)})
    peft_net = get_peft_model(net, LoraConfig(r=4, target_modules=["gate", "down"], lora_dropout=0.0))
    for n, p in peft_net.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    gate, down = peft_net.base_model.model["gate"], peft_net.base_model.model["down"]
    x = torch.randn(10, 16)
    sel = torch.tensor([1, 5, 6, 20, 33, 47])
    mask = torch.zeros(48)
    mask[sel] = 1.0
    assert torch.allclose(_linear_rows(gate, x, sel), gate(x)[:, sel], atol=1e-6)
    h = torch.randn(10, 48)
    assert torch.allclose(_linear_cols(down, h[:, sel], sel), down(h * mask), atol=1e-6)


@pytest.mark.parametrize("name", ["full", "head"])
def test_baselines_refuse_target_modules_they_would_ignore(name, compose):
    from peft_lab.errors import UserError
    from peft_lab.methods import get_method_class

    cfg = compose("model=tiny", f"method={name}", "dataset=sst2", "method.target_modules=[q_proj]")
    with pytest.raises(UserError, match="does not apply"):
        get_method_class(name)(cfg.method, cfg.model, "classification").validate()


# ----------------------------------------------------------------------------- SparseLoRA per layer


@pytest.mark.parametrize(
    "spec, n_layers, expected",
    [
        ("53%-95%:0.75", 30, {i: 0.75 for i in range(16, 29)}),  # the deep band: SmolLM2-135M's layers 16-28
        ({"53%-95%": 0.75}, 32, {i: 0.75 for i in range(17, 31)}),  # an 8B Llama's 17-30, as the official recipes
        ({"17-30": 0.95, "31": 0.5}, 32, {**{i: 0.95 for i in range(17, 31)}, 31: 0.5}),  # llama3-8b-glue's MLP
        ("16-28:0.75,29:0.5", 30, {**{i: 0.75 for i in range(16, 29)}, 29: 0.5}),
        ("3:0.5 5:0", 8, {3: 0.5}),  # spaces separate too; a 0 leaves the layer dense
        ("", 30, {}),
    ],
)
def test_per_layer_sparsity_maps_resolve_to_layers(spec, n_layers, expected):
    from peft_lab.methods.sparselora import resolve_layer_map

    assert resolve_layer_map("mlp_sparsity", spec, n_layers) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        (0.5, "is not a per-layer map"),
        ({"abc": 0.5}, "'abc', which is not a layer"),
        ({"3": 1.0}, r"method.mlp_sparsity\['3'\]=1.0 is outside \[0, 1\)"),
        ({"3": -0.1}, "is outside"),
        ("16-28", "'16-28' is not layers:sparsity"),
        ({"5-3": 0.5}, "empty or reversed range '5-3'"),
        ({"3-5": 0.5, "5": 0.25}, "names layer 5 twice"),
        ({"12": 0.5}, "names layer 12 .'12'., but the model has 8 layers .0-7."),
    ],
)
def test_bad_per_layer_sparsity_maps_fail_with_the_fix(spec, message):
    from peft_lab.errors import UserError
    from peft_lab.methods.sparselora import resolve_layer_map

    with pytest.raises(UserError, match=message):
        resolve_layer_map("mlp_sparsity", spec, 8)


def test_sparselora_layer_maps_are_checked_at_start_up_and_at_adapt(compose):
    from peft_lab.errors import UserError

    with pytest.raises(UserError, match=r"is outside \[0, 1\)"):  # before any weight loads
        build_model(_cfg(compose, "sparselora", "sst2", "method.attn_sparsity=1:1.5"))
    loaded, method, _ = build_model(_cfg(compose, "sparselora", "sst2", "method.mlp_sparsity=1-2:0.5"))
    with pytest.raises(UserError, match="names layer 2 .'1-2'., but the model has 2 layers"):
        method.adapt(loaded.model)
    # the presets compose and load on the model they are for (32 layers); deep_band is the default
    assert compose("method=sparselora").method.mlp_sparsity == {"53%-95%": 0.75}
    glue = compose("method=sparselora", "method/sparsity=llama3_8b_glue").method
    assert glue.mlp_sparsity == {"17-30": 0.95, "31": 0.5} and glue.sparse_eval is True
    from peft_lab.methods.sparselora import resolve_layer_map

    for preset in ("llama3_8b_glue", "llama3_8b_csr", "llama3_8b_math10k", "llama2_7b_math10k"):
        m = compose("method=sparselora", f"method/sparsity={preset}").method
        assert resolve_layer_map("mlp_sparsity", m.mlp_sparsity, 32) and 0 not in resolve_layer_map(
            "attn_sparsity", m.attn_sparsity, 32
        )


def _sparselora_model(compose, *extra):
    cfg = _cfg(compose, "sparselora", "wikitext2", "method.warmup_frac=0", "method.dense_output_tokens=false", *extra)
    loaded, method, task = build_model(cfg)
    model = _random_b(method.adapt(loaded.model))
    model.eval()
    return model, method, loaded.tokenizer, task, cfg


def test_sparselora_oracle_selector_equals_a_hand_masked_mlp(compose):
    """The oracle keeps the channels with the largest true ||SiLU(gate(x)) * up(x)|| over the batch's tokens;
    the result equals the dense LoRA MLP with every other intermediate channel zeroed by hand."""
    import torch.nn.functional as F

    from peft_lab.methods.sparselora import decoder_layers

    model, method, *_ = _sparselora_model(
        compose,
        "method.selector=oracle",
        "method.mlp_sparsity=0-1:0.75",
        "model.target_modules=[gate_proj,up_proj,down_proj]",
    )
    mlp = decoder_layers(model)[1].mlp
    assert type(mlp).__name__ == "SparseLlamaMLP" and mlp.oracle
    torch.manual_seed(2)
    x = torch.randn(2, 5, 64)
    ids = torch.zeros(2, 5, dtype=torch.long)
    method.controller.begin({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "causal_lm", True, False, False)
    with torch.no_grad():
        out = mlp(x)
        act = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # the LoRA layers themselves, dense
        keep = act.reshape(-1, 128).norm(dim=0).topk(32).indices  # 25 % of the 128 channels
        mask = torch.zeros(128)
        mask[keep] = 1
        reference = mlp.down_proj(act * mask)
        assert not torch.allclose(mlp.dense(x), reference, atol=1e-3)  # the masking matters
    assert torch.allclose(out, reference, atol=1e-5)


def test_a_deep_copy_of_a_sparselora_model_computes_with_its_own_weights(compose):
    import copy

    model, method, tok, task, cfg = _sparselora_model(
        compose, "method.mlp_sparsity=0-1:0.5", "method.attn_sparsity=0-1:0.5"
    )
    batch = training.collate(_examples(cfg, tok, "train", 2), task, tok)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        method.before_forward(batch, 5, 10, training=False)
        method.controller.active = True
        reference = model(**inputs).logits
        twin = copy.deepcopy(model)
        controllers = {id(m.controller) for m in twin.modules() if hasattr(m, "controller")}
        assert len(controllers) == 1 and id(method.controller) not in controllers  # its own, shared by its layers
        twin_ctl = next(m.controller for m in twin.modules() if hasattr(m, "controller"))
        for name, p in model.named_parameters():  # spoil the original's projections
            if any(k in name for k in ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")):
                p.add_(1.0)
        twin_ctl.begin(batch, task, True, False, count=True)
        assert torch.allclose(twin(**inputs).logits, reference, atol=1e-5)
    skipped = twin_ctl.report()
    assert (
        skipped["sparselora_mlp_flops_skipped"] == pytest.approx(0.5) and skipped["sparselora_attn_flops_skipped"] > 0.4
    )


def test_sparselora_cooldown_runs_the_last_steps_dense(compose):
    _, method, _ = build_model(
        _cfg(compose, "sparselora", "wikitext2", "method.warmup_frac=0.1", "method.cooldown_frac=0.2")
    )
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    active = []
    for step in range(10):
        method.before_forward(batch, step, 10, training=True)
        active.append(method.controller.active)
    assert active == [False] + [True] * 7 + [False] * 2
    # off by default: sparse to the last step
    _, method, _ = build_model(_cfg(compose, "sparselora", "wikitext2"))
    method.before_forward(batch, 9, 10, training=True)
    assert method.controller.active


def test_sparselora_classification_run_reports_dense_and_sparse_test_accuracy(run_cli, tmp_path):
    from conftest import TINY, read_metrics

    proc = run_cli("method=sparselora", "dataset=sst2", "dataset.source=synthetic", "dataset.synthetic_train_size=64",
                   "dataset.max_test_samples=32", "dataset.test_split=null", "method.mlp_sparsity=0-1:0.9",
                   "method.attn_sparsity=0-1:0.75", "method.dense_output_tokens=false", *TINY,
                   "hydra.run.dir=run")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = read_metrics(tmp_path / "run")
    test = record["test"]
    assert test["accuracy_dense"] == test["accuracy"] == record["main_metric_value"]  # dense is the main one
    assert 0 <= test["accuracy_sparse"] <= 1
    assert record["method_metrics"]["sparselora_mlp_layers"] == {"0": 0.9, "1": 0.9}


def test_sparse_lora_whose_schedule_ends_after_the_run_fails(compose):
    from peft_lab.errors import UserError

    cfg = _cfg(compose, "sparse", "sst2", "method.start_step=100", "method.end_step=200")
    loaded, method, _ = build_model(cfg)
    model = method.adapt(loaded.model)
    for step in range(1, 6):
        method.after_optimizer_step(model, step, 6)
    with pytest.raises(UserError, match=r"reached sparsity 0.000 of its target 0.5 by the run's last step \(6\)"):
        method.after_optimizer_step(model, 6, 6)


def test_sparselora_refuses_a_map_given_as_a_mapping_on_the_command_line(compose):
    from peft_lab.errors import UserError

    _, method, _ = build_model(_cfg(compose, "sparselora", "sst2"))
    for override in ("method.mlp_sparsity={0-1:0.5}", "+method.mlp_sparsity={0-1:0.5}", "method.attn_sparsity.1=0.5"):
        with pytest.raises(UserError, match="merges a mapping .* instead of replacing it"):
            method.check_overrides(["seed=0", override])
    method.check_overrides(["method.mlp_sparsity=0-1:0.5", "method.attn_sparsity=''"])  # the string form is fine


def test_sparselora_map_values_and_repeated_layers_are_checked_before_loading(compose):
    from peft_lab.errors import UserError
    from peft_lab.methods.sparselora import check_layer_map

    with pytest.raises(UserError, match=r"\['1'\]='0.3' is not a number"):
        check_layer_map("mlp_sparsity", {"1": "0.3"})
    with pytest.raises(UserError, match="names layer 3 twice"):
        check_layer_map("mlp_sparsity", {"1-3": 0.5, "3-4": 0.5})


def test_sparselora_on_plain_lm_data_warns_that_nothing_ran_sparse(compose, tmp_path, caplog):
    import logging

    cfg = _cfg(compose, "sparselora", "wikitext2", "method.mlp_sparsity=0-1:0.5")  # output tokens dense: all of them
    loaded, method, task = build_model(cfg)
    model = method.adapt(loaded.model)
    with caplog.at_level(logging.WARNING, logger="peft_lab.methods.sparselora"):
        _train(model, method, cfg, loaded.tokenizer, task, _examples(cfg, loaded.tokenizer, "train", 16), tmp_path, 2)
        report = method.metrics(model)
    assert report["sparselora_flops_skipped"] == 0.0
    assert len(report["sparselora_warnings"]) == 1 and "every token" in report["sparselora_warnings"][0]
