"""QLoRA (Dettmers et al., 2023): a frozen 4-bit NF4 base (double quantisation) + LoRA.

bitsandbytes quantises every linear layer except the heads the model config keeps
(``keep_unquantised``); ``prepare_model_for_kbit_training`` readies it for training;
LoRA goes on top. The paged AdamW absorbs memory spikes on CUDA; on CPU (where
paging does not exist) a plain AdamW is used and the log says so once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from peft_lab.methods import lora
from peft_lab.schemas import Choice, Precision, plain

log = logging.getLogger(__name__)
NAME = "qlora"


class QuantType(Choice):
    """``method.quant_type``: bitsandbytes' 4-bit data type."""

    nf4 = "nf4"  # NormalFloat4 (QLoRA)
    fp4 = "fp4"


class PagedOptimizer(Choice):
    """``method.paged_optimizer``: bitsandbytes' paged AdamW (CUDA only; CPU uses torch AdamW)."""

    paged_adamw_32bit = "paged_adamw_32bit"
    paged_adamw_8bit = "paged_adamw_8bit"


@dataclass
class Config(lora.Config):
    """QLoRA's own keys; the LoRA keys and their defaults come from ``lora.Config``."""

    name: str = NAME
    quant_type: QuantType = QuantType.nf4
    double_quant: bool = True
    compute_dtype: Precision = Precision.auto  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    paged_optimizer: PagedOptimizer = PagedOptimizer.paged_adamw_32bit  # CUDA only
    cpu_fast_eval: bool = False  # bitsandbytes' AVX512-BF16 repack for CPU evaluation (see _guard_cpu_repack)


class Method(lora.Method):
    name = NAME

    def validate(self) -> None:
        super().validate()
        from peft_lab.errors import fail

        if self.cfg.quant_type not in ("nf4", "fp4"):
            raise fail(f"method.quant_type={self.cfg.quant_type}", "use nf4 (QLoRA) or fp4")
        if self.cfg.paged_optimizer not in ("paged_adamw_32bit", "paged_adamw_8bit"):
            raise fail(
                f"method.paged_optimizer={self.cfg.paged_optimizer}", "use paged_adamw_32bit or paged_adamw_8bit"
            )

    def compute_dtype(self, device: str) -> Any:
        import torch

        name = plain(self.cfg.compute_dtype)
        if name == "auto":
            name = "bf16" if device.startswith("cuda") else "fp32"
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]

    def load_kwargs(self, device: str) -> dict[str, Any]:
        return four_bit_load_kwargs(
            plain(self.cfg.quant_type), self.cfg.double_quant, self.compute_dtype(device), self.model_cfg, device
        )

    def adapt(self, model: Any) -> Any:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.cfg.gradient_checkpointing)
        self._model = super().adapt(model)
        return self._model

    def prepare_base(self, model: Any) -> Any:
        _guard_cpu_repack(model, self.cfg.cpu_fast_eval)
        return model

    def before_forward(
        self, batch: dict, step: int, total: int, training: bool, shared: bool = False, padding: bool = False
    ) -> None:
        # bitsandbytes repacks CPU weights for AVX512-BF16 inference during an evaluation; its packed
        # kernel has no autograd, so gradients would silently stop at every 4-bit layer. Unpack first.
        if not training:
            self._maybe_packed = True
        elif getattr(self, "_maybe_packed", False):
            self._maybe_packed = False
            unpack_cpu_weights(self._model)

    def optimizer_class(self, device: str) -> tuple[Any, str]:
        name = plain(self.cfg.paged_optimizer)
        if device.startswith("cuda"):
            import bitsandbytes as bnb

            cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
            return cls[name], name
        log.warning(f"QLoRA on CPU: {name} needs CUDA (paged memory); using torch.optim.AdamW")
        return super().optimizer_class(device)

    def metrics(self, model: Any) -> dict[str, Any]:
        return quantisation_report(model)


def _guard_cpu_repack(model: Any, fast_eval: bool) -> None:
    """bitsandbytes repacks 4-bit weights for an AVX512-BF16 CPU kernel under eval + no_grad.
    That kernel (1) needs in_features % 64 == 0 and out_features % 32 == 0, else the layer
    breaks for good; (2) has no autograd, so training after an evaluation must unpack first
    (``unpack_cpu_weights``); (3) stores absmax in bf16, so the pack/unpack round trip rounds
    the base weights once (outputs move by ~1e-3). By default the repack is off (exact and
    consistent); ``method.cpu_fast_eval=true`` turns it on for layers whose dims allow it."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            fits = module.in_features % 64 == 0 and module.out_features % 32 == 0
            module.support_avx512bf16_for_cpu = bool(module.support_avx512bf16_for_cpu and fast_eval and fits)


def unpack_cpu_weights(model: Any) -> int:
    """Undo bitsandbytes' inference-only CPU repack (as its own state-dict saving does); returns layers unpacked."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(
            module.weight.quant_state, "packing_format_for_cpu", False
        ):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, module.weight.quant_state
            )
            n += 1
    return n


def quantisation_report(model: Any) -> dict[str, Any]:
    """How the linear layers are stored: 4-bit count, quant type, double quantisation, bytes."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter_parts = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                adapter_parts.update(id(m) for m in getattr(module, layer_name).modules())
    n4, nfull, bytes4, bytes_bf16 = 0, 0, 0, 0
    quant_types, double, code_tables = set(), set(), set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            n4 += 1
            w = module.weight
            qs = w.quant_state
            bytes4 += w.numel() * w.element_size() + _quant_state_bytes(qs, code_tables)
            bytes_bf16 += module.in_features * module.out_features * 2
            quant_types.add(qs.quant_type)
            double.add(bool(qs.nested))
        elif isinstance(module, torch.nn.Linear) and id(module) not in adapter_parts:
            nfull += 1
    return {
        "quant_linear_layers": n4,
        "full_precision_linear_layers": nfull,
        "quant_type": ",".join(sorted(quant_types)),
        "double_quant": all(double) if double else False,
        "quant_linear_weight_bytes": bytes4,
        "quant_linear_bf16_bytes": bytes_bf16,
        "quant_linear_bytes_ratio_vs_bf16": bytes4 / bytes_bf16 if bytes_bf16 else None,
    }


def _quant_state_bytes(qs: Any, code_tables: set) -> int:
    """absmax per 64-weight block (8-bit under double quantisation) + its fp32 absmax per 256 blocks;
    the 256-entry dequantisation table is the same for every layer and counted once."""
    total = qs.absmax.numel() * qs.absmax.element_size()
    if qs.nested:
        total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        table = tuple(qs.state2.code.flatten().tolist())
        if table not in code_tables:
            code_tables.add(table)
            total += qs.state2.code.numel() * qs.state2.code.element_size()
    return total


def four_bit_load_kwargs(quant_type: str, double_quant: bool, compute_dtype: Any, model_cfg: Any, device: str) -> dict:
    """``from_pretrained`` kwargs that load the base in 4-bit (bitsandbytes ``quant_type`` nf4 / fp4, double
    quantisation or not, matmuls in ``compute_dtype``), ``model_cfg.keep_unquantised`` left in full precision,
    placed on ``device`` when it is a CUDA device. Shared by ``qlora`` and the generic methods' ``quantize``."""
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(model_cfg.keep_unquantised) or None,
    )
    kwargs: dict[str, Any] = {"quantization_config": quant}
    if device.startswith("cuda"):
        kwargs["device_map"] = {"": device if ":" in device else 0}
    return kwargs
