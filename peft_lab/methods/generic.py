"""Any PEFT method as one YAML: the YAML names a PEFT method and its config's keyword arguments.

A generic method is a file ``conf/method/<name>.yaml`` built on this module's schema
(``defaults: [base_generic, _self_]``). The registry (``peft_lab.methods``) finds it by that line,
so adding one needs no Python. The keys mirror PEFT's own ``adapter_config.json``:

``name``
    the method's name, ``method=<name>`` (the file's name).
``peft_type``
    the PEFT method as PEFT names it in ``adapter_config.json`` (``LORA``, ``VERA``, ``ADALORA``,
    ``LOHA``, ``LOKR``, ``OFT``, ``IA3``, ``SHIRA``, ...: any ``peft.PeftType`` that adapts layers), or
    its config class's name (``LoraConfig``).
``config``
    that config class's keyword arguments under PEFT's own names (``r``, ``lora_alpha``, ``use_dora``,
    ``init_lora_weights``, ...). On the command line: ``method.config.r=16`` changes one,
    ``+method.config.use_rslora=true`` adds one. Unknown names and wrongly typed values fail at
    start-up. The framework sets, and ``config`` may not: ``target_modules`` (``method.target_modules``
    below), ``modules_to_save`` (the model's classification heads, ``model.cls_head_modules``),
    ``task_type`` (from the dataset's task), ``peft_type``, ``inference_mode``, ``base_model_name_or_path``
    and ``revision``.
``target_modules``
    as for every method: null takes ``model.method_target_modules[<name>]``, then ``model.target_modules``.
``target_modules_from``
    ``model`` (the rule above) or ``peft``: PEFT's own per-architecture default for the method, used when
    ``target_modules`` is null (IA3: keys, values and the feed-forward down projection). A model type PEFT
    has no default for fails with the fix.
``quantize``
    null (the base in full precision) or ``nf4`` / ``fp4``: the frozen base loaded in 4-bit with double
    quantisation, as ``method=qlora`` loads it (classification heads and ``model.keep_unquantised`` stay
    full precision; compute in bf16 on CUDA, fp32 on CPU), the method's 4-bit layers on top (QDoRA, ...).
    A PEFT method without bitsandbytes 4-bit layers fails at start-up.
``lr``, ``lr_grid``
    as for every method: each YAML says where its values come from.

AdaLoRA (``peft_type: ADALORA``) takes its schedule from the run: a null ``total_step`` is the run's
planned optimizer steps, and ``tinit`` / ``tfinal`` written as fractions (a float below 1) are that share
of ``total_step``. ``update_and_allocate`` runs after every optimizer step (``after_optimizer_step``), on
the gradients of that step. Its orthogonality regulariser is added to the loss by PEFT's model wrapper
for classification and causal LM; a masked-LM run (no PEFT task type, so no wrapper) adds it through
``extra_loss``.

Everything else is PEFT's: ``get_peft_model`` applies the config, ``save_pretrained`` /
``PeftModel.from_pretrained`` save and reload the adapter, and PEFT's own refusals (a layer type, a
shape, an initialisation it cannot do on 4-bit weights) become start-up errors naming the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING

from peft_lab.errors import fail
from peft_lab.methods.base import Method as BaseMethod
from peft_lab.methods.base import check_lr, make_peft_model
from peft_lab.methods.qlora import QuantType
from peft_lab.schemas import Choice, MethodConfig, plain

log = logging.getLogger(__name__)
NAME = "generic"
ADAPTER = "default"  # PEFT's adapter name

# keys of a PEFT config that the framework sets: where a user sets each instead
RESERVED = {
    "target_modules": "method.target_modules=[...] (or method.target_modules_from=peft)",
    "modules_to_save": "the model's heads: model.cls_head_modules",
    "task_type": "nothing: it follows the dataset's task",
    "peft_type": "method.peft_type",
    "inference_mode": "nothing: training sets it",
    "base_model_name_or_path": "nothing: the model config names the base",
    "revision": "nothing: the model config names the base",
}
# AdaLoRA's step counts that may be written as a fraction of total_step
ADALORA_FRACTION_KEYS = ("tinit", "tfinal")


class TargetsFrom(Choice):
    """``method.target_modules_from``: who chooses the adapted layers when ``method.target_modules`` is null."""

    model = "model"  # model.method_target_modules[<name>], then model.target_modules
    peft = "peft"  # PEFT's per-architecture default for the method


@dataclass
class Config(MethodConfig):
    """The generic method's keys (see the module docstring); each ``conf/method/<name>.yaml`` sets them."""

    peft_type: str = MISSING  # LORA, VERA, ADALORA, ... or a config class name (LoraConfig)
    config: Dict[str, Any] = field(default_factory=dict)  # the PEFT config's keyword arguments
    target_modules_from: TargetsFrom = TargetsFrom.model
    quantize: Optional[QuantType] = None  # nf4 | fp4: a 4-bit frozen base (as qlora); null: full precision


class Method(BaseMethod):
    name = NAME

    def __init__(self, cfg: Any, model_cfg: Any, task: str) -> None:
        super().__init__(cfg, model_cfg, task)
        self.name = str(cfg.name)  # the YAML's name: model.method_target_modules is keyed by it
        self._model: Any = None
        self._grads: dict[str, Any] = {}  # AdaLoRA: each adapter parameter's gradient of the last step
        self._planned: Optional[int] = None  # AdaLoRA: the run's planned steps, once the schedule is set
        self._cls: Optional[type] = None

    # -- start-up -----------------------------------------------------------
    def validate(self) -> None:
        check_lr(self.cfg.lr)
        cls = self.config_class()
        if not self._peft_targets():
            self.target_modules()
        if self.cfg.quantize is not None:
            _check_4bit_layers(cls, self.cfg.peft_type)
        self.peft_config()  # PEFT's own checks of the values, before any weights load

    def config_class(self) -> type:
        if self._cls is None:
            self._cls = peft_config_class(str(self.cfg.peft_type))
        return self._cls

    def is_adalora(self) -> bool:
        return self.config_class().__name__ == "AdaLoraConfig"

    def _peft_targets(self) -> bool:
        """True when PEFT chooses the target modules (``target_modules_from=peft`` and none given)."""
        return self.cfg.target_modules is None and self.cfg.target_modules_from == "peft"

    def peft_kwargs(self, total: Optional[int] = None) -> dict[str, Any]:
        """``method.config`` as checked keyword arguments of the config class. AdaLoRA: the schedule for a run of
        ``total`` planned steps (None: not known yet; a stand-in that passes PEFT's checks). Raises UserError."""
        from omegaconf import DictConfig, OmegaConf

        cls = self.config_class()
        raw = self.cfg.config
        kwargs = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw or {})
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in kwargs:
            if key in RESERVED:
                raise fail(f"method.config.{key} is set by peft_lab", f"drop it; set {RESERVED[key]}")
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=3)
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                raise fail(
                    f"method.config.{key} is not an argument of peft.{cls.__name__} (peft {_peft_version()})",
                    f"{hint}use its arguments: {sorted(k for k in fields if k not in RESERVED)}",
                )
        if cls.__name__ == "AdaLoraConfig":
            kwargs = adalora_schedule(kwargs, total)
        hints = _type_hints(cls)
        for key, value in kwargs.items():
            if key in hints and not _type_ok(value, hints[key]):
                raise fail(
                    f"method.config.{key}={value!r} is not a valid {cls.__name__}.{key} ({_type_name(hints[key])})",
                    f"give method.config.{key} a value of that type",
                )
        return kwargs

    def peft_config(self, total: Optional[int] = None) -> Any:
        """The PEFT config this method applies (PEFT's own checks turned into UserError)."""
        cls = self.config_class()
        kwargs = self.peft_kwargs(total)
        names = {f.name for f in dataclasses.fields(cls)}
        heads = self.modules_to_save()
        if heads and "modules_to_save" not in names:
            raise fail(
                f"peft.{cls.__name__} cannot train a classification head (no modules_to_save)",
                "use this method on a language-modelling dataset, or another method for classification",
            )
        extra: dict[str, Any] = {"task_type": self.peft_task_type()}
        extra["target_modules"] = None if self._peft_targets() else self.target_modules()
        if heads:
            extra["modules_to_save"] = heads
        try:
            return cls(**kwargs, **extra)
        except (ValueError, TypeError) as err:
            raise fail(
                f"peft.{cls.__name__} refuses method.config {kwargs}: {_first_line(err)}",
                "change the method.config values PEFT names",
            ) from None

    # -- model --------------------------------------------------------------
    def load_kwargs(self, device: str) -> dict[str, Any]:
        if self.cfg.quantize is None:
            return {}
        import torch

        from peft_lab.methods.qlora import four_bit_load_kwargs

        compute = torch.bfloat16 if device.startswith("cuda") else torch.float32  # as qlora's compute_dtype auto
        return four_bit_load_kwargs(plain(self.cfg.quantize), True, compute, self.model_cfg, device)

    def prepare_base(self, model: Any) -> Any:
        if self.cfg.quantize is not None:
            from peft_lab.methods.qlora import _guard_cpu_repack

            _guard_cpu_repack(model, fast_eval=False)  # exact and trainable after evaluation (see qlora)
        return model

    def adapt(self, model: Any) -> Any:
        if self.cfg.quantize is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = self.peft_config()
        try:
            self._model = make_peft_model(model, config)
        except (ValueError, TypeError, NotImplementedError) as err:
            raise fail(
                f"PEFT cannot apply peft.{type(config).__name__} (method={self.name}) to this model "
                f"({_model_type(model)}{', 4-bit weights' if self.cfg.quantize is not None else ''}): "
                f"{_first_line(err)}",
                _cannot_apply_fix(self, err),
            ) from None
        if self.is_adalora():
            self._stash_gradients(self._model)
        return self._model

    # -- AdaLoRA --------------------------------------------------------------
    def _stash_gradients(self, model: Any) -> None:
        """AdaLoRA scores each weight by |w * grad| after the optimizer step; the loop has zeroed the gradients
        by then (``after_optimizer_step``), so each adapter parameter's accumulated gradient is kept here."""
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" in name and ADAPTER in name:

                def keep(param: Any, name: str = name) -> None:
                    self._grads[name] = param.grad

                p.register_post_accumulate_grad_hook(keep)

    def before_forward(
        self, batch: dict, step: int, total: int, training: bool, shared: bool = False, padding: bool = False
    ) -> None:
        if training and self._planned != total and self.is_adalora() and self._model is not None:
            self._set_schedule(total)

    def _set_schedule(self, total: int) -> None:
        """AdaLoRA's total_step (and fractional tinit / tfinal) from the run's ``total`` planned steps."""
        kwargs = self.peft_kwargs(total)
        config = self._model.peft_config[ADAPTER]
        allocator = self._model.base_model.rankallocator
        for key in ("total_step", *ADALORA_FRACTION_KEYS):
            setattr(config, key, kwargs[key])
            setattr(allocator.peft_config, key, kwargs[key])
        self._planned = total
        log.info(
            f"AdaLoRA schedule: total_step {config.total_step}, tinit {config.tinit}, tfinal {config.tfinal}, "
            f"ranks {config.init_r} -> {config.target_r} on average"
        )

    def after_optimizer_step(self, model: Any, step: int, total_steps: int) -> None:
        if not self.is_adalora():
            return
        import torch

        params = dict(model.named_parameters())
        for name in list(self._grads):
            params[name].grad = self._grads[name]
        for name, p in params.items():  # a parameter that saw no gradient counts as zeros
            if p.requires_grad and "lora_" in name and ADAPTER in name and p.grad is None:
                p.grad = torch.zeros_like(p)
        try:
            model.base_model.update_and_allocate(step - 1)  # PEFT counts steps from 0
        finally:
            for name, p in params.items():
                if "lora_" in name and ADAPTER in name:
                    p.grad = None
            self._grads = {}

    def extra_loss(self, model: Any) -> Any:
        if self.peft_task_type() is None and self.is_adalora():  # no PEFT wrapper adds it: masked LM
            return adalora_orth_reg(model)
        return None

    # -- reporting and state ----------------------------------------------------
    def metrics(self, model: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"peft_type": _peft_type_name(self.config_class())}
        if self.is_adalora() and hasattr(model, "peft_config"):
            pattern = model.peft_config[ADAPTER].rank_pattern
            if pattern:
                ranks = [int(sum(v)) for v in pattern.values()]
                out["adalora_mean_rank"] = sum(ranks) / len(ranks)
                out["adalora_ranks"] = ranks
        if self.cfg.quantize is not None:
            from peft_lab.methods.qlora import quantisation_report

            out.update(quantisation_report(model))
        return out

    def state_dict(self) -> dict[str, Any]:
        if not self.is_adalora() or self._model is None:
            return {}
        allocator = self._model.base_model.rankallocator

        def cpu(d: dict) -> dict:
            return {k: v.detach().cpu() for k, v in d.items()}

        return {
            "ipt": cpu(allocator.ipt),
            "exp_avg_ipt": cpu(allocator.exp_avg_ipt),
            "exp_avg_unc": cpu(allocator.exp_avg_unc),
            "rank_pattern": self._model.peft_config[ADAPTER].rank_pattern,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or self._model is None:
            return
        allocator = self._model.base_model.rankallocator
        device = next(p.device for p in self._model.parameters())
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {k: v.to(device) for k, v in state.get(key, {}).items()})
        self._model.peft_config[ADAPTER].rank_pattern = state.get("rank_pattern")


# ----------------------------------------------------------------------------- helpers


def peft_config_class(peft_type: str) -> type:
    """The PEFT config class that ``method.peft_type`` names (a ``PeftType`` such as ``LORA``, or a class name
    such as ``LoraConfig``, any case). Raises UserError for an unknown name or a method that adapts no layers."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.config import PromptLearningConfig

    by_name: dict[str, type] = {}
    for peft_t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        by_name[str(getattr(peft_t, "value", peft_t)).upper()] = cls
        by_name[cls.__name__.upper()] = cls
    cls = by_name.get(peft_type.upper())
    if cls is None:
        types = sorted(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING)
        raise fail(
            f"method.peft_type={peft_type} is not a PEFT method (peft {_peft_version()})",
            f"use one of {types} or a config class name such as LoraConfig",
        )
    names = {f.name for f in dataclasses.fields(cls)}
    if issubclass(cls, PromptLearningConfig) or "target_modules" not in names or cls.__name__ == "AdaptionPromptConfig":
        raise fail(
            f"method.peft_type={peft_type}: peft.{cls.__name__} adds prompts or tokens, not layers, and the "
            "generic method adapts layers",
            "choose a PEFT method that adapts target modules (LORA, VERA, ADALORA, LOHA, LOKR, OFT, IA3, SHIRA, ...)",
        )
    return cls


def adalora_schedule(kwargs: dict[str, Any], total: Optional[int]) -> dict[str, Any]:
    """AdaLoRA's ``total_step`` / ``tinit`` / ``tfinal`` for a run of ``total`` planned steps: a null
    ``total_step`` is ``total``; a float ``tinit`` / ``tfinal`` in [0, 1) is that share of ``total_step``.
    ``total`` None: not known yet (start-up), a stand-in that keeps PEFT's own checks meaningful."""
    out = dict(kwargs)
    for key in ADALORA_FRACTION_KEYS:
        v = out.get(key)
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            raise fail(
                f"method.config.{key}={v} is neither a step count (an integer) nor a fraction of the run in [0, 1)",
                f"give e.g. method.config.{key}=0.1 (10 % of the steps) or a number of steps",
            )
    known = out.get("total_step") is not None or total is not None
    if out.get("total_step") is None:
        steps = [v for k, v in out.items() if k in ADALORA_FRACTION_KEYS and isinstance(v, int)]
        out["total_step"] = total if total is not None else max(1000, sum(steps) + 1)
    for key in ADALORA_FRACTION_KEYS:
        if isinstance(out.get(key), float):
            out[key] = round(out[key] * out["total_step"])
    tinit, tfinal, steps = out.get("tinit", 0), out.get("tfinal", 0), out["total_step"]
    if known and isinstance(tinit, int) and isinstance(tfinal, int) and tinit >= steps - tfinal:
        raise fail(
            f"AdaLoRA's schedule leaves no budgeting phase: tinit {tinit} >= total_step {steps} - tfinal {tfinal}",
            "lower method.config.tinit / tfinal (fractions such as 0.1 follow the run's length) or train longer",
        )
    return out


def adalora_orth_reg(model: Any) -> Any:
    """AdaLoRA's orthogonality regulariser, as PEFT's ``AdaLoraModel.forward`` adds it to a model's loss:
    ``orth_reg_weight`` x the mean over the A and B factors of ||P P^T - I||_F (A) / ||P^T P - I||_F (B)."""
    import torch

    weight = model.peft_config[ADAPTER].orth_reg_weight
    terms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and ADAPTER in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype), p="fro"))
    if not terms or weight == 0:
        return None
    return weight * torch.stack(terms).mean()


def _check_4bit_layers(cls: type, peft_type: str) -> None:
    """PEFT applies a method to bitsandbytes 4-bit weights only where its tuner package has 4-bit layers."""
    import importlib

    package = cls.__module__.rsplit(".", 1)[0]
    try:
        bnb_layers = importlib.import_module(f"{package}.bnb")
    except ImportError:
        bnb_layers = None
    if bnb_layers is None or not any(n.endswith("4bit") for n in dir(bnb_layers)):
        raise fail(
            f"method.quantize: PEFT {_peft_version()} has no 4-bit (bitsandbytes) layers for "
            f"method.peft_type={peft_type} (peft.{cls.__name__})",
            "set method.quantize=null (a full-precision base), or use a method with 4-bit layers "
            "(LORA and its variants such as DoRA, ADALORA, IA3, HIRA)",
        )


def _cannot_apply_fix(method: Method, err: Exception) -> str:
    text = str(err)
    if "target_modules" in text or "feedforward_modules" in text:
        return (
            "name the layers: method.target_modules=[...] (and, for IA3, +method.config.feedforward_modules=[...], "
            "a subset of them)"
        )
    if method.cfg.quantize is not None:
        return "set method.quantize=null (a full-precision base), or choose a method PEFT applies to 4-bit weights"
    return "choose target modules, settings or a method that PEFT supports for this model (its message above)"


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a hint PEFT cannot resolve itself: no type check
        return {}


def _type_ok(value: Any, hint: Any) -> bool:
    """A loose check of a YAML value against a PEFT config field's type hint (unknown hints pass)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(_type_ok(value, a) for a in args)
    if origin is typing.Literal:
        return value in args or any(isinstance(a, str) for a in args) and isinstance(value, str)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple, set) or origin in (list, tuple, set):
        return isinstance(value, (list, tuple))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].rstrip(".")


def _model_type(model: Any) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", type(model).__name__))


def _peft_type_name(cls: type) -> str:
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    for peft_t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        if c is cls:
            return str(getattr(peft_t, "value", peft_t))
    return cls.__name__


def _peft_version() -> str:
    from importlib import metadata

    return metadata.version("peft")
