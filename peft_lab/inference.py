"""What a trained model costs at inference: latency per example with the adapter as trained (unmerged) and after
PEFT's ``merge_and_unload``, whether the merged model computes the same outputs, and both footprints.

Measured at the end of every run (``train.inference.measure``, on by default) rather than in ``peft_lab.bench``:
the unmerged cost depends on what training left (AdaLoRA's final ranks, Sparse LoRA's masks, the task head) and
on the dataset's real lengths, and the report puts it next to the run's accuracy; it costs one warm-up batch and
2 x ``repeats`` passes over ``examples`` examples (measured: 40 s on SmolLM2-135M on a 2-core CPU, about a
tenth of a 2,000-sentence SST-2 run). PEFT's own ``method_comparison``
suite measures inference in a separate benchmark on synthetic inputs; ours uses the run's test split.

Protocol (``measure``): the first ``examples`` examples of the test split in the split's order (not sorted by
length, so the batches have the split's usual padding), batched by ``train.eval_batch_size`` and collated once,
outside the timer. Each model gets one warm-up batch, then ``repeats`` timed passes over every batch (the CUDA
stream is synchronised before each clock read); latency = median pass time / examples, in milliseconds. Outputs
compared: the class logits (classification) or the per-token negative log-likelihood of the labels (language
modelling, [batch, seq] rather than the [batch, seq, vocab] logits, to stay small).

Merging (PEFT ``PeftModel.merge_and_unload``) folds the adapter into the base weights in place, so ``measure``
runs last in a run, after the adapter is saved; the model must not be used afterwards. Methods without an
adapter to merge (``full``, ``head``) report ``merge: not_applicable``; a method PEFT cannot merge reports
``merge: failed`` with the error. Merging into 4-bit weights (QLoRA) dequantises, adds and re-quantises, so its
outputs differ: ``outputs_match`` says so rather than hiding it.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# |merged - unmerged| allowed, relative to max |unmerged output|, by the dtype the matmuls run in: summing the
# adapter into the weight before the matmul instead of after reorders the rounding, nothing more. fp32, measured:
# full-precision merges differ by 1e-8..2e-5 relative (tiny models, SmolLM2-135M on SST-2), DoRA's (whose weight
# norm is applied another way unmerged) by 7e-5 relative on SmolLM2; a 4-bit re-quantising merge by 1.8e-4
# relative (tiny DistilBERT, masked LM) up to 1e-2 and more. bf16 / fp16: not measured here (no GPU).
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def footprint_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (each tensor once: tied weights and shared buffers count once;
    4-bit weights count their packed storage)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _batches(examples: list[dict], task: str, tokenizer: Any, batch_size: int, device: str) -> list[dict]:
    from peft_lab.training import _to, collate

    generator = torch.Generator().manual_seed(1234)  # MLM masks fixed, as in evaluation
    return [
        _to(collate(examples[i : i + batch_size], task, tokenizer, generator), device)
        for i in range(0, len(examples), batch_size)
    ]


@torch.no_grad()
def _outputs(model: Any, batch: dict, task: str, method: Any, autocast: Callable[[], Any]) -> torch.Tensor:
    """One evaluation forward: class logits [batch, labels], or per-token NLL [batch, seq] (0 where not predicted)."""
    if method is not None:
        method.before_forward(batch, 0, 1, training=False)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with autocast():
        logits = model(**inputs).logits.float()
    if task == "classification":
        return logits
    labels = batch["labels"]
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")


def _timed(model: Any, batches: list[dict], task: str, method: Any, autocast: Any, repeats: int, device: str):
    """(outputs of the first timed pass, on the CPU; seconds of each of ``repeats`` passes)."""
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    was_training = model.training
    model.eval()
    _outputs(model, batches[0], task, method, autocast)  # warm-up: kernels chosen, caches filled
    sync()
    first: list[torch.Tensor] = []
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        outs = [_outputs(model, b, task, method, autocast) for b in batches]
        sync()
        times.append(time.perf_counter() - t0)
        if r == 0:
            first = [o.cpu() for o in outs]
    model.train(was_training)
    return first, times


def tolerance(compute_dtype: str) -> float:
    """Allowed relative |merged - unmerged| for matmuls in ``compute_dtype`` (``float32`` / ``bfloat16`` / ...);
    a 4-bit base gets its compute dtype's tolerance too, so a re-quantised merge shows as a mismatch."""
    return TOLERANCE.get(compute_dtype, TOLERANCE["float32"])


def measure(
    model: Any,
    examples: list[dict],
    task: str,
    tokenizer: Any,
    batch_size: int,
    device: str,
    autocast: Callable[[], Any],
    method: Any,
    repeats: int,
    compute_dtype: str,
) -> dict[str, Any]:
    """Inference cost of ``model`` (see the module docstring); merges the adapter into ``model`` in place.

    ``examples``: tokenized examples (the first N of the test split); ``batch_size``: rows per forward;
    ``repeats`` >= 1 timed passes per model. Returns the ``inference`` record of metrics.json:
    ``examples``, ``batch_size``, ``repeats``, ``latency_ms`` / ``merged_latency_ms`` (ms per example),
    ``merge`` (merged | not_applicable | failed), ``merge_error``, ``max_abs_diff`` (max |merged - unmerged|
    output), ``tolerance`` (absolute, = relative tolerance x max |unmerged output|), ``outputs_match``,
    ``pred_agreement`` (classification: share of examples whose argmax class is unchanged),
    ``footprint_bytes`` / ``merged_footprint_bytes``. Raises ValueError for no examples or repeats < 1.
    """
    if not examples or repeats < 1:
        raise ValueError(f"inference cost needs examples and repeats >= 1 (got {len(examples)}, {repeats})")
    n = len(examples)
    batches = _batches(examples, task, tokenizer, batch_size, device)
    result: dict[str, Any] = {
        "examples": n,
        "batch_size": batch_size,
        "repeats": repeats,
        "footprint_bytes": footprint_bytes(model),
        "merged_latency_ms": None,
        "merge": "not_applicable",
        "merge_error": None,
        "max_abs_diff": None,
        "tolerance": None,
        "outputs_match": None,
        "pred_agreement": None,
        "merged_footprint_bytes": None,
    }
    before, times = _timed(model, batches, task, method, autocast, repeats, device)
    result["latency_ms"] = statistics.median(times) / n * 1000.0
    if not hasattr(model, "merge_and_unload"):  # full fine-tuning, a trained head: no adapter to fold in
        return result
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns on 4-bit merges; outputs_match reports the effect
            merged = model.merge_and_unload()
    except Exception as err:  # a PEFT method without merging: say so, the unmerged numbers stand
        reason = str(err) or "PEFT has no merge for this adapter's layers here (e.g. on 4-bit weights)"
        result["merge"], result["merge_error"] = "failed", f"{type(err).__name__}: {reason}"
        log.warning(f"inference cost: merge_and_unload failed ({result['merge_error']}); unmerged latency only")
        return result
    result["merge"] = "merged"
    result["merged_footprint_bytes"] = footprint_bytes(merged)
    after, times = _timed(merged, batches, task, method, autocast, repeats, device)
    result["merged_latency_ms"] = statistics.median(times) / n * 1000.0
    diff = max(float((a - b).abs().max()) for a, b in zip(after, before))
    scale = max(float(b.abs().max()) for b in before)
    result["max_abs_diff"], result["tolerance"] = diff, tolerance(compute_dtype) * scale
    result["outputs_match"] = bool(diff <= result["tolerance"])  # a NaN difference is a mismatch
    if task == "classification":
        same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(after, before))
        result["pred_agreement"] = same / n
    if not result["outputs_match"]:
        log.warning(
            f"inference cost: the merged model's outputs differ from the unmerged ones by {diff:.3g} "
            f"(tolerance {result['tolerance']:.3g}); its latency is not that of the trained adapter's outputs"
        )
    return result


def summary(result: Optional[dict]) -> str:
    """One log line: ``latency 1.23 ms/example unmerged, 0.98 merged (outputs match, max diff 2e-06)``."""
    if not result:
        return "inference cost not measured"
    text = f"latency {result['latency_ms']:.3g} ms/example unmerged"
    if result["merge"] == "merged":
        match = "outputs match" if result["outputs_match"] else "OUTPUTS DIFFER"
        text += f", {result['merged_latency_ms']:.3g} merged ({match}, max diff {result['max_abs_diff']:.2g})"
    else:
        text += f"; merge {result['merge']}"
    return text
