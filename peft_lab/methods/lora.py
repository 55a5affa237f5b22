"""LoRA (Hu et al., 2022) through PEFT's ``LoraConfig``: W' = W0 + (alpha/r) B A."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

from peft_lab.methods.base import Method as BaseMethod
from peft_lab.methods.base import make_peft_model
from peft_lab.schemas import Choice, MethodConfig, plain

NAME = "lora"


class Bias(Choice):
    """``method.bias``: which biases train (``peft.LoraConfig.bias``)."""

    none = "none"
    all = "all"
    lora_only = "lora_only"


@dataclass
class Config(MethodConfig):
    """LoRA's keys, and the shared defaults of every method built on it (qlora, sparse, sparselora).

    These defaults are the only place the shared keys are written: ``conf/method/*.yaml``
    of the LoRA family set only their own keys (``target_modules``: ``MethodConfig``).
    """

    name: str = NAME
    lr: float = 5e-4  # SST-2 on SmolLM2-135M: 0.80 dev acc after 125 steps at 5e-4
    # half a decade either side of lr (PEFT's method_comparison tunes LoRA in 1e-4..1e-3)
    lr_grid: List[float] = field(default_factory=lambda: [1.5e-4, 5e-4, 1.5e-3])
    r: int = 8  # rank; higher = more capacity and more parameters
    lora_alpha: int = 16  # scaling alpha/r = 2
    lora_dropout: float = 0.05
    bias: Bias = Bias.none


class Method(BaseMethod):
    name = NAME

    def lora_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.cfg.r,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            bias=plain(self.cfg.bias),
            target_modules=self.target_modules(),
            modules_to_save=self.modules_to_save(),
            task_type=self.peft_task_type(),
        )

    def adapt(self, model: Any) -> Any:
        return make_peft_model(model, self.lora_config())
