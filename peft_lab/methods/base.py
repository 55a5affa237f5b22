"""What every method provides to the training loop.

A method is built from its config, the model config and the effective task
(classification, causal_lm or masked_lm). Start-up checks run in ``validate``
before any data or weights are loaded, so impossible combinations fail at once.
"""

from __future__ import annotations

from typing import Any

from peft_lab.errors import fail

# PEFT task types by our task names; masked LM has none (a plain PeftModel).
PEFT_TASK_TYPE = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "masked_lm": None}


class Method:
    """The contract between a method and the pipeline (``peft_lab.run``) and loop (``peft_lab.training``).

    Call order in a run: ``validate`` -> ``load_kwargs`` -> (model loaded) -> ``prepare_base`` ->
    ``adapt`` -> for each optimizer step: per micro-batch ``before_forward`` + forward, then once
    ``extra_loss``, the optimizer step and ``after_optimizer_step`` -> ``metrics`` -> ``save_adapter``. ``state_dict`` /
    ``load_state_dict`` go into and come out of every checkpoint. Errors a user can fix are
    ``peft_lab.errors.UserError`` (``fail(problem, fix)``), raised as early as possible.

    Args:
        cfg: the ``method`` config node (this method's ``Config`` dataclass, composed).
        model_cfg: the ``model`` config node.
        task: the effective task: ``classification``, ``causal_lm`` or ``masked_lm``.
    """

    name = "base"
    # what ``save_adapter`` writes, recorded as ``saved_weights``: adapter | head | full_model
    saved_weights = "adapter"

    def __init__(self, cfg: Any, model_cfg: Any, task: str) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.task = task

    # -- start-up -----------------------------------------------------------
    def validate(self) -> None:
        """Start-up checks that need no weights (runs before torch is imported). Raises UserError."""
        check_lr(self.cfg.lr)
        self.target_modules()

    def check_overrides(self, overrides: list[str]) -> None:
        """Refuse command-line overrides (Hydra's ``key=value`` strings) that Hydra would apply other than the user
        means, e.g. a mapping merged into a preset's mapping. Raises UserError."""

    def target_modules(self) -> list[str]:
        """Method override, else the model's per-method list, else its default list."""
        targets = self.cfg.target_modules
        if targets is None:
            targets = self.model_cfg.method_target_modules.get(self.name)
        if targets is None:
            targets = self.model_cfg.target_modules
        targets = list(targets or [])
        if not targets:
            raise fail(
                f"method '{self.name}' has no target modules for model '{self.model_cfg.name}'",
                "list the linear layers to adapt, e.g. model.target_modules=[q_proj,v_proj] "
                "or method.target_modules=[...]",
            )
        return targets

    def modules_to_save(self) -> list[str] | None:
        """Task heads trained in full and saved with the adapter (classification)."""
        if self.task == "classification":
            return list(self.model_cfg.cls_head_modules) or None
        return None

    def peft_task_type(self) -> str | None:
        return PEFT_TASK_TYPE[self.task]

    def trains(self) -> bool:
        """False when this method trains nothing for ``self.task`` (e.g. ``head`` on a language-modelling
        dataset: the zero-shot row). The pipeline then skips the loop and evaluates the base as it is,
        and a learning-rate protocol runs a single grid point."""
        return True

    # -- model --------------------------------------------------------------
    def load_kwargs(self, device: str) -> dict[str, Any]:
        """Extra ``from_pretrained`` kwargs for ``device`` ("cpu", "cuda", "cuda:1"), e.g. a quantisation config."""
        return {}

    def prepare_base(self, model: Any) -> Any:
        """Called on the freshly loaded base model, before anything runs through it."""
        return model

    def adapt(self, model: Any) -> Any:
        """Return the trainable model: adapter layers added, everything else frozen (``requires_grad``
        False), task heads in ``modules_to_save`` trainable. Raises UserError when targets do not match."""
        raise NotImplementedError

    # -- training hooks -----------------------------------------------------
    def before_forward(
        self, batch: dict, step: int, total: int, training: bool, shared: bool = False, padding: bool = False
    ) -> None:
        """Called with each micro-batch before its forward pass, in training and in evaluation.

        ``batch``: ``input_ids`` / ``attention_mask`` (long, [batch, seq]) and ``labels`` ([batch] class ids,
        or [batch, seq] token ids with -100 where nothing is predicted), already on the device.
        ``step``: optimizer steps done so far (0-based); ``total``: planned steps (1 in evaluation).
        ``shared``: several ranks compute rows of one global micro-batch (``peft_lab.distributed``), each
        ``batch`` being this rank's rows, and every rank runs this forward: a choice made per batch must be
        made over the global batch (collectives in the forward are allowed). ``padding``: this rank has
        no row of the micro-batch; ``batch`` is a stand-in that must not count (its loss is not used)."""

    def eval_modes(self) -> list[str]:
        """Names of the ways this method can evaluate, the main one first (e.g. SparseLoRA on classification:
        ``["dense", "sparse"]``); empty when there is one way. The pipeline evaluates the test split in every
        mode and records ``test["<metric>_<mode>"]``."""
        return []

    def eval_mode(self, mode: str) -> Any:
        """A context manager under which evaluation runs in ``mode`` (one of ``eval_modes()``)."""
        import contextlib

        return contextlib.nullcontext()

    def extra_loss(self, model: Any) -> Any:
        """A scalar tensor added to the loss once per optimizer step (e.g. an L1 penalty), or None."""
        return None

    def after_optimizer_step(self, model: Any, step: int, total_steps: int) -> None:
        """Called after each optimizer step; ``step`` is 1-based (steps done), ``total_steps`` the plan."""

    def optimizer_class(self, device: str) -> tuple[Any, str]:
        """(optimizer class taking ``(params, lr=, weight_decay=)``, its name for the log)."""
        import torch

        return torch.optim.AdamW, "adamw"

    def metrics(self, model: Any) -> dict[str, Any]:
        """What the method reports about itself (JSON values), stored as ``method_metrics`` in metrics.json."""
        return {}

    def save_adapter(self, model: Any, folder: Any) -> None:
        """Write the trained adapter to ``folder`` so that ``load_adapter`` rebuilds the same outputs."""
        model.save_pretrained(folder)

    def load_adapter(self, base_model: Any, folder: Any) -> Any:
        """The inverse of ``save_adapter``: a PeftModel on ``base_model``."""
        from peft import PeftModel

        return PeftModel.from_pretrained(self.prepare_base(base_model), str(folder))

    def state_dict(self) -> dict[str, Any]:
        """Method state that a resumed run needs (e.g. pruning masks)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check_no_target_modules(cfg: Any, what: str) -> None:
    """For a method that adapts no linear layers (``full``, ``head``): the learning rate is checked, and a
    ``method.target_modules`` given anyway is refused (it would be ignored). Raises UserError."""
    check_lr(cfg.lr)
    if cfg.target_modules:
        raise fail(
            f"method.target_modules={list(cfg.target_modules)} does not apply: method={cfg.name} {what}",
            "drop method.target_modules",
        )


def check_lr(lr: float) -> None:
    """A learning rate must be a positive finite number (``method.lr``); raises UserError."""
    import math

    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise fail(f"method.lr={lr} is not a positive learning rate", "give a number > 0, e.g. method.lr=5e-4")


def make_peft_model(model: Any, peft_config: Any) -> Any:
    """``get_peft_model`` with PEFT's target-matching errors turned into a user message."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:  # NoMatchingPeftModuleError and "Target modules ... not found" are ValueErrors
        text = str(err)
        if "not found in the base model" not in text and "No modules were targeted" not in text:
            raise
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise fail(
            f"target modules {sorted(peft_config.target_modules)} not found in the model (its linear layers: {linear})",
            "set model.target_modules (or method.target_modules) to linear layer names that exist in this architecture",
        ) from None
