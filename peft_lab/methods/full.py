"""Full fine-tuning: the baseline every PEFT method is measured against.

Every weight of the base model trains (``requires_grad=True`` on all parameters, the
task head included); no adapter is added, and the model goes through the same loop,
evaluation and checkpoints as the adapter methods. This is the "full fine-tuning"
row of PEFT's method_comparison (its usual learning rates: 1e-5..1e-4, about a
decade below LoRA's).

Parameters are counted once per tensor: tied weights (SmolLM2's ``lm_head`` and
``embed_tokens``, DistilBERT's ``vocab_projector`` and word embeddings) are one
parameter, so ``trainable_params == total_params``. ``save_adapter`` writes the whole
model with ``save_pretrained`` (config + safetensors, the tied copy stored once);
``load_adapter`` loads those tensors back into a freshly loaded base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

from peft_lab.errors import fail
from peft_lab.methods.base import Method as BaseMethod
from peft_lab.methods.base import check_no_target_modules
from peft_lab.schemas import MethodConfig

NAME = "full"


@dataclass
class Config(MethodConfig):
    """Full fine-tuning's keys: only the learning rate (``target_modules`` does not apply)."""

    name: str = NAME
    # full fine-tuning's usual range (PEFT's method_comparison and most GLUE recipes: 1e-5..1e-4),
    # about a decade below LoRA's 5e-4
    lr: float = 5e-5
    lr_grid: List[float] = field(default_factory=lambda: [1.5e-5, 5e-5, 1.5e-4])


class Method(BaseMethod):
    """Trains every parameter of the base (backbone and task head); saves the whole model."""

    name = NAME
    saved_weights = "full_model"

    def validate(self) -> None:
        """No target modules needed; a ``method.target_modules`` is refused (it would be ignored)."""
        check_no_target_modules(self.cfg, "trains every weight")

    def adapt(self, model: Any) -> Any:
        """The base itself with every parameter trainable (a 4/8-bit base is refused: it cannot train in full)."""
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            raise fail(
                "method=full cannot train a quantised (4/8-bit) base",
                "load the base unquantised (method=full loads it so), or use method=qlora",
            )
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save_adapter(self, model: Any, folder: Any) -> None:
        """The whole model, ``save_pretrained`` (config.json + model.safetensors; tied tensors once)."""
        model.save_pretrained(folder)

    def load_adapter(self, base_model: Any, folder: Any) -> Any:
        """``base_model`` (freshly loaded, same class) with every tensor of ``folder`` loaded into it, in place.

        Raises UserError when the folder holds no weights or they do not match the base: a tensor
        the base lacks, or a base tensor absent from the folder that is not tied to one loaded.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise fail(f"{folder} holds no *.safetensors weights", "point at a folder written by method=full")
        state: dict[str, Any] = {}
        for f in files:  # one file, or the shards of a large model
            state.update(load_file(str(f)))
        model = self.prepare_base(base_model)
        result = model.load_state_dict(state, strict=False)
        _check_loaded(model, state, result, folder)
        return model


def _check_loaded(model: Any, state: dict, result: Any, folder: Path) -> None:
    """Unexpected keys are an error; missing keys are fine only when tied to a loaded tensor
    (``save_pretrained`` stores a tied weight once, e.g. ``lm_head.weight`` = ``embed_tokens.weight``)."""
    by_tensor: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), set()).add(name)
    current = model.state_dict(keep_vars=True)
    untied = [k for k in result.missing_keys if not (by_tensor[id(current[k])] & state.keys())]
    if result.unexpected_keys or untied:
        raise fail(
            f"{folder} does not match this base model (unexpected {sorted(result.unexpected_keys)[:3]}, "
            f"missing {untied[:3]})",
            "load it onto the base model and task it was trained with",
        )
