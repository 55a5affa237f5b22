"""HiRA (Huang et al., ICLR 2025) through PEFT's built-in ``HiraConfig``.

W' = W0 + W0 * (B A) (Hadamard product with the frozen weight): the update is
high-rank while training r(d+k) parameters, as many as LoRA at the same r. No
alpha scaling; B = 0 at init, so the adapted model starts equal to the base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

from peft_lab.methods.base import Method as BaseMethod
from peft_lab.methods.base import make_peft_model
from peft_lab.schemas import MethodConfig

NAME = "hira"


@dataclass
class Config(MethodConfig):
    """HiRA's keys and defaults (its own lr and r; no alpha). ``conf/method/hira.yaml`` sets none of them."""

    name: str = NAME
    # HiRA needs about 10x LoRA's lr (PEFT's method_comparison: 4.5e-3 against LoRA's 1e-4..1e-3)
    lr: float = 5e-3
    lr_grid: List[float] = field(default_factory=lambda: [1.5e-3, 5e-3, 1.5e-2])
    # LoRA's rank: the same trainable parameters as LoRA (the paper's point: r(d+k) parameters, a
    # high-rank update through the Hadamard product with W0). The paper's own runs use r=32.
    r: int = 8
    hira_dropout: float = 0.0


class Method(BaseMethod):
    name = NAME

    def adapt(self, model: Any) -> Any:
        from peft import HiraConfig

        config = HiraConfig(
            r=self.cfg.r,
            hira_dropout=self.cfg.hira_dropout,
            target_modules=self.target_modules(),
            modules_to_save=self.modules_to_save(),
            task_type=self.peft_task_type(),
        )
        return make_peft_model(model, config)
