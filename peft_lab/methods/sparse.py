"""Sparse LoRA: LoRA whose factors A and B are driven to a target sparsity.

Criteria (how many weights go, and where): ``magnitude`` (the lowest-scored share of each
matrix zeroed), ``topk`` (the k highest-scored weights kept in each row), ``l1``
(lambda * (|A|_1 + |B|_1) added to the loss, then per-matrix thresholding). Schedules:
``oneshot`` (prune once at a step, masks fixed after) or ``gradual`` (cubic ramp from 0 to
the target between two steps, Zhu & Gupta 2017, "To prune, or not to prune").

What a weight is scored by (``score``):

* ``shadow`` (default): each factor keeps a dense *shadow* copy. While the target ramps, the
  forward pass uses the masked factor and the optimizer's update goes to the shadow of every
  entry, kept or pruned (a straight-through estimator, as in Zhou et al. 2021, "Learning N:M
  fine-grained structured sparse neural networks from scratch"); the mask is re-chosen from
  |shadow| every step, so a pruned weight that the gradient keeps pushing comes back. At the
  end of the ramp the mask is frozen and the pruned entries stay zero.
* ``importance``: the same shadow, scored by the accumulated first-order importance
  |shadow * grad| (an exponential moving average over micro-batches; Molchanov et al. 2019).
* ``weight``: the plain magnitude |w| of the current (already masked) factor, re-chosen only
  when the target rises: a pruned weight is zero and never returns (the seed's behaviour).

Defaults prune *after* the adapters have learned: the gradual ramp runs from 25 % to 75 % of
the steps (B starts at zero, so a mask chosen in the first steps is chosen from noise), and
one-shot pruning happens half-way. Masks are re-applied after every optimizer step. PEFT has
no sparse LoRA: this module post-processes a PEFT LoRA model. The adapter is stored sparsely
(a bitmask plus the non-zero values), so its size on disk shows the saving; ``load_adapter``
densifies it for ``PeftModel``.
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


class Score(Choice):
    """``method.score``: what a weight is ranked by when the masks are chosen."""

    shadow = "shadow"  # |dense shadow value| (straight-through updates; pruned weights can regrow)
    importance = "importance"  # accumulated |shadow * grad| (pruned weights can regrow)
    weight = "weight"  # |current weight| (pruned weights stay zero; the seed's behaviour)


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
    score: Score = Score.shadow
    schedule: Schedule = Schedule.gradual
    prune_step: int = -1  # oneshot: the step that prunes; -1: half-way
    start_step: int = -1  # gradual: ramp start; -1: 25 % of the steps
    end_step: int = -1  # gradual: ramp end (target reached, masks frozen); -1: 75 % of the steps
    l1_lambda: float = 1e-4  # l1: weight of the L1 penalty
    importance_beta: float = 0.9  # importance: EMA factor of |shadow * grad| per micro-batch


class Method(lora.Method):
    name = NAME

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.factors: dict[str, Any] = {}  # name -> LoRA factor parameter (what the model computes with)
        self.masks: dict[str, Any] = {}  # name -> keep-mask (1 kept, 0 pruned), same shape and dtype
        self.shadow: dict[str, Any] = {}  # name -> dense shadow (score shadow/importance, while ramping)
        self.importance: dict[str, Any] = {}  # name -> EMA of |shadow * grad| (score importance)
        self.current = 0.0  # the sparsity the masks were last chosen for
        self.frozen = False  # masks fixed (after the ramp's end, or after a one-shot prune)
        self.regrown = 0  # entries that were pruned and came back (counted over the run)

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        if not 0.0 <= c.sparsity < 1.0:
            raise fail(f"method.sparsity={c.sparsity} is outside [0, 1)", "give the fraction of zeros, e.g. 0.5")
        if c.criterion not in ("magnitude", "topk", "l1"):
            raise fail(f"method.criterion={c.criterion}", "use magnitude, topk or l1")
        if c.schedule not in ("oneshot", "gradual"):
            raise fail(f"method.schedule={c.schedule}", "use oneshot or gradual")
        if c.score not in ("shadow", "importance", "weight"):
            raise fail(f"method.score={c.score}", "use shadow, importance or weight")
        if not 0.0 <= c.importance_beta < 1.0:
            raise fail(f"method.importance_beta={c.importance_beta} is outside [0, 1)", "give e.g. 0.9")
        if c.schedule == "gradual" and c.start_step >= 0 and c.end_step >= 0 and c.end_step <= c.start_step:
            raise fail(
                f"method.end_step={c.end_step} is not after method.start_step={c.start_step}",
                "give end_step > start_step",
            )

    def adapt(self, model: Any) -> Any:
        model = super().adapt(model)
        self.factors = {n: p for n, p in model.named_parameters() if p.requires_grad and _is_factor(n)}
        if self.cfg.score == "importance":
            for name, p in self.factors.items():
                p.register_hook(self._importance_hook(name))
        return model

    def _importance_hook(self, name: str) -> Any:
        def hook(grad: Any) -> None:
            import torch

            if name not in self.shadow or self.frozen:
                return
            with torch.no_grad():
                value = (self.shadow[name] * grad).abs().float()
                old = self.importance.get(name)
                beta = self.cfg.importance_beta
                self.importance[name] = value if old is None else old.mul_(beta).add_(value, alpha=1 - beta)

        return hook

    # -- schedule -------------------------------------------------------------
    def window(self, total: int) -> tuple[int, int]:
        """(first step with a mask, step at which the masks freeze), in optimizer steps done."""
        c = self.cfg
        if c.schedule == "oneshot":
            at = c.prune_step if c.prune_step >= 0 else total // 2
            return at, at
        start = c.start_step if c.start_step >= 0 else int(0.25 * total)
        end = c.end_step if c.end_step >= 0 else max(start + 1, int(0.75 * total))
        return start, end

    def target_at(self, step: int, total: int) -> float:
        """The sparsity (0..1) wanted after ``step`` optimizer steps of ``total``: 0 before the window,
        a cubic ramp inside it (Zhu & Gupta 2017), the target from its end."""
        start, end = self.window(total)
        if step < start:
            return 0.0
        if end <= start:
            return self.cfg.sparsity
        frac = min(1.0, (step - start) / (end - start))
        return self.cfg.sparsity * (1.0 - (1.0 - frac) ** 3)

    # -- training hooks -------------------------------------------------------
    def extra_loss(self, model: Any) -> Any:
        if self.cfg.criterion != "l1" or not self.factors:
            return None
        return self.cfg.l1_lambda * sum(p.abs().sum() for p in self.factors.values())

    def after_optimizer_step(self, model: Any, step: int, total: int) -> None:
        import torch

        if self.frozen or self.cfg.sparsity == 0:
            self.apply_masks()
            return
        target = self.target_at(step, total)
        _, end = self.window(total)
        regrow = self.cfg.score != "weight"
        with torch.no_grad():
            if regrow and self.masks:  # the step's update reached every entry; the shadow keeps the pruned ones
                for name, p in self.factors.items():
                    self.shadow[name] = p.detach() + self.shadow[name] * (1 - self.masks[name])
            if target > 0 and (regrow or target > self.current + 1e-12):
                for name, p in self.factors.items():
                    if regrow and name not in self.shadow:
                        self.shadow[name] = p.detach().clone()
                    mask = self._mask(self._score(name, p), target)
                    old = self.masks.get(name)
                    if old is not None:
                        self.regrown += int(((old == 0) & (mask != 0)).sum())
                    self.masks[name] = mask
                    if regrow:
                        p.copy_(self.shadow[name] * mask)
                self.current = target
            if step >= end and self.masks:
                self.frozen = True
                self.shadow, self.importance = {}, {}
        self.apply_masks()
        if step >= total and not self.frozen:
            c = self.cfg
            when = f"prune_step={c.prune_step}" if c.schedule == "oneshot" else f"end_step={end}"
            raise fail(
                f"Sparse LoRA reached sparsity {self.current:.3f} of its target {c.sparsity} by the run's last step "
                f"({total}): the schedule ({plain(c.schedule)}, {when}) ends after the run, so the result would be "
                "reported as sparse when it is not",
                "give method.start_step / end_step / prune_step within the run's steps, or -1 for the defaults "
                "(25-75 % of the steps, one-shot half-way)",
            )

    def _score(self, name: str, p: Any) -> Any:
        if self.cfg.score == "importance" and name in self.importance:
            return self.importance[name]
        if self.cfg.score in ("shadow", "importance"):
            return self.shadow[name].abs().float()  # no gradient seen yet: the shadow's magnitude
        return p.detach().abs().float()

    def apply_masks(self) -> None:
        import torch

        with torch.no_grad():
            for name, mask in self.masks.items():
                self.factors[name].mul_(mask)

    def _mask(self, score: Any, target: float) -> Any:
        """Keep-mask (the factor's dtype) with round(target * numel) zeros (magnitude/l1) or a per-row top-k
        (topk), choosing the highest ``score`` (same shape as the factor)."""
        import torch

        dtype = next(iter(self.factors.values())).dtype
        if self.cfg.criterion == "topk":
            keep = max(1, math.ceil((1.0 - target) * score.shape[1]))
            idx = score.topk(keep, dim=1).indices
            return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True).to(dtype)
        n_zero = int(round(target * score.numel()))
        mask = torch.ones(score.numel(), dtype=dtype, device=score.device)
        if n_zero:
            mask[score.flatten().argsort(stable=True)[:n_zero]] = 0
        return mask.view_as(score)

    # -- reporting and state --------------------------------------------------
    def metrics(self, model: Any) -> dict[str, Any]:
        zeros = sum(int((p == 0).sum()) for p in self.factors.values())
        total = sum(p.numel() for p in self.factors.values())
        return {
            "sparsity_target": self.cfg.sparsity,
            "sparsity_reached_target": self.current,
            "sparsity_achieved": zeros / total if total else 0.0,
            "sparsity_criterion": plain(self.cfg.criterion),
            "sparsity_score": plain(self.cfg.score),
            "sparsity_schedule": plain(self.cfg.schedule),
            "sparsity_regrown": self.regrown,
        }

    def state_dict(self) -> dict[str, Any]:
        def cpu(d: dict) -> dict:
            return {k: v.cpu() for k, v in d.items()}

        return {
            "masks": cpu(self.masks),
            "shadow": cpu(self.shadow),
            "importance": cpu(self.importance),
            "current": self.current,
            "frozen": self.frozen,
            "regrown": self.regrown,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def dev(d: dict) -> dict:
            return {k: v.to(self.factors[k].device) for k, v in d.items()}

        self.current = state.get("current", 0.0)
        self.masks = dev(state.get("masks", {}))
        self.shadow = dev(state.get("shadow", {}))
        self.importance = dev(state.get("importance", {}))
        self.frozen, self.regrown = state.get("frozen", False), state.get("regrown", 0)
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
