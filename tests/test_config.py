"""The config tree: every option composes, schemas type-check, composition stays light."""

from __future__ import annotations

import os
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
from conftest import CONF, REPO
from hydra.errors import ConfigCompositionException

from peft_lab import schemas
from peft_lab.methods import hira, lora, names, qlora, sparse, sparselora


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_method_yaml_has_a_registered_module():
    assert set(_options("method")) == set(names())


@pytest.mark.parametrize("group", ["method", "dataset", "model", "cluster", "logger", "experiment"])
def test_every_group_option_composes(group, compose):
    for option in _options(group):
        extra = ["model.name_or_path=some/model"] if (group, option) == ("model", "hf") else []
        cfg = compose(f"{group}={option}", *extra)
        if group != "experiment":
            assert cfg[group].name == option


def test_defaults_and_typed_values(compose):
    cfg = compose()
    assert (cfg.method.name, cfg.dataset.name, cfg.model.name, cfg.cluster.name) == (
        "lora",
        "sst2",
        "smollm2-135m",
        "local",
    )
    assert cfg.method.r == 8 and cfg.method.lora_alpha == 16
    cfg = compose("method.r=16", "train.max_steps=5")
    assert cfg.method.r == 16 and cfg.train.max_steps == 5


def test_smoke_preset_switches_to_tiny_model_and_synthetic_data(compose):
    cfg = compose("experiment=smoke", "dataset=wikitext2")
    assert cfg.model.name == "tiny" and cfg.dataset.source.value == "synthetic"
    cfg = compose("experiment=smoke", "model=tiny-distilbert")
    assert cfg.model.name == "tiny-distilbert", "a model given on the command line wins over the preset"


def test_run_dirs_are_derived_from_overrides():
    """The ``cell_dir`` resolver that hydra.sweep.subdir calls names a cell's dir from its overrides only."""
    from omegaconf import OmegaConf

    import peft_lab.config  # noqa: F401  (registers the resolver)

    def cell_dir(overrides: str) -> str:
        return OmegaConf.create({"d": "${cell_dir:'" + overrides + "'}"}).d

    assert cell_dir("dataset=sst2,method=lora") == "dataset=sst2,method=lora"
    name = cell_dir("model.name_or_path=org/model")
    assert name.startswith("model.name_or_path=org_model") and "/" not in name
    assert cell_dir("") == "default"


def test_cfg_job_imports_no_heavy_library():
    """`train.py --cfg job` and a bad override never import torch, transformers or peft."""
    for args in (["--cfg", "job"], ["method.r=abc"]):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", str(REPO / "train.py"), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert not imported & {"torch", "transformers", "peft", "datasets", "wandb"}, args
    assert (
        "method:"
        in subprocess.run(
            [sys.executable, str(REPO / "train.py"), "--cfg", "job"], capture_output=True, text=True, timeout=60
        ).stdout
    )


# ----------------------------------------------------------------------------- closed choices

# (overrides selecting the option that has the key, the key, its enum): every closed string choice
CHOICES = [
    ((), "train.precision", schemas.Precision),
    ((), "train.scheduler", schemas.Scheduler),
    ((), "logger.backend", schemas.LoggerBackend),
    (("logger=wandb",), "logger.mode", schemas.LoggerMode),
    ((), "dataset.source", schemas.DataSource),
    ((), "dataset.task", schemas.Task),
    ((), "model.source", schemas.ModelSource),
    ((), "method.bias", lora.Bias),
    (("method=qlora",), "method.quant_type", qlora.QuantType),
    (("method=qlora",), "method.compute_dtype", schemas.Precision),
    (("method=qlora",), "method.paged_optimizer", qlora.PagedOptimizer),
    (("method=sparse",), "method.criterion", sparse.Criterion),
    (("method=sparse",), "method.schedule", sparse.Schedule),
    (("method=sparse",), "method.score", sparse.Score),
]
CHOICE_IDS = [key for _, key, _ in CHOICES]


def _valid(enum: type[Enum]) -> str:
    """How OmegaConf lists the valid values in its error: ``[auto, fp32, bf16, fp16]``."""
    return "[" + ", ".join(m.value for m in enum) + "]"


def _composition_error(compose, *overrides: str) -> str:
    with pytest.raises(ConfigCompositionException) as err:
        compose(*overrides)
    return f"{err.value}\n{err.value.__cause__}"


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize(("select", "key", "enum"), CHOICES, ids=CHOICE_IDS)
def test_a_misspelt_choice_fails_composition_listing_the_valid_values(select, key, enum, compose):
    message = _composition_error(compose, *select, f"{key}=nonee")
    assert "Invalid value 'nonee'" in message and f"expected one of {_valid(enum)}" in message, message
    assert key in message


@pytest.mark.parametrize("select", sorted({select for select, _, _ in CHOICES}), ids=lambda s: " ".join(s) or "default")
def test_every_valid_choice_composes(select, compose):
    choices = [(key, list(enum)) for sel, key, enum in CHOICES if sel == select]
    for i in range(max(len(members) for _, members in choices)):  # one composition sets every key at once
        picked = {key: members[i % len(members)] for key, members in choices}
        cfg = compose(*select, *(f"{key}={member.value}" for key, member in picked.items()))
        for key, member in picked.items():
            value = _get(cfg, key)
            assert value is member and value == member.value, key


def test_the_reported_typos_fail_at_composition(compose):
    """The cases that used to pass: a backend typo turned W&B on, a dtype typo raised a raw KeyError."""
    assert "expected one of [wandb, none]" in _composition_error(compose, "logger.backend=nonee")
    assert "not Optional" in _composition_error(compose, "logger.backend=null")
    assert "expected one of [auto, fp32, bf16, fp16]" in _composition_error(
        compose, "method=qlora", "method.compute_dtype=float77"
    )
    assert "expected one of [auto, online, offline, disabled]" in _composition_error(
        compose, "logger=wandb", "logger.mode=onlin"
    )
    # schedulers that need a metric or extra kwargs are not offered
    for name in ("reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay"):
        assert "expected one of [linear, cosine," in _composition_error(compose, f"train.scheduler={name}")


def test_dataset_metrics_are_checked_item_by_item(compose):
    message = _composition_error(compose, "dataset.metrics=[accuracy,acc]")
    assert "Invalid value 'acc'" in message and f"expected one of {_valid(schemas.EvalMetric)}" in message
    cfg = compose("dataset.metrics=[macro_f1,accuracy]")
    assert list(cfg.dataset.metrics) == ["macro_f1", "accuracy"] and str(cfg.dataset.metrics[0]) == "macro_f1"
    assert list(compose("dataset=wikitext2").dataset.metrics) == [schemas.EvalMetric.perplexity]


def test_open_keys_stay_strings(compose):
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert compose(f"train.device={device}").train.device == device


def _all_choice_enums() -> set[type[Enum]]:
    found, todo = set(), list(schemas.Choice.__subclasses__())
    while todo:
        enum = todo.pop()
        found.add(enum)
        todo += enum.__subclasses__()
    return found


def test_choice_members_are_plain_strings_by_name_and_value():
    """OmegaConf matches a config string to a member by name, so name == value; str() and f-strings
    give the value (a library or a run-dir name never sees 'Precision.bf16')."""
    for module in (schemas, lora, qlora, sparse, sparselora, hira):  # every choice enum derives from Choice
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Enum) and obj.__module__ == module.__name__:
                assert issubclass(obj, schemas.Choice), obj
    enums = _all_choice_enums()
    assert {schemas.Precision, schemas.Scheduler, schemas.LoggerBackend, schemas.LoggerMode} <= enums
    assert {lora.Bias, qlora.QuantType, qlora.PagedOptimizer, sparse.Criterion, sparse.Schedule, sparse.Score} <= enums
    for enum in enums:
        for member in enum:
            assert member.name == member.value and member == member.value
            assert str(member) == f"{member}" == f"{member:>1}" == member.value
            assert {member.value: 1}[member] == 1


def test_schedulers_are_transformers_scheduler_types():
    """Checked against the installed transformers' source, without importing it (that takes seconds)."""
    from importlib.util import find_spec

    spec = find_spec("transformers")
    if spec is None or spec.origin is None:
        pytest.skip("transformers is not installed")
    source = (Path(spec.origin).parent / "trainer_utils.py").read_text()
    for member in schemas.Scheduler:
        assert f'= "{member.value}"' in source, member


def test_choices_reach_libraries_and_records_as_plain_strings(compose, monkeypatch):
    from peft_lab import tracking

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", os.devnull)
    monkeypatch.setenv("HOME", "/nonexistent")
    for mode in schemas.LoggerMode:  # what make_tracker passes to wandb.init(mode=...)
        resolved = tracking.resolve_mode(compose("logger=wandb", f"logger.mode={mode.value}").logger.mode)
        assert type(resolved) is str and resolved == ("offline" if mode.value in ("auto", "online") else mode.value)

    cfg = compose("method=sparse", "method.criterion=topk", "method.schedule=oneshot")
    record = sparse.Method(cfg.method, cfg.model, "classification").metrics(None)
    assert type(record["sparsity_criterion"]) is str and record["sparsity_criterion"] == "topk"
    assert type(record["sparsity_schedule"]) is str and record["sparsity_schedule"] == "oneshot"

    import torch

    for value, cpu, cuda in (("auto", torch.float32, torch.bfloat16), ("fp16", torch.float16, torch.float16)):
        method = qlora.Method(compose("method=qlora", f"method.compute_dtype={value}").method, cfg.model, "causal_lm")
        assert method.compute_dtype("cpu") is cpu and method.compute_dtype("cuda:1") is cuda
