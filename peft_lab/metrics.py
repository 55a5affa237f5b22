"""What a run measures about itself: parameters, memory, sizes, versions (written by ``peft_lab.runfiles``)."""

from __future__ import annotations

import math
import platform
import resource
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = [
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "hydra-core",
    "omegaconf",
    "wandb",
]


def count_parameters(model: Any) -> dict[str, Any]:
    """Parameter counts found by walking modules: adapter layers and saved heads by type, not by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    total = trainable = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    adapter = head = 0
    seen: set[int] = set()  # each adapter parameter once (PEFT lists DoRA's lora_magnitude_vector twice)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                for sub in getattr(module, layer_name).values():
                    for p in sub.parameters() if hasattr(sub, "parameters") else [sub]:
                        if p.requires_grad and id(p) not in seen:
                            seen.add(id(p))
                            adapter += _numel(p)
        elif isinstance(module, ModulesToSaveWrapper):
            head += sum(_numel(p) for p in module.modules_to_save.parameters() if p.requires_grad)
    # A saved head sits twice in the adapted model (frozen original + trainable copy that replaces it).
    base_total = total - head - adapter
    return {
        "total_params": base_total + adapter,
        "base_params": base_total,
        "trainable_params": trainable,
        "adapter_params": adapter,
        "head_params": head,
        "trainable_pct": 100.0 * trainable / max(1, base_total + adapter),
    }


def _numel(p: Any) -> int:
    """True element count, also for bitsandbytes 4-bit weights (stored packed, two per byte)."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return p.numel()


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def reset_peak_memory(device: str) -> None:
    """CUDA: reset the allocator's peak. CPU (Linux): reset the process's peak RSS (VmHWM, via
    /proc/self/clear_refs), so the peak covers what follows (training), not model loading."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory(device: str) -> dict[str, Any]:
    """CUDA peak allocated since the reset, or this process's peak RSS since the reset on CPU
    (Linux; elsewhere the peak RSS of the whole process)."""
    if device.startswith("cuda"):
        import torch

        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda_max_allocated"}
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return {"peak_memory_bytes": hwm, "peak_memory_kind": "process_peak_rss_since_model_load"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": int(rss_kib) * 1024, "peak_memory_kind": "process_peak_rss"}


def environment() -> dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["python"] = platform.python_version()
    return {"versions": versions, "git_commit": git_commit(), "host": platform.node()}


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def process_start_time() -> float | None:
    """When this process started (epoch seconds), from /proc on Linux; None elsewhere."""
    from peft_lab.runfiles import process_started_at

    return process_started_at("self")
