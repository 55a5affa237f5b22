"""Registers the typed schemas in Hydra's ConfigStore (and the ``cell_dir`` resolver).

This module must stay light: ``train.py`` imports it before Hydra composes the
config, so ``--help``, ``--cfg job`` and bad overrides never pay for torch,
transformers or peft.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from peft_lab.runfiles import cell_dir_name
from peft_lab.schemas import ClusterConfig, Config, DatasetConfig, LoggerConfig, ModelConfig


def register() -> None:
    from peft_lab.methods import method_schemas

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="dataset", name="base_dataset", node=DatasetConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="cluster", name="base_cluster", node=ClusterConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
    for name, schema in method_schemas().items():
        cs.store(group="method", name=f"base_{name}", node=schema)
    if not OmegaConf.has_resolver("cell_dir"):
        OmegaConf.register_new_resolver("cell_dir", cell_dir_name)


register()
