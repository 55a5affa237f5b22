"""Calibrate SparseLoRA's per-layer MLP sparsity on your model and data, before a sweep.

    python -m peft_lab.calibrate dataset=sst2 dataset.data_dir=../shared/data/sst2 --target 0.2

The arguments without ``--`` are the run's own Hydra overrides (model, dataset, method keys), so the
calibration sees what the runs will see. On a few batches of the training split, with the frozen
base model, it measures for every decoder layer's MLP and a few sparsities s:

* **overlap**: the share of the channels kept by the SVD estimator that the oracle (the true
  ||SiLU(gate(x)) * up(x)|| over the batch's context tokens) also keeps. Chance is 1 - s.
* **relative output error**: the mean over the batch's context tokens t of
  ||MLP_s(x_t) - MLP(x_t)|| / ||h_t + MLP(x_t)|| (per token, so that a few tokens with huge
  activations do not hide the others),
  where h + MLP(x) is the decoder layer's output (the residual stream after the MLP block) and MLP_s
  keeps the estimator's channels (and, for reference, the oracle's). The error relative to the MLP's
  own output is kept too (``mlp_error``, in ``--json``): on SmolLM2-135M it is 0.5-0.8 in most layers
  even for the oracle, yet the deep band keeps a frozen-feature probe's accuracy, because the residual
  stream carries far more than one MLP adds; the layer-output error is what the next layer sees.

Then it grows the sparse band from the deepest layer but the last one downwards: each layer gets
the highest candidate sparsity whose error is within ``--budget`` (a layer that cannot meet the
budget at any candidate stays dense), until the layers chosen skip ``--target`` of the base
model's linear FLOPs (the share ``sparselora_flops_skipped`` measures in a run: all base linears of
all layers, output tokens counted dense). It writes the per-layer map as a preset YAML
(``conf/method/sparsity/<name>.yaml`` by default), used as ``method/sparsity=<name>``, and prints the
per-layer table. It warns when the estimator is near chance, and exits 1 without writing when the
target cannot be met within the budget.

The layer errors are measured one layer at a time (errors compound across layers in a run), on the
base model before any LoRA step: a screening, to be confirmed by a run (the report's dense and
sparse test accuracy). Attention sparsity is not calibrated: the written preset keeps attention dense.
PEFT and the SparseLoRA reference code have no calibration step; this one is peft_lab's own.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from peft_lab.errors import UserError, fail

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "conf" / "method" / "sparsity"
log = logging.getLogger("peft_lab.calibrate")


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import peft_lab.config  # noqa: F401

    if not any(o.startswith("method=") for o in overrides):
        overrides = ["method=sparselora", *overrides]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=["logger=none", *overrides])


def batches(cfg: Any, task: str, tokenizer: Any, n_batches: int, batch_size: int) -> list[dict]:
    """``n_batches`` collated batches of the training split (a seeded sample), as a run forms them."""
    import random

    from peft_lab import data as data_mod
    from peft_lab import training

    splits = data_mod.load_splits(cfg.dataset)
    examples = data_mod.tokenize(cfg.dataset, tokenizer, splits.train, cfg.dataset.max_train_samples)
    if not examples:
        raise fail("the training split is empty", "point dataset.* at a split with examples")
    random.Random(cfg.seed).shuffle(examples)
    need = n_batches * batch_size
    examples = examples[:need]
    return [
        training.collate(examples[i : i + batch_size], task, tokenizer) for i in range(0, len(examples), batch_size)
    ]


def measure(model: Any, method_cfg: Any, task: str, data: list[dict], sparsities: list[float]) -> dict:
    """Per layer and sparsity: mean overlap with the oracle, mean relative output error (estimator and oracle).

    Returns {"layers": [{"layer", "overlap": {s: v}, "error": {s: v}, "oracle_error": {s: v}, "mlp_error": {s: v},
    "oracle_mlp_error": {s: v}}, ...],
    "context_share": the share of token positions that run sparse, "n_layers"}."""
    import torch
    import torch.nn.functional as F

    from peft_lab.methods.sparselora import Controller, build_estimators, decoder_layers

    layers = decoder_layers(model)
    if not layers:
        raise fail(
            f"no Llama-style decoder layers in {type(model).__name__}",
            "SparseLoRA (and its calibration) serves Llama-family models",
        )
    est = build_estimators(layers, method_cfg.estimator_rank)
    captured: dict[tuple, Any] = {}
    ctl = Controller()

    def hook(key):
        def pre(module, args):
            captured[key] = args[0].detach()

        return pre

    handles = [layer.mlp.register_forward_pre_hook(hook((i, "x"))) for i, layer in enumerate(layers)]
    # the residual stream entering the MLP block (before its norm): the layer's output is it + MLP(x)
    handles += [
        layer.post_attention_layernorm.register_forward_pre_hook(hook((i, "h")))
        for i, layer in enumerate(layers)
        if hasattr(layer, "post_attention_layernorm")
    ]
    keys = ("overlap", "error", "oracle_error", "mlp_error", "oracle_mlp_error")
    sums = [{k: {s: 0.0 for s in sparsities} for k in keys} for _ in layers]
    context = total = 0
    try:
        model.eval()
        for batch in data:
            ctl.begin(batch, task, True, bool(method_cfg.dense_output_tokens), count=False)
            context += ctl.sparse_rows.numel()
            total += batch["input_ids"].numel()
            real = batch["attention_mask"].flatten().bool()
            rows = ctl.sparse_rows[real[ctl.sparse_rows]]  # context tokens that are not padding
            if rows.numel() == 0:
                raise fail(
                    "no token of the calibration batches runs sparse: every token is an output token",
                    "on plain LM data set method.dense_output_tokens=false (SparseLoRA pays on prompt-masked data)",
                )
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                model(**inputs)
                for i, layer in enumerate(layers):
                    x, h = (captured.get((i, k)) for k in ("x", "h"))
                    x = x.reshape(-1, x.shape[-1]).index_select(0, rows).float()
                    mlp = layer.mlp
                    act = F.silu(F.linear(x, mlp.gate_proj.weight.float())) * F.linear(x, mlp.up_proj.weight.float())
                    down = mlp.down_proj.weight.float()
                    y = F.linear(act, down)
                    mlp_norm = y.norm(dim=1).clamp_min(1e-12)  # per token
                    out = y if h is None else y + h.reshape(-1, h.shape[-1]).index_select(0, rows).float()
                    norm = out.norm(dim=1).clamp_min(1e-12)
                    (ga, gb), (ua, ub) = est[i]["gate"], est[i]["up"]
                    score = (F.silu(x @ ga @ gb) * (x @ ua @ ub)).norm(dim=0)
                    truth = act.norm(dim=0)
                    width = act.shape[1]
                    for s in sparsities:
                        keep = max(1, round((1 - s) * width))
                        chosen, best = score.topk(keep).indices, truth.topk(keep).indices
                        sums[i]["overlap"][s] += torch.isin(chosen, best).float().mean().item()
                        for key, sel in (("error", chosen), ("oracle_error", best)):
                            diff = (F.linear(act[:, sel], down[:, sel]) - y).norm(dim=1)
                            sums[i][key][s] += (diff / norm).mean().item()
                            sums[i][key.replace("error", "mlp_error")][s] += (diff / mlp_norm).mean().item()
    finally:
        for h in handles:
            h.remove()
    n = len(data)
    out = [
        {"layer": i, **{k: {s: v / n for s, v in d.items()} for k, d in layer_sums.items()}}
        for i, layer_sums in enumerate(sums)
    ]
    return {"layers": out, "context_share": context / max(1, total), "n_layers": len(layers)}


def grow(
    measured: dict, config: Any, sparsities: list[float], target: float, budget: float
) -> tuple[dict[int, float], float]:
    """The band grown from layer n-2 down to layer 1: ({layer: sparsity}, share of base-linear FLOPs skipped).

    Each layer takes the highest sparsity whose estimator error is <= ``budget``; growth stops once the
    share reaches ``target``."""
    from peft_lab.methods.sparselora import layer_costs

    cost = layer_costs(config)
    n = measured["n_layers"]
    per_layer_share = cost["mlp"] / (n * (cost["mlp"] + cost["attn"])) * measured["context_share"]
    chosen: dict[int, float] = {}
    share = 0.0
    for i in range(n - 2, 0, -1):
        if share >= target:
            break
        ok = [s for s in sorted(sparsities, reverse=True) if measured["layers"][i]["error"][s] <= budget]
        if ok:
            chosen[i] = ok[0]
            share += ok[0] * per_layer_share
    return dict(sorted(chosen.items())), share


def near_chance(measured: dict, sparsity: float) -> tuple[float, bool]:
    """(mean overlap over all layers at ``sparsity``, whether it is within a fifth of the way from chance
    (1 - sparsity) to perfect (1))."""
    chance = 1 - sparsity
    mean = sum(layer["overlap"][sparsity] for layer in measured["layers"]) / len(measured["layers"])
    return mean, (mean - chance) / max(1e-9, 1 - chance) < 0.2


def preset_yaml(chosen: dict[int, float], header: list[str], method_cfg: Any) -> str:
    """The preset file: a ``# @package _global_.method`` YAML with ``mlp_sparsity`` (ranges of equal
    sparsity merged), a dense ``attn_sparsity``, and the method keys the measurement depends on
    (``selector: svd``, ``estimator_rank``, ``dense_output_tokens``), so a run with the preset runs as measured."""
    from peft_lab.methods.sparselora import layer_ranges

    body = "{" + ", ".join(f'"{key}": {s:g}' for key, s in layer_ranges(chosen)) + "}"
    lines = ["# @package _global_.method", *[f"# {h}" if h else "#" for h in header]]
    measured_under = [
        "selector: svd",
        f"estimator_rank: {int(method_cfg.estimator_rank)}",
        f"dense_output_tokens: {str(bool(method_cfg.dense_output_tokens)).lower()}",
    ]
    return "\n".join(lines + [f"mlp_sparsity: {body}", "attn_sparsity: {}", *measured_under, ""])


def table(measured: dict, sparsities: list[float], chosen: dict[int, float]) -> list[str]:
    head = ["layer"] + [f"overlap@{s:g} (chance {1 - s:.2f})" for s in sparsities]
    head += [f"error@{s:g} svd / oracle" for s in sparsities] + ["chosen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in measured["layers"]:
        i = layer["layer"]
        cells = [str(i)] + [f"{layer['overlap'][s]:.2f}" for s in sparsities]
        cells += [f"{layer['error'][s]:.3f} / {layer['oracle_error'][s]:.3f}" for s in sparsities]
        cells.append(f"{chosen[i]:g}" if i in chosen else "dense")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peft_lab.calibrate",
        description="Measure SparseLoRA's estimator and per-layer damage on your model and data; write a preset.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (model=..., dataset=...)")
    parser.add_argument("--target", type=float, default=0.2, help="share of base-linear FLOPs to skip (0..1)")
    parser.add_argument("--budget", type=float, default=0.2, help="largest relative layer-output error per layer")
    parser.add_argument("--sparsities", default="0.5,0.75,0.9", help="candidate MLP sparsities, comma-separated")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--name", default=None, help="preset name (default: calibrated_<model>_<dataset>_f<target>)")
    parser.add_argument(
        "--out", type=Path, default=None, help="file to write (default: conf/method/sparsity/<name>.yaml)"
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements as JSON")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    try:
        sparsities = sorted({float(s) for s in args.sparsities.split(",") if s.strip()})
    except ValueError:
        raise fail(f"--sparsities {args.sparsities!r} is not a list of numbers", "give e.g. 0.5,0.75,0.9") from None
    if not sparsities or not all(0 < s < 1 for s in sparsities):
        raise fail(f"--sparsities {args.sparsities!r}: each must be in (0, 1)", "give e.g. 0.5,0.75,0.9")
    if not 0 < args.target < 1:
        raise fail(f"--target {args.target} is outside (0, 1)", "give the share of FLOPs to skip, e.g. 0.2")
    if args.budget <= 0:
        raise fail(f"--budget {args.budget} is not positive", "give a relative error, e.g. 0.2")
    if args.name and args.out:
        raise fail(
            "--name and --out both name the file", "give one: --name NAME (in conf/method/sparsity/) or --out PATH"
        )
    if args.batches < 1 or args.batch_size < 1:
        raise fail("--batches and --batch-size must be >= 1", "give e.g. --batches 4 --batch-size 16")
    cfg = compose(list(args.overrides))
    from peft_lab import data as data_mod
    from peft_lab import models
    from peft_lab.methods import get_method_class
    from peft_lab.schemas import plain

    if cfg.method.name != "sparselora":
        raise fail(f"method={cfg.method.name}: calibration is for SparseLoRA", "drop the method= override")
    data_mod.check_config(cfg.dataset)
    models.check_config(cfg.model)
    task = models.resolve_task(cfg.model, plain(cfg.dataset.task))
    method = get_method_class("sparselora")(cfg.method, cfg.model, task)
    method.validate()
    import torch

    torch.set_num_threads(args.threads or (torch.get_num_threads()))
    torch.manual_seed(cfg.seed)
    loaded = models.load(cfg.model, task, cfg.dataset.num_labels, {}, torch.float32)
    data = batches(cfg, task, loaded.tokenizer, args.batches, args.batch_size)
    measured = measure(loaded.model, cfg.method, task, data, sparsities)
    chosen, share = grow(measured, loaded.model.config, sparsities, args.target, args.budget)
    name = args.name or f"calibrated_{cfg.model.name}_{cfg.dataset.name}_f{round(100 * args.target)}"
    out = args.out or PRESETS / f"{name}.yaml"
    lines = table(measured, sparsities, chosen)
    print("\n".join(lines))
    warnings = []
    for s in sparsities:
        mean, bad = near_chance(measured, s)
        if bad:
            warnings.append(
                f"WARNING: the rank-{cfg.method.estimator_rank} SVD estimator is near chance at sparsity {s:g} "
                f"(mean overlap {mean:.2f}, chance {1 - s:.2f}): its channels are little better than random. "
                "Try method.estimator_rank=32, or method.selector=oracle to see what the sparsity itself costs."
            )
    for w in warnings:
        print(w)
    if args.json:
        args.json.write_text(json.dumps({"measured": measured, "chosen": chosen, "share": share}, indent=1))
    if share < args.target:
        print(
            f"error: the layers within the error budget {args.budget:g} skip {100 * share:.1f} % of base-linear FLOPs, "
            f"short of --target {args.target:g}; nothing written. Raise --budget, lower --target or add a "
            "higher candidate to --sparsities.",
            file=sys.stderr,
        )
        return 1
    header = [
        f"Written by: python -m peft_lab.calibrate {' '.join(args.overrides)} --target {args.target:g} "
        f"--budget {args.budget:g} --sparsities {args.sparsities} --batches {args.batches} --batch-size {args.batch_size}",
        f"model {cfg.model.name}, dataset {cfg.dataset.name}; {measured['n_layers']} layers; context tokens "
        f"{100 * measured['context_share']:.0f} % of positions",
        f"planned share of base-linear FLOPs skipped: {100 * share:.1f} % (target {100 * args.target:.0f} %)",
        "per layer: overlap of the SVD estimator with the oracle; relative layer-output error per token (svd / oracle):",
        "",
        *lines,
        *warnings,
        f"use: {use_line(args.overrides, Path(out))}",
    ]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(preset_yaml(chosen, header, cfg.method))
    tmp.replace(out)
    print(f"wrote {out}: MLP sparse in {len(chosen)} layers, {100 * share:.1f} % of base-linear FLOPs planned skipped")
    print(f"use it: {use_line(args.overrides, out)}")
    return 0


def use_line(overrides: list[str], out: Path) -> str:
    """The train.py command that runs with the written preset: the calibration's own overrides (model, dataset, ...)
    and, for a file outside conf/method/sparsity/, Hydra's search path to its conf root."""
    extra = [o for o in overrides if not o.startswith("method=")]
    cmd = ["python train.py method=sparselora", f"method/sparsity={out.stem}", *extra]
    out = out.resolve()
    if out.parent != PRESETS.resolve():
        if out.parent.parts[-2:] == ("method", "sparsity"):
            cmd.append(f"'hydra.searchpath=[file://{out.parent.parent.parent}]'")
        else:
            return f"move it into a folder <root>/method/sparsity/ and run {' '.join(cmd)} 'hydra.searchpath=[file://<root>]'"
    return " ".join(cmd)


if __name__ == "__main__":
    sys.exit(main())
