"""The generic PEFT methods (``peft_lab/methods/generic.py``, one ``conf/method/<name>.yaml`` each).

Every shipped one goes through the method contract on the tiny decoder (classification and causal LM) and the
tiny encoder (classification): trainable set, zero change at init, loss falls, save/load reproduces the outputs,
merging keeps them; and through one in-process smoke run; then the
checks of the generic machinery: AdaLoRA's per-step schedule, 4-bit bases, and the start-up errors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, check_merge, train_loop

from peft_lab import data, models, training
from peft_lab.errors import UserError
from peft_lab.methods import generic_names, get_method_class
from peft_lab.metrics import count_parameters

GENERIC = list(generic_names())
SHIPPED = ["adalora", "dora", "ia3", "loha", "lokr", "oft", "olora", "pissa", "rslora", "shira", "vera"]
# What PEFT promises at init with each YAML's settings. Exact: a zero factor or an identity (LoRA family B = 0
# with DoRA's m = ||W0||, VeRA's b = 0, AdaLoRA's E = 0, LoHa's B2 = 0, LoKr's W1 = 0, OFT's R = I, IA3's ones,
# SHiRA's zeros). PiSSA and OLoRA move W0's top directions into the adapter and freeze the residual: equal to
# the base up to fp32 rounding. A YAML not listed here is held to the exact promise; one whose PEFT init is
# not the identity (e.g. init_lora_weights: false) goes into NO_IDENTITY_AT_INIT.
INIT_TOLERANCE = {"pissa": 1e-4, "olora": 1e-4}
NO_IDENTITY_AT_INIT: set[str] = set()
# The contract trains 12 steps at a large lr. PiSSA's and OLoRA's adapters hold W0's principal part (large,
# orthonormal factors): a step of 1e-2 on them moves the base weights themselves, so they train at 2e-3.
CONTRACT_LR = {"pissa": 2e-3, "olora": 2e-3}


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(cache_dir))
    torch.set_num_threads(1)


def _cfg(compose, method, dataset="sst2", *extra):
    return compose("experiment=smoke", f"method={method}", f"dataset={dataset}", "logger=none", *extra)


def _examples(cfg, tok, n):
    raw, _ = data.load_validated(cfg.dataset, cfg.dataset.train_split)
    return data.tokenize(cfg.dataset, tok, raw, n)


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _mean_loss(model, examples, task, tok):
    """The model's loss over ``examples`` (eval mode, fixed batches): what training must lower."""
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(examples), 16):
            losses.append(model(**training.collate(examples[i : i + 16], task, tok)).loss.item())
    return sum(losses) / len(losses)


def _train(model, method, cfg, tok, task, examples, tmp_path, steps):
    cfg.train.max_steps = steps
    cfg.train.checkpoint_every = 0
    model.train()
    return train_loop(model, method, cfg, tok, task, examples, tmp_path)


def _adapter_and_head_ids(model):
    """Parameter ids inside PEFT's adapter layers, and inside its trainable head copies (modules_to_save)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    adapter, head = set(), set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                for sub in getattr(module, layer_name).values():
                    adapter.update(id(p) for p in (sub.parameters() if hasattr(sub, "parameters") else [sub]))
        elif isinstance(module, ModulesToSaveWrapper):
            head.update(id(p) for p in module.modules_to_save.parameters())
    return adapter, head


def test_every_shipped_method_is_registered_and_composes(compose):
    assert sorted(GENERIC) == SHIPPED
    for name in GENERIC:
        cfg = _cfg(compose, name)
        assert cfg.method.name == name and get_method_class(name).__module__ == "peft_lab.methods.generic"
        assert cfg.method.lr > 0 and cfg.method.lr in cfg.method.lr_grid
    cfg = compose("method=dora", "method.config.r=16", "+method.config.use_rslora=true")
    assert cfg.method.config.r == 16 and cfg.method.config.use_rslora is True


# ----------------------------------------------------------------------------- the contract


# the tiny encoder (DistilBERT) on classification: PEFT has no IA3 default targets for it (see below)
ENCODER = ["model=tiny-distilbert"]
ENCODER_EXTRA = {"ia3": ["method.target_modules=[k_lin,v_lin,lin2]", "+method.config.feedforward_modules=[lin2]"]}


@pytest.mark.parametrize("dataset,model", [("sst2", []), ("wikitext2", []), ("sst2", ENCODER)],
                         ids=["decoder-sst2", "decoder-wikitext2", "encoder-sst2"])  # fmt: skip
@pytest.mark.parametrize("name", SHIPPED)
def test_generic_method_contract(name, dataset, model, compose, tmp_path):
    lr = CONTRACT_LR.get(name, 1e-2)
    extra = [*model, *(ENCODER_EXTRA.get(name, []) if model else [])]
    cfg = _cfg(compose, name, dataset, f"method.lr={lr}", "train.log_every=1", "train.warmup_ratio=0", *extra)
    loaded, method, task = build_model(cfg)
    tok = loaded.tokenizer
    examples = _examples(cfg, tok, 64)
    probe = training.collate(examples[:4], task, tok)
    base_out = _outputs(loaded.model, probe)
    model = method.adapt(loaded.model)

    # 1. the trainable set is the method's own: adapter parameters (plus the task head for classification)
    adapter, head = _adapter_and_head_ids(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and trainable <= adapter | head, "a base weight trains"
    counts = count_parameters(model)
    assert counts["adapter_params"] > 0
    assert counts["trainable_params"] == counts["adapter_params"] + counts["head_params"]
    assert (counts["head_params"] > 0) == (task == "classification")

    # 2. the model starts equal to the base where PEFT promises it
    if name not in NO_IDENTITY_AT_INIT:
        diff = (_outputs(model, probe) - base_out).abs().max().item()
        assert diff <= INIT_TOLERANCE.get(name, 1e-6), (name, diff)

    # 3. the loss (over the training examples, in eval mode: not one noisy batch) falls
    before = _mean_loss(model, examples, task, tok)
    _train(model, method, cfg, tok, task, examples, tmp_path, steps=12)
    after = _mean_loss(model, examples, task, tok)
    assert after < before, (before, after)

    # 4. save + load (PEFT's save_pretrained / PeftModel.from_pretrained) reproduces the outputs
    trained_out = _outputs(model, probe)
    assert not torch.allclose(trained_out, base_out, atol=1e-5), "training changed nothing"
    method.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    fresh, fresh_method, _ = build_model(cfg)
    reloaded = fresh_method.load_adapter(fresh.model, tmp_path / "adapter")
    assert torch.allclose(_outputs(reloaded, probe), trained_out, atol=1e-5)

    # 5. merging (the inference-cost step) keeps the outputs
    check_merge(model, method, examples, task, tok, trained_out, probe)


@pytest.mark.parametrize("name", SHIPPED)
def test_generic_method_smoke_run(name, compose, tmp_path):
    """One run through the pipeline (``run.execute``, as train.py runs it): completed, counted, adapter saved."""
    from peft_lab import run, runfiles

    cfg = _cfg(compose, name, "sst2", "train.max_steps=2", "train.checkpoint_every=0", "train.threads=1")
    run.execute(cfg, run.RunContext(tmp_path / "run"))
    rec = runfiles.read_record(tmp_path / "run")
    assert rec.status == runfiles.Status.completed and rec.steps == 2
    assert 0 < rec.trainable_params == rec.adapter_params + rec.head_params
    assert rec.method_metrics["peft_type"] == cfg.method.peft_type
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


def test_ia3_and_adalora_on_the_tiny_encoder(compose, tmp_path):
    """An encoder: IA3 has no PEFT default targets for DistilBERT (a start-up error naming the fix, then the fix
    works); AdaLoRA trains masked LM, where no PEFT wrapper adds its orthogonality penalty (``extra_loss`` does)."""
    cfg = _cfg(compose, "ia3", "sst2", "model=tiny-distilbert")
    loaded, method, _ = build_model(cfg)
    with pytest.raises(
        UserError,
        match=r"PEFT cannot apply peft.IA3Config .* \(distilbert\): Please specify `target_modules`.*Fix: name the layers",
    ):
        method.adapt(loaded.model)
    cfg = _cfg(compose, "ia3", "sst2", "model=tiny-distilbert", "method.target_modules=[k_lin,v_lin,lin2]",
               "+method.config.feedforward_modules=[lin2]")  # fmt: skip
    loaded, method, _ = build_model(cfg)
    model = method.adapt(loaded.model)
    assert count_parameters(model)["adapter_params"] == 2 * (64 + 64 + 128)  # k, v out; lin2's input

    cfg = _cfg(compose, "adalora", "wikitext2", "model=tiny-distilbert", "method.lr=1e-2", "train.warmup_ratio=0")
    loaded, method, task = build_model(cfg)
    assert task == "masked_lm" and method.peft_task_type() is None
    model = method.adapt(loaded.model)
    penalty = method.extra_loss(model)
    assert penalty is not None and penalty.requires_grad and penalty.item() > 0
    result = _train(model, method, cfg, loaded.tokenizer, task, _examples(cfg, loaded.tokenizer, 32), tmp_path, 6)
    assert result.steps == 6 and model.peft_config["default"].total_step == 6


# ----------------------------------------------------------------------------- AdaLoRA


def test_adalora_schedule_follows_the_run_and_allocates_each_step(compose, tmp_path):
    cfg = _cfg(compose, "adalora", "sst2", "method.lr=1e-2", "method.config.tinit=0.1", "method.config.tfinal=0.25")
    loaded, method, task = build_model(cfg)
    model = method.adapt(loaded.model)
    calls = []
    original = model.base_model.update_and_allocate
    model.base_model.update_and_allocate = lambda step: calls.append(step) or original(step)
    tok = loaded.tokenizer
    _train(model, method, cfg, tok, task, _examples(cfg, tok, 64), tmp_path, steps=20)
    config = model.peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal) == (20, 2, 5)  # the run's 20 steps, 10 % and 25 %
    assert calls == list(range(20)), "update_and_allocate after every optimizer step, counted from 0"
    # the final budget: target_r triplets per adapted matrix on average, the pruned ones zero in E
    ranks = [sum(v) for v in config.rank_pattern.values()]
    assert sum(ranks) == config.target_r * len(ranks)
    kept = sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)
    assert kept == sum(ranks)
    assert method.metrics(model)["adalora_mean_rank"] == config.target_r
    state = method.state_dict()
    assert state["ipt"] == {} or all(torch.is_tensor(v) for v in state["ipt"].values())
    assert state["rank_pattern"] == config.rank_pattern


def test_adalora_resumed_from_a_checkpoint_equals_the_straight_run(compose, tmp_path):
    """The allocator's smoothed importance scores and the rank pattern travel in the checkpoint (``state_dict``)."""
    import shutil

    extra = ["method.lr=1e-2", "method.config.tinit=0.1", "method.config.tfinal=0.3", "train.warmup_ratio=0"]
    cfg = _cfg(compose, "adalora", "sst2", *extra, "train.log_every=1")
    outs = []
    for name in ("straight", "resumed"):
        loaded, method, task = build_model(cfg)
        model = method.adapt(loaded.model)
        examples = _examples(cfg, loaded.tokenizer, 48)
        cfg.train.max_steps, cfg.train.checkpoint_every = 10, 4

        def copy_step_4(entry, step, name=name):  # the straight run's checkpoint at step 4, before it is overwritten
            if name == "straight" and step == 5:
                shutil.copytree(tmp_path / "straight" / training.CKPT_DIR, tmp_path / "resumed" / training.CKPT_DIR)

        model.train()
        result = train_loop(model, method, cfg, loaded.tokenizer, task, examples, tmp_path / name, copy_step_4)
        assert result.resumed_from == (4 if name == "resumed" else 0)
        outs.append((_outputs(model, training.collate(examples[:4], task, loaded.tokenizer)), method.state_dict()))
    assert outs[0][1]["rank_pattern"] == outs[1][1]["rank_pattern"]
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)


def test_adalora_loss_carries_peft_orthogonality_penalty(compose):
    cfg = _cfg(compose, "adalora", "sst2")
    loaded, method, task = build_model(cfg)
    model = method.adapt(loaded.model)
    batch = training.collate(_examples(cfg, loaded.tokenizer, 4), task, loaded.tokenizer)
    with torch.no_grad():
        model.train()
        with_penalty = model(**batch).loss
        plain = model.base_model.model(**batch).loss  # the transformers model alone
    from peft_lab.methods.generic import adalora_orth_reg

    assert method.extra_loss(model) is None  # PEFT's wrapper adds it: not twice
    assert torch.allclose(with_penalty - plain, adalora_orth_reg(model), atol=1e-5)


def test_adalora_schedule_that_leaves_no_budgeting_phase_fails(compose):
    from peft_lab.methods.generic import adalora_schedule

    assert adalora_schedule({"tinit": 0.04, "tfinal": 0.1}, 125) == {"tinit": 5, "tfinal": 12, "total_step": 125}
    with pytest.raises(UserError, match="leaves no budgeting phase"):
        adalora_schedule({"tinit": 50, "tfinal": 50}, 100)
    with pytest.raises(UserError, match="neither a step count"):
        adalora_schedule({"tinit": 1.5}, 100)
    cfg = _cfg(compose, "adalora", "sst2", "method.config.total_step=10", "method.config.tinit=8",
               "method.config.tfinal=2")  # fmt: skip
    with pytest.raises(UserError, match="leaves no budgeting phase"):
        get_method_class("adalora")(cfg.method, cfg.model, "classification").validate()


# ----------------------------------------------------------------------------- 4-bit bases


def test_dora_on_a_4bit_base_trains_and_reports_the_quantisation(compose, tmp_path):
    cfg = _cfg(compose, "dora", "sst2", "method.quantize=nf4", "method.lr=1e-2", "train.warmup_ratio=0")
    loaded, method, task = build_model(cfg)
    model = method.adapt(loaded.model)
    report = method.metrics(model)
    assert report["quant_type"] == "nf4" and report["quant_linear_layers"] > 0
    result = _train(model, method, cfg, loaded.tokenizer, task, _examples(cfg, loaded.tokenizer, 32), tmp_path, 4)
    assert result.steps == 4


@pytest.mark.parametrize("name", ["vera", "loha", "lokr", "oft", "shira"])
def test_methods_without_4bit_layers_fail_at_start_up(name, compose):
    cfg = _cfg(compose, name, "sst2", "method.quantize=nf4")
    with pytest.raises(UserError, match="has no 4-bit .bitsandbytes. layers.*Fix: set method.quantize=null"):
        get_method_class(name)(cfg.method, cfg.model, "classification").validate()


def test_pissa_cannot_initialise_from_4bit_weights(compose):
    cfg = _cfg(compose, "pissa", "sst2", "method.quantize=nf4")
    loaded, method, _ = build_model(cfg)  # LoRA has 4-bit layers: start-up passes, PEFT refuses at adapt
    with pytest.raises(UserError, match="PEFT cannot apply peft.LoraConfig .method=pissa.*4-bit weights.*PiSSA"):
        method.adapt(loaded.model)


# ----------------------------------------------------------------------------- start-up errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["method.peft_type=LORRA"], "method.peft_type=LORRA is not a PEFT method .*Fix: use one of .*'LORA'"),
        (["method.peft_type=PROMPT_TUNING"], "adds prompts or tokens, not layers"),
        (["method.peft_type=LoraConfig"], None),  # a config class name works too
        (["+method.config.lora_alpa=8"], "method.config.lora_alpa is not an argument of peft.LoraConfig.*lora_alpha"),
        (["method.config.r=abc"], "method.config.r='abc' is not a valid LoraConfig.r .int."),
        (["method.config.use_dora=maybe"], "method.config.use_dora='maybe' is not a valid LoraConfig.use_dora"),
        (["+method.config.target_modules=[q_proj]"], "method.config.target_modules is set by peft_lab.*Fix: drop"),
        (["+method.config.task_type=SEQ_CLS"], "method.config.task_type is set by peft_lab"),
        (["method.lr=0"], "is not a positive learning rate"),
        (["model.target_modules=[]"], "has no target modules"),
    ],
)
def test_bad_generic_configs_fail_at_start_up(args, message, compose):
    cfg = _cfg(compose, "dora", "sst2", *args)
    method = get_method_class("dora")(cfg.method, cfg.model, "classification")
    if message is None:
        method.validate()
        return
    with pytest.raises(UserError, match=message):
        method.validate()


def test_peft_refusals_of_values_fail_at_start_up(compose):
    cfg = _cfg(compose, "adalora", "sst2", "+method.config.use_dora=true")
    with pytest.raises(UserError, match="peft.AdaLoraConfig refuses .*does not support DoRA"):
        get_method_class("adalora")(cfg.method, cfg.model, "classification").validate()


@pytest.mark.slow  # a fresh process pays the imports (~10-30 s on a shared 2-core box)
def test_a_bad_generic_config_exits_2_from_the_command_line(run_cli, tmp_path):
    proc = run_cli("experiment=smoke", "logger=none", "method=loha", "method.quantize=nf4",
                   f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("peft_lab: error:")]
    assert line and "no 4-bit (bitsandbytes) layers" in line[0] and "Fix:" in line[0], proc.stderr
