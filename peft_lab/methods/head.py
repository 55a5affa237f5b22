"""Head-only training: a linear probe on the frozen base (Alain & Bengio, 2016; Kumar et al., 2022).

Classification: the base is frozen and only the task head trains, the modules named by the
model config's ``cls_head_modules`` (Llama: ``score``, a [num_labels, hidden] linear map of the
last token's hidden state; DistilBERT: ``pre_classifier`` [dim, dim] + ``classifier``
[num_labels, dim] on the [CLS] state, its head as transformers builds it). The probe measures
what the frozen features already hold, the floor any fine-tuning method should beat
(Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", compare linear probing with full fine-tuning). ``save_adapter`` writes
the head tensors only (``head.safetensors``); ``load_adapter`` puts them into a fresh base.

Causal / masked LM: the LM head is the pretrained one, so there is nothing to probe and nothing
trains: ``trains()`` is False, the pipeline evaluates the base as it is (the zero-shot row),
``save_adapter`` writes an empty folder and ``saved_weights`` is ``none``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

from peft_lab.errors import fail
from peft_lab.methods.base import Method as BaseMethod
from peft_lab.methods.base import check_no_target_modules
from peft_lab.schemas import MethodConfig

NAME = "head"
HEAD_FILE = "head.safetensors"


@dataclass
class Config(MethodConfig):
    """The probe's keys: only the learning rate (``target_modules`` does not apply)."""

    name: str = NAME
    # a linear probe on frozen features takes a large step size (a convex problem in the head)
    lr: float = 1e-2
    lr_grid: List[float] = field(default_factory=lambda: [3e-3, 1e-2, 3e-2])


class Method(BaseMethod):
    """Classification: only the ``cls_head_modules`` train. Language modelling: nothing trains."""

    name = NAME

    @property
    def saved_weights(self) -> str:  # type: ignore[override]
        """``head`` (the head tensors) for classification; ``none`` where nothing trains."""
        return "head" if self.trains() else "none"

    def trains(self) -> bool:
        return self.task == "classification"

    def validate(self) -> None:
        """Classification needs ``model.cls_head_modules``; a ``method.target_modules`` is refused (unused here)."""
        check_no_target_modules(self.cfg, "trains the task head only")
        if self.task == "classification" and not list(self.model_cfg.cls_head_modules or []):
            raise fail(
                f"method=head trains the classification head, but model '{self.model_cfg.name}' names none "
                "(model.cls_head_modules is empty)",
                "set model.cls_head_modules to the head's module names, e.g. [score] for Llama or "
                "[pre_classifier,classifier] for DistilBERT",
            )

    def head_names(self, model: Any) -> list[str]:
        """Full module names of the head: those whose name is, or ends with ``.``, an entry of ``cls_head_modules``."""
        wanted = list(self.model_cfg.cls_head_modules or [])
        return [n for n, _ in model.named_modules() if n and any(n == w or n.endswith("." + w) for w in wanted)]

    def adapt(self, model: Any) -> Any:
        """The base, frozen; for classification the head's parameters trainable (UserError if none matches)."""
        model.requires_grad_(False)
        if not self.trains():
            return model
        heads = self.head_names(model)
        if not heads:
            top = [n for n, _ in model.named_children()]
            raise fail(
                f"model.cls_head_modules={list(self.model_cfg.cls_head_modules)} matches no module of "
                f"{type(model).__name__} (its top-level modules: {top})",
                "set model.cls_head_modules to the names of the classification head's modules",
            )
        modules = dict(model.named_modules())
        for name in heads:
            modules[name].requires_grad_(True)
        return model

    def metrics(self, model: Any) -> dict[str, Any]:
        """``head_params``: trainable elements (the head's for classification, 0 otherwise)."""
        return {"head_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    def save_adapter(self, model: Any, folder: Any) -> None:
        """Classification: the trainable (head) tensors to ``folder/head.safetensors``. Otherwise an empty folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not self.trains():
            return
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(folder / HEAD_FILE), metadata={"method": NAME})

    def load_adapter(self, base_model: Any, folder: Any) -> Any:
        """``base_model`` (freshly loaded) with the saved head put in, in place; the base itself for LM tasks."""
        model = self.prepare_base(base_model)
        if not self.trains():
            return model
        from safetensors.torch import load_file

        path = Path(folder) / HEAD_FILE
        if not path.exists():
            raise fail(f"{path} does not exist", "point at a folder written by method=head on a classification run")
        state = load_file(str(path))
        params = dict(model.named_parameters())
        unknown = [n for n in state if n not in params]
        if unknown:
            raise fail(f"{path} does not match this base model (e.g. {unknown[:3]})",
                       "load it onto the base model it was trained with")  # fmt: skip
        import torch

        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        return model
