"""LoRA (Hu et al., 2022) through PEFT's ``LoraConfig``: W' = W0 + (alpha/r) B A."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peft_lab.methods.base import Method as BaseMethod
from peft_lab.methods.base import make_peft_model
from peft_lab.schemas import MethodConfig

NAME = "lora"


@dataclass
class Config(MethodConfig):
    name: str = NAME
    lr: float = 5e-4
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    bias: str = "none"


class Method(BaseMethod):
    name = NAME

    def lora_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.cfg.r,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            bias=self.cfg.bias,
            target_modules=self.target_modules(),
            modules_to_save=self.modules_to_save(),
            task_type=self.peft_task_type(),
        )

    def adapt(self, model: Any) -> Any:
        return make_peft_model(model, self.lora_config())
