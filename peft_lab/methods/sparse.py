"""Sparse LoRA: LoRA whose factors A and B are driven to a target sparsity.

Criteria: ``magnitude`` (smallest |w| per matrix zeroed), ``topk`` (keep the k
largest |w| in each row), ``l1`` (lambda * (|A|_1 + |B|_1) added to the loss, then
magnitude thresholding). Schedules: ``oneshot`` (prune once at a step, masks fixed
after) or ``gradual`` (cubic ramp from 0 to the target between two steps, Zhu &
Gupta 2017). Masks are re-applied after every optimizer step, so a pruned weight
stays zero. PEFT has no sparse LoRA: this module post-processes a PEFT LoRA model.
The adapter is stored sparsely (a bitmask plus the non-zero values), so its size
on disk shows the saving; ``load_adapter`` densifies it for ``PeftModel``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_lab.errors import fail
from peft_lab.methods import lora
from peft_lab.schemas import Choice, plain

log = logging.getLogger(__name__)
NAME = "sparse"
SPARSE_FILE = "sparse_adapter.safetensors"
DENSE_FILE = "adapter_model.safetensors"


class Criterion(Choice):
    """``method.criterion``: which LoRA weights are pruned."""

    magnitude = "magnitude"  # the smallest |w| per matrix
    topk = "topk"  # keep the k largest |w| per row
    l1 = "l1"  # L1 penalty on the factors, then magnitude thresholding


class Schedule(Choice):
    """``method.schedule``: when the sparsity is reached."""

    oneshot = "oneshot"  # prune once at prune_step, masks fixed after
    gradual = "gradual"  # cubic ramp from start_step to end_step (Zhu & Gupta 2017)


@dataclass
class Config(lora.Config):
    """Sparse LoRA's own keys; the LoRA keys and their defaults come from ``lora.Config``."""

    name: str = NAME
    sparsity: float = 0.5  # target fraction of zeros in every LoRA factor
    criterion: Criterion = Criterion.magnitude
    schedule: Schedule = Schedule.gradual
    prune_step: int = -1  # oneshot: the step that prunes; -1: half-way
    start_step: int = -1  # gradual: ramp start; -1: 10 % of the steps
    end_step: int = -1  # gradual: ramp end (target reached); -1: 60 % of the steps
    l1_lambda: float = 1e-4  # l1: weight of the L1 penalty


class Method(lora.Method):
    name = NAME

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.factors: dict[str, Any] = {}
        self.masks: dict[str, Any] = {}
        self.current = 0.0

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        if not 0.0 <= c.sparsity < 1.0:
            raise fail(f"method.sparsity={c.sparsity} is outside [0, 1)", "give the fraction of zeros, e.g. 0.5")
        if c.criterion not in ("magnitude", "topk", "l1"):
            raise fail(f"method.criterion={c.criterion}", "use magnitude, topk or l1")
        if c.schedule not in ("oneshot", "gradual"):
            raise fail(f"method.schedule={c.schedule}", "use oneshot or gradual")
        if c.schedule == "gradual" and c.start_step >= 0 and c.end_step >= 0 and c.end_step <= c.start_step:
            raise fail(
                f"method.end_step={c.end_step} is not after method.start_step={c.start_step}",
                "give end_step > start_step",
            )

    def adapt(self, model: Any) -> Any:
        model = super().adapt(model)
        self.factors = {n: p for n, p in model.named_parameters() if p.requires_grad and _is_factor(n)}
        return model

    # -- schedule -------------------------------------------------------------
    def target_at(self, step: int, total: int) -> float:
        c = self.cfg
        if c.schedule == "oneshot":
            at = c.prune_step if c.prune_step >= 0 else total // 2
            return c.sparsity if step >= at else 0.0
        start = c.start_step if c.start_step >= 0 else int(0.1 * total)
        end = c.end_step if c.end_step >= 0 else max(start + 1, int(0.6 * total))
        if step < start:
            return 0.0
        frac = min(1.0, (step - start) / max(1, end - start))
        return c.sparsity * (1.0 - (1.0 - frac) ** 3)

    # -- training hooks -------------------------------------------------------
    def extra_loss(self, model: Any) -> Any:
        if self.cfg.criterion != "l1" or not self.factors:
            return None
        return self.cfg.l1_lambda * sum(p.abs().sum() for p in self.factors.values())

    def after_optimizer_step(self, model: Any, step: int, total: int) -> None:
        import torch

        target = self.target_at(step, total)
        if target > self.current + 1e-12:
            self.current = target
            with torch.no_grad():
                for name, p in self.factors.items():
                    self.masks[name] = self._mask(p.detach(), target)
        self.apply_masks()

    def apply_masks(self) -> None:
        import torch

        with torch.no_grad():
            for name, mask in self.masks.items():
                self.factors[name].mul_(mask)

    def _mask(self, w: Any, target: float) -> Any:
        """Keep-mask with round(target * numel) zeros (magnitude/l1) or per-row top-k (topk)."""
        import torch

        score = w.abs().float()
        if self.cfg.criterion == "topk":
            keep = max(1, math.ceil((1.0 - target) * w.shape[1]))
            idx = score.topk(keep, dim=1).indices
            return torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True).to(w.dtype)
        n_zero = int(round(target * w.numel()))
        mask = torch.ones(w.numel(), dtype=w.dtype, device=w.device)
        if n_zero:
            mask[score.flatten().argsort()[:n_zero]] = 0
        return mask.view_as(w)

    # -- reporting and state --------------------------------------------------
    def metrics(self, model: Any) -> dict[str, Any]:
        zeros = sum(int((p == 0).sum()) for p in self.factors.values())
        total = sum(p.numel() for p in self.factors.values())
        return {
            "sparsity_target": self.cfg.sparsity,
            "sparsity_reached_target": self.current,
            "sparsity_achieved": zeros / total if total else 0.0,
            "sparsity_criterion": plain(self.cfg.criterion),
            "sparsity_schedule": plain(self.cfg.schedule),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.cpu() for k, v in self.masks.items()}, "current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = state.get("current", 0.0)
        self.masks = {k: v.to(self.factors[k].device) for k, v in state.get("masks", {}).items()}
        self.apply_masks()

    # -- sparse storage -------------------------------------------------------
    def save_adapter(self, model: Any, folder: Path) -> None:
        super().save_adapter(model, folder)
        pack_sparse(Path(folder))

    def load_adapter(self, base_model: Any, folder: Path) -> Any:
        return load_sparse_adapter(base_model, Path(folder))


def _is_factor(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def pack_sparse(folder: Path) -> None:
    """Replace the dense adapter file with a bitmask + non-zero values per LoRA factor."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    dense = load_file(str(folder / DENSE_FILE))
    packed, layout = {}, {}
    for name, t in dense.items():
        if not _is_factor(name):
            packed[name] = t.contiguous()
            continue
        nz = t != 0
        packed[f"{name}::values"] = t[nz].contiguous()
        packed[f"{name}::mask"] = torch.from_numpy(np.packbits(nz.flatten().cpu().numpy()))
        layout[name] = list(t.shape)
    save_file(packed, str(folder / SPARSE_FILE), metadata={"peft_lab_sparse_layout": json.dumps(layout)})
    (folder / DENSE_FILE).unlink()


def unpack_sparse(folder: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(folder / SPARSE_FILE), "pt") as f:
        layout = json.loads(f.metadata()["peft_lab_sparse_layout"])
        for key in f.keys():
            if "::" not in key:
                out[key] = f.get_tensor(key)
        for name, shape in layout.items():
            values = f.get_tensor(f"{name}::values")
            bits = np.unpackbits(f.get_tensor(f"{name}::mask").numpy())[: math.prod(shape)].astype(bool)
            t = torch.zeros(math.prod(shape), dtype=values.dtype)
            t[torch.from_numpy(bits)] = values
            out[name] = t.view(shape)
    return out


def load_sparse_adapter(base_model: Any, folder: Path) -> Any:
    """Densify into a temporary folder and load with ``PeftModel.from_pretrained``."""
    from peft import PeftModel
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(folder / "adapter_config.json", tmp)
        save_file(unpack_sparse(folder), str(Path(tmp) / DENSE_FILE))
        return PeftModel.from_pretrained(base_model, tmp)
