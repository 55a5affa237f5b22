"""What each method and the framework itself cost, measured side by side: ``python -m peft_lab.bench``.

For one model shape (default: SmolLM2-135M's shape with random weights, no download)
and each method, on the current device:

- step time: median over ``--steps`` timed steps after ``--warmup`` untimed ones, in
  ``--repeats`` blocks; methods run **interleaved** (block 1 of every method, then block
  2, ...), so noise on a shared machine hits them alike; the figure is the median of
  the block medians, with the spread of the block medians;
- tokens/s (batch × sequence / step time); the default task is SST-2's (classification,
  random tokens, only the pooled last token an output token), ``--task causal_lm`` the other;
- peak memory: on CUDA, the method's own resident bytes (allocated when it was built: every
  method's model stays on the device) plus what its block added at its peak (CUDA max allocated
  over the block minus allocated at its start); on CPU each method's peak RSS while training
  in a fresh process of its own (``--memory``; the peak is reset after the model is loaded,
  so loading's transient does not hide the difference between methods);
- model footprint (parameters + buffers), the method's own figures (QLoRA's 4-bit
  linear bytes, SparseLoRA's FLOPs skipped);
- the dtypes as built (``run._dtypes``): frozen weights, compute (autocast), trainable weights;
- MFU, model FLOPs utilisation: ``6 · N · tokens/s / peak``, N the model's parameter count
  (the whole model, frozen base included; the adapter counted too). 6N FLOPs per token is the
  usual training estimate: 2N forward + 4N backward (Kaplan et al. 2020, "Scaling Laws for
  Neural Language Models", section 2.1; PaLM, Chowdhery et al. 2022, appendix B, which defines
  MFU this way and adds an attention term we leave out). A PEFT step does less work than 6N (a
  frozen weight gets no weight gradient: about 4N), and SparseLoRA skips part of it, so MFU here
  is a throughput figure on a common scale, not the share of the peak the GPU was busy. The
  peak is the device's dense bf16 tensor peak (``PEAK_BF16_FLOPS``, keyed by CUDA device name),
  or ``--peak-tflops``; on a CPU or an unknown GPU MFU is left out unless that is given.

Methods run through the framework's own path: the composed config, the method class,
``peft_lab.training.train`` (collate, hooks, scheduler, clipping, as a real run). A
**bare** loop runs alongside: the same model, PEFT ``LoraConfig`` and batches in a minimal
hand-written PyTorch loop (no Hydra, no Trainer), the baseline for the framework's cost.

Ratios are paired: the median over repeats of the two methods' block medians divided,
each pair having run back to back. Output: a table of ratios (each method against LoRA; the framework's LoRA against the
bare loop) and a JSON file with every number. Method variants: ``--methods
lora,sparselora,"sparselora:method.mlp_sparsity=0.9;method.attn_sparsity=0.5"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from peft_lab.schemas import plain

REPO = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = "lora,qlora,hira,sparse,sparselora"
BARE = "bare-lora"

# Dense (no structured sparsity) bf16 tensor-core peak FLOP/s from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name() in this order. Only parts whose name tells the variant apart: the NVL
# cards (other clocks) and the A10G (AWS's part; no NVIDIA data sheet) are left unknown: --peak-tflops.
PEAK_BF16_FLOPS = [
    (r"\bH100 PCIe\b", 756e12),  # "NVIDIA H100 PCIe"
    (r"\bG?H[12]00\b(?!.*\bNVL\b)", 989e12),  # H100 SXM ("NVIDIA H100 80GB HBM3"), H200 SXM, GH200
    (r"\bA100\b", 312e12),  # SXM and PCIe alike
    (r"\bL40S\b", 362e12),
    (r"\bA10\b", 125e12),  # the A10 (not A10G)
    (r"\bL4\b", 121e12),
]


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """The dense bf16 peak FLOP/s of a CUDA device by its name, or None when not known."""
    import re

    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return flops
    return None


def peak_flops(peak_tflops: Optional[float], device: str) -> tuple[Optional[float], str]:
    """(peak FLOP/s for MFU, where it came from): ``--peak-tflops``, else the CUDA device's dense bf16 peak
    from ``PEAK_BF16_FLOPS``, else (a CPU, an unknown GPU) None."""
    if peak_tflops:
        return peak_tflops * 1e12, "--peak-tflops"
    if not device.startswith("cuda"):
        return None, "none on a CPU (give --peak-tflops)"
    import torch

    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_flops(name)
    if peak is None:
        return None, f"'{name}' not in bench.PEAK_BF16_FLOPS (give --peak-tflops)"
    return peak, f"dense bf16 peak of '{name}' (bench.PEAK_BF16_FLOPS)"


def mfu(total_params: Optional[int], tokens_per_s: Optional[float], peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation, 6 N tokens/s / peak (see the module docstring for the convention)."""
    if not total_params or not tokens_per_s or not peak:
        return None
    return 6 * total_params * tokens_per_s / peak


@dataclass
class Result:
    label: str
    method: str
    overrides: list
    block_medians_s: list = field(default_factory=list)
    step_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_memory_mib: Optional[float] = None
    peak_memory_kind: str = ""
    footprint_mib: Optional[float] = None
    trainable_params: Optional[int] = None
    total_params: Optional[int] = None  # N of MFU: the whole model's parameters, frozen base included
    weight_dtype: Optional[str] = None  # frozen base weights as built (4-bit: 4bit-nf4)
    compute_dtype: Optional[str] = None  # the matmuls' dtype (autocast's, or bitsandbytes' compute dtype)
    trainable_dtype: Optional[str] = None  # the trained weights (fp32 master weights under bf16)
    mfu: Optional[float] = None  # 6 * total_params * tokens_per_s / peak FLOP/s (None: no peak known)
    method_metrics: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # the method's own warnings (e.g. SparseLoRA with no sparse layer)
    error: str = ""


# ----------------------------------------------------------------------------- building


def compose(model: str, method: str, extra: list[str], args: argparse.Namespace) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import peft_lab.config  # noqa: F401

    overrides = [
        f"method={method}",
        f"model={model}",
        f"dataset={'sst2' if args.task == 'classification' else 'wikitext2'}",
        "logger=none",
        f"train.batch_size={args.batch}",
        f"train.max_steps={args.warmup + args.steps}",
        f"train.log_every={10**6}",
        "train.checkpoint_every=0",
        "train.resume=false",
        "train.warmup_ratio=0",
        f"train.precision={args.precision}",
        f"train.device={args.device}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def spec(text: str) -> tuple[str, str, list[str]]:
    """'sparselora:method.mlp_sparsity=0.9;method.attn_sparsity=0.5' -> (label, method, overrides)."""
    method, _, rest = text.partition(":")
    extra = [o for o in rest.split(";") if o]
    return text, method.strip(), extra


class Framework:
    """A method built as a run builds it, trained in blocks by peft_lab.training.train."""

    def __init__(self, label: str, method: str, extra: list[str], args: argparse.Namespace, device: str) -> None:
        from peft_lab import data as data_mod
        from peft_lab import run
        from peft_lab.methods import get_method_class

        self.cfg = cfg = compose(args.model, method, extra, args)
        self.device = device
        prec = run.resolve_precision(plain(cfg.train.precision), device)
        self.dtype, self.autocast, self.grad_scaler = prec.weight_dtype, prec.autocast, prec.grad_scaler
        self.task = args.task
        self.method = get_method_class(method)(cfg.method, cfg.model, args.task)
        self.method.validate()
        data_mod.check_config(cfg.dataset)
        loaded, self.model, _ = run.build_model(cfg, self.method, args.task, device, self.dtype)
        self.dtypes = run._dtypes(self.model, prec)  # (frozen weights, compute, trainable), as a run records them
        self.tokenizer = loaded.tokenizer
        self.examples = examples(args, self.model.get_base_model().config.vocab_size)
        self.tmp = Path(tempfile.mkdtemp(prefix="peft_lab_bench_"))  # each block's checkpoint; removed with us
        # on CUDA, training.train times each step with CUDA events (no sync inside a step), as a run does
        weakref.finalize(self, shutil.rmtree, self.tmp, ignore_errors=True)

    def block(self) -> list[float]:
        from peft_lab import training

        result = training.train(
            self.model,
            self.method,
            self.examples,
            cfg=self.cfg,
            task=self.task,
            tokenizer=self.tokenizer,
            device=self.device,
            autocast=self.autocast,
            run_dir=self.tmp,
            on_log=lambda *a: None,
            on_eval=lambda s: None,
            grad_scaler=self.grad_scaler,
        )
        return result.step_times


class Bare:
    """The baseline: a minimal hand-written PyTorch + PEFT LoRA loop over the same batches."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        from peft_lab import models, run

        cfg = compose(args.model, "lora", [], args)
        prec = run.resolve_precision(plain(cfg.train.precision), device)
        self.dtype, self.autocast = prec.weight_dtype, prec.autocast
        loaded = models.load(cfg.model, args.task, cfg.dataset.num_labels, {}, self.dtype)
        mc = cfg.method
        cls = args.task == "classification"
        lora = LoraConfig(
            r=mc.r,
            lora_alpha=mc.lora_alpha,
            lora_dropout=mc.lora_dropout,
            target_modules=list(mc.target_modules or cfg.model.target_modules),
            modules_to_save=list(cfg.model.cls_head_modules) if cls else None,
            task_type="SEQ_CLS" if cls else "CAUSAL_LM",
        )
        self.model = get_peft_model(loaded.model, lora).to(device)
        # as the framework does (run.trainable_in_fp32): fp32 master weights over a bf16 / fp16 base; PEFT
        # casts the adapters itself, not the trainable copy of the head
        for p in self.model.parameters():
            if p.requires_grad and p.is_floating_point():
                p.data = p.data.float()
        self.dtypes = run._dtypes(self.model, prec)
        self.device, self.lr, self.args = device, mc.lr, args
        ex = examples(args, self.model.get_base_model().config.vocab_size)
        self.batches = []
        for i in range(0, len(ex) - args.batch + 1, args.batch):
            chunk = ex[i : i + args.batch]
            ids = torch.tensor([e["input_ids"] for e in chunk], device=device)
            labels = torch.tensor([e["labels"] for e in chunk], device=device) if cls else ids
            self.batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        self.max_grad_norm = cfg.train.max_grad_norm

    def block(self) -> list[float]:
        import torch

        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr)
        n = self.args.warmup + self.args.steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / n)
        self.model.train()
        times = []
        for step in range(n):
            batch = self.batches[step % len(self.batches)]
            t0 = time.perf_counter()
            with self.autocast():
                loss = self.model(**batch).loss
            loss.backward()
            loss.item()
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times


def examples(args: argparse.Namespace, vocab: int) -> list[dict]:
    """Fixed random token sequences (seeded), enough for every step of a block; random binary
    labels for classification (SST-2's setting: only the pooled last token is an output token)."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.warmup + args.steps)
    ids = torch.randint(3, vocab, (n, args.seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    if args.task == "classification":
        return [{"input_ids": row.tolist(), "labels": int(y)} for row, y in zip(ids, labels)]
    return [{"input_ids": row.tolist()} for row in ids]


# ----------------------------------------------------------------------------- measuring


def measure(args: argparse.Namespace) -> dict:
    import gc

    import torch

    from peft_lab import run

    torch.set_num_threads(args.threads)
    device = run._device(args.device)
    cuda = device.startswith("cuda")
    specs = [spec(s) for s in args.methods.split(",") if s.strip()]
    results = {label: Result(label, method, extra) for label, method, extra in specs}
    runners: dict = {}
    resident: dict = {}  # CUDA: bytes each runner keeps allocated (its model, buffers, estimators)

    def build(label: str, make: Any, *make_args: Any) -> None:
        gc.collect()
        before = torch.cuda.memory_allocated() if cuda else 0
        try:
            runners[label] = make(*make_args)
        except Exception as err:  # one method that cannot run here (e.g. QLoRA on a CPU build) is reported
            results[label].error = f"{type(err).__name__}: {err}"[:300]
            print(f"[bench] {label}: cannot run here: {results[label].error}", flush=True)
            return
        gc.collect()
        resident[label] = torch.cuda.memory_allocated() - before if cuda else 0

    for label, method, extra in specs:
        build(label, Framework, label, method, extra, args, device)
    if args.bare:
        results[BARE] = Result(BARE, "lora", [])
        build(BARE, Bare, args, device)
        # run the bare loop right after the framework's LoRA, so each pair is measured back to back
        keys = list(results)
        if "lora" in keys:
            keys.remove(BARE)
            keys.insert(keys.index("lora") + 1, BARE)
        runners = {k: runners[k] for k in keys if k in runners}
        results = {k: results[k] for k in keys}
    from peft_lab.metrics import count_parameters

    for label, r in runners.items():
        res = results[label]
        counts = count_parameters(r.model)
        res.footprint_mib = r.model.get_memory_footprint() / 2**20
        res.trainable_params, res.total_params = counts["trainable_params"], counts["total_params"]
        res.weight_dtype, res.compute_dtype, res.trainable_dtype = r.dtypes
    order = list(runners)
    for rep in range(args.repeats):
        for label in order if rep % 2 == 0 else order[::-1]:  # alternate the order too
            res = results[label]
            if res.error:
                continue
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
                start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            try:
                times = runners[label].block()[args.warmup :]
            except Exception as err:  # a method that fails mid-run is reported; the others go on
                res.error = f"{type(err).__name__} in training: {err}"[:300]
                print(f"[bench] {label}: failed: {res.error}", flush=True)
                continue
            res.block_medians_s.append(statistics.median(times))
            if cuda:
                # every runner's model stays resident: count this method's own (measured when it was built)
                # plus what its training block added at its peak (activations, gradients, optimizer state)
                peak = (resident[label] + torch.cuda.max_memory_allocated() - start) / 2**20
                res.peak_memory_mib = max(res.peak_memory_mib or 0, peak)
                res.peak_memory_kind = "cuda_max_allocated (own model + training block)"
            print(
                f"[bench] repeat {rep + 1}/{args.repeats} {label}: {1000 * res.block_medians_s[-1]:.1f} ms/step",
                flush=True,
            )
    tokens_per_step = args.batch * args.seq
    peak, peak_source = peak_flops(args.peak_tflops, device)
    for label, r in runners.items():
        res = results[label]
        if res.error:
            continue
        res.step_s = statistics.median(res.block_medians_s)
        res.tokens_per_s = tokens_per_step / res.step_s
        res.mfu = mfu(res.total_params, res.tokens_per_s, peak)
        if isinstance(r, Framework):
            mm = r.method.metrics(r.model)
            res.method_metrics = {k: v for k, v in mm.items() if isinstance(v, (int, float, str))}
            res.warnings = [str(w) for w in mm.get("sparselora_warnings", [])]
            for w in res.warnings:
                print(f"[bench] {label}: WARNING: {w}", flush=True)
    if args.memory and not cuda:
        for label in results:
            if not results[label].error:
                results[label].peak_memory_mib = memory_probe(label, args)
                results[label].peak_memory_kind = "process_peak_rss"
    return {"results": results, "device": device, "peak_flops": peak, "peak_flops_source": peak_source}


def memory_probe(label: str, args: argparse.Namespace) -> Optional[float]:
    """Peak RSS (MiB) of a fresh process that builds ``label`` and trains warmup + 2 steps."""
    cmd = [sys.executable, "-m", "peft_lab.bench", "--probe", label, "--model", args.model, "--task", args.task,
           "--batch", str(args.batch),
           "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", "2", "--threads", str(args.threads),
           "--device", args.device, "--precision", args.precision]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS_MIB="):
            return float(line.split("=", 1)[1])
    print(f"[bench] memory probe {label} failed: {proc.stderr[-500:]}", flush=True)
    return None


def probe(args: argparse.Namespace) -> None:
    import torch

    from peft_lab import run

    torch.set_num_threads(args.threads)
    import gc

    from peft_lab import metrics

    device = run._device(args.device)
    if args.probe == BARE:
        runner = Bare(args, device)
    else:
        label, method, extra = spec(args.probe)
        runner = Framework(label, method, extra, args, device)
    gc.collect()
    metrics.reset_peak_memory(device)  # the model is resident; loading's transient peak is not counted
    runner.block()
    peak = metrics.peak_memory(device)["peak_memory_bytes"]
    print(f"PEAK_RSS_MIB={peak / 2**20:.1f}", flush=True)


# ----------------------------------------------------------------------------- start-up


def startup(args: argparse.Namespace) -> dict:
    """``train.py --cfg job`` wall time (median of 3) and each cell's time to its first step in a
    2-cell local sweep on the tiny model (process start -> first optimizer step done)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PEFT_LAB_THREADS=str(args.threads))
    cfg_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, str(REPO / "train.py"), "--cfg", "job"], env=env, capture_output=True, check=True
        )
        cfg_times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(prefix="peft_lab_startup_") as tmp:
        cmd = [sys.executable, str(REPO / "train.py"), "-m", "method=lora,hira", "experiment=smoke", "logger=none",
               "train.max_steps=2", f"hydra.sweep.dir={tmp}/sweep"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        sweep_s = time.perf_counter() - t0
        firsts = {}
        for path in sorted(Path(tmp, "sweep").glob("*/metrics.json")):
            m = json.loads(path.read_text())
            firsts[m["method"]] = m.get("time_to_first_step_s")
    return {
        "cfg_job_s_median": statistics.median(cfg_times),
        "cfg_job_s": cfg_times,
        "tiny_sweep_2_cells_s": sweep_s,
        "tiny_sweep_ok": proc.returncode == 0,
        "time_to_first_step_s": firsts,
    }


# ----------------------------------------------------------------------------- report


def machine(device: str, threads: int) -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def paired(num: Result, den: Result) -> Optional[float]:
    """Median over repeats of num/den block medians: each pair ran back to back, so slow drifts of a
    shared machine cancel."""
    pairs = [a / b for a, b in zip(num.block_medians_s, den.block_medians_s) if b]
    return statistics.median(pairs) if pairs else None


def table(out: dict) -> str:
    res = out["results"]
    lora = res.get("lora")
    lines = [
        "| method | step (ms) | spread (ms) | tokens/s | step vs LoRA | speed vs LoRA | peak mem (MiB) | mem vs LoRA | "
        "footprint (MiB) | MFU | weights / compute / trainable | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if lora is not None and not lora.step_s:
        lora = None  # LoRA failed: no ratios against it
    for r in res.values():
        if not r.step_s:
            lines.append(f"| {r.label} |{' – |' * 10} cannot run here: {r.error[:80]} |")
            continue
        spread = f"{1000 * min(r.block_medians_s):.0f}–{1000 * max(r.block_medians_s):.0f}"
        notes = []
        mm = r.method_metrics
        if mm.get("sparselora_sparse_layers") == 0:
            notes.append(
                f"WARNING: 0 of {mm.get('sparselora_layers')} layers sparse (method.mlp_sparsity / "
                "attn_sparsity name none): ran as dense LoRA"
            )
        if "sparselora_flops_skipped" in mm:
            notes.append(f"{100 * mm['sparselora_flops_skipped']:.0f} % base FLOPs skipped")
        if "quant_linear_bytes_ratio_vs_bf16" in mm:
            notes.append(f"4-bit linear bytes {mm['quant_linear_bytes_ratio_vs_bf16']:.3f}× bf16")
        if r.label == BARE:
            notes.append("hand-written PyTorch + PEFT loop")

        def fx(v, fmt, unit=""):
            return "–" if v is None else format(v, fmt) + unit

        lines.append(
            f"| {r.label} | {1000 * r.step_s:.0f} | {spread} | {r.tokens_per_s:,.0f} | "
            f"{fx(paired(r, lora) if lora else None, '.2f', '×')} | "
            f"{fx(paired(lora, r) if lora else None, '.2f', '×')} | {fx(r.peak_memory_mib, ',.0f')} | "
            f"{fx(ratio(r.peak_memory_mib, lora.peak_memory_mib if lora else None), '.2f', '×')} | "
            f"{fx(r.footprint_mib, ',.1f')} | {fx(None if r.mfu is None else 100 * r.mfu, '.1f', ' %')} | "
            f"{dtypes(r)} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def dtypes(r: Result) -> str:
    """'bfloat16 / bfloat16 / float32': frozen weights / compute / trainable, as built."""
    return " / ".join(d or "–" for d in (r.weight_dtype, r.compute_dtype, r.trainable_dtype))


def targets(out: dict) -> list[dict]:
    res = out["results"]
    lora, bare = res.get("lora"), res.get(BARE)
    if lora is not None and not lora.step_s:
        lora = None  # LoRA failed: no ratios against it
    cuda = out.get("device", "").startswith("cuda")
    rows = []

    def add(name: str, value: Optional[float], goal: str, ok: Optional[bool]) -> None:
        rows.append({"target": name, "measured": value, "goal": goal, "met": ok})

    if lora and bare and lora.step_s and bare.step_s:
        v = paired(bare, lora)
        add("framework LoRA steps/s vs bare loop", v, ">= 0.97", v >= 0.97)
    for r in res.values():
        if r.method == "sparselora" and lora and r.step_s:
            v = paired(lora, r)
            goal = 1.6 if cuda else 1.3
            add(f"{r.label} speed vs LoRA (per step)", v, f">= {goal} ({'GPU, ~1B' if cuda else 'CPU'})", v >= goal)
        if r.method == "hira" and lora and r.step_s:
            v = paired(r, lora)
            add("HiRA step time vs LoRA", v, "<= 1.2", v <= 1.2)
        if r.method == "qlora" and "quant_linear_bytes_ratio_vs_bf16" in r.method_metrics:
            v = r.method_metrics["quant_linear_bytes_ratio_vs_bf16"]
            add("QLoRA linear-weight bytes vs bf16", v, "<= 0.30", v <= 0.30)
            if lora and r.peak_memory_mib and lora.peak_memory_mib:
                v = r.peak_memory_mib / lora.peak_memory_mib
                add(f"QLoRA peak memory vs LoRA ({lora.weight_dtype} base) (reported)", v, "compare", None)
    if lora and lora.mfu is not None:
        add("LoRA MFU (6N convention)", lora.mfu, ">= 0.40 (H200, ~1B)", lora.mfu >= 0.40 if cuda else None)
    st = out.get("startup")
    if st:
        add("train.py --cfg job (s)", st["cfg_job_s_median"], "< 2", st["cfg_job_s_median"] < 2)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peft_lab.bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default="smollm2-135m-shape", help="a model config: smollm2-135m-shape, tiny, llama-1b-shape, ..."
    )
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated; variants as 'name:key=v;key=v'")
    p.add_argument(
        "--task",
        choices=["classification", "causal_lm"],
        default="classification",
        help="classification (SST-2's setting, the default) or causal_lm (every token is an output token, "
        "so SparseLoRA's output tokens stay dense and it has nothing to skip unless method.dense_output_tokens=false)",
    )
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 4 on CPU, 8 on CUDA)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 128 on CPU, 512 on CUDA)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each block")
    p.add_argument("--repeats", type=int, default=3, help="interleaved blocks per method")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--precision",
        default="auto",
        help="auto (bf16 on a CUDA device with bf16, fp32 otherwise), fp32, bf16, fp16: the frozen base in that "
        "dtype under autocast, trainable weights fp32 (train.precision)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak dense TFLOP/s for MFU (default: the CUDA device's bf16 peak from "
        "bench.PEAK_BF16_FLOPS; none on a CPU or an unknown GPU)",
    )
    p.add_argument("--no-bare", dest="bare", action="store_false", help="skip the hand-written baseline loop")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="CPU: skip the per-method peak-RSS probes")
    p.add_argument("--no-startup", dest="startup", action="store_false", help="skip the start-up timings")
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.batch is None or args.seq is None:
        import torch

        cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        args.batch = args.batch or (8 if cuda else 4)
        args.seq = args.seq or (512 if cuda else 128)
    if args.probe:
        probe(args)
        return 0
    t0 = time.perf_counter()
    out = measure(args)
    if args.startup:
        out["startup"] = startup(args)
    out["machine"] = machine(out["device"], args.threads)
    out["settings"] = {k: v for k, v in vars(args).items() if k != "probe" and not isinstance(v, Path)}
    out["targets"] = targets(out)
    out["bench_wall_s"] = time.perf_counter() - t0
    text = table(out)
    print("\n" + text)
    print(f"  MFU = 6 x parameters x tokens/s / peak; peak: {out['peak_flops_source']}")
    for r in out["results"].values():
        for w in r.warnings:
            print(f"  WARNING {r.label}: {w}")
    for t in out["targets"]:
        mark = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"  {t['target']}: {t['measured']:.3f} (goal {t['goal']}): {mark}")
    if "startup" in out:
        print(f"  time to first step per cell (tiny, 2-cell sweep): {out['startup']['time_to_first_step_s']}")
    data = {**out, "results": {k: asdict(v) for k, v in out["results"].items()}, "table_markdown": text}
    args.out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"\nmachine: {out['machine']}\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
