"""The config tree: every option composes, schemas type-check, composition stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import CONF, REPO

from peft_lab.methods import names


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
    from peft_lab.config import _cell_dir

    assert _cell_dir("dataset=sst2,method=lora") == "dataset=sst2,method=lora"
    assert _cell_dir("model.name_or_path=org/model") == "model.name_or_path=org_model"
    assert _cell_dir("") == "default"


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
