"""One cell, start to finish: checks -> data -> model -> method -> train -> evaluate -> metrics.json.

``main`` is what ``train.py`` calls. Cheap checks run before torch is imported,
so a bad combination fails in a second with a one-line message and exit code 2.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from peft_lab import data as data_mod
from peft_lab import models
from peft_lab.errors import UserError
from peft_lab.methods import get_method_class
from peft_lab.metrics import write_json_atomic

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = Path(str(hc.sweep.dir)) if multirun else None
    record = {
        "status": "running",
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "overrides": list(hc.overrides.task),
        "run_dir": str(run_dir),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pid": os.getpid(),
    }
    t0 = time.perf_counter()
    write_json_atomic(run_dir / METRICS_FILE, record)
    try:
        return run_cell(cfg, run_dir, record, sweep_dir, t0)
    except BaseException as err:
        record.update(failure(err))
        write_json_atomic(run_dir / METRICS_FILE, record)
        if isinstance(err, UserError) and not multirun:
            log.error(str(err))
            print(f"peft_lab: error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise


def failure(err: BaseException | None) -> dict:
    """Status + error for a run that ended by ``err``. SystemExit / KeyboardInterrupt is a preemption
    or timeout signal (submitit requeues the task, which resumes from its checkpoint): interrupted."""
    interrupted = isinstance(err, (SystemExit, KeyboardInterrupt))
    return {"status": "interrupted" if interrupted else "failed", "error": f"{type(err).__name__}: {err}"}


def run_cell(cfg: DictConfig, run_dir: Path, record: dict, sweep_dir: Path | None, t0: float) -> float | None:
    ds, mc = cfg.dataset, cfg.model
    # --- start-up checks: no heavy imports yet
    data_mod.check_config(ds)
    models.check_config(mc)
    task = models.resolve_task(mc, str(getattr(ds.task, "value", ds.task)))
    method = get_method_class(cfg.method.name)(cfg.method, mc, task)
    method.validate()
    record["task"] = task

    # --- data next (validated before torch and the model load: bad data fails in a second or two)
    raw_train, train_src = data_mod.load_validated(ds, ds.train_split)
    raw_eval, eval_src = data_mod.load_validated(ds, ds.eval_split)

    threads = cfg.train.threads or int(os.environ.get("PEFT_LAB_THREADS", 0)) or (os.cpu_count() or 1)
    import torch

    torch.set_num_threads(threads)
    from transformers import set_seed

    from peft_lab import metrics, tracking, training

    set_seed(cfg.seed)
    device = _device(cfg.train.device)
    dtype, autocast = _precision(cfg.train.precision, device)
    record.update(device=device, torch_threads=threads, precision=str(dtype).replace("torch.", ""))

    # --- model + method
    loaded, model, base_footprint = build_model(cfg, method, task, device, dtype)
    train_ex = data_mod.tokenize(ds, loaded.tokenizer, raw_train, ds.max_train_samples)
    eval_ex = data_mod.tokenize(ds, loaded.tokenizer, raw_eval, ds.max_eval_samples)
    gc.collect()
    metrics.reset_peak_memory(device)  # the peak covers training + evaluation, not the loading transient
    record.update(
        model_source=loaded.source,
        base_model_folder=loaded.folder,
        data_source=train_src,
        train_examples=len(train_ex),
        eval_examples=len(eval_ex),
        **metrics.count_parameters(model),
        **method.metrics(model),
    )
    log.info(
        f"{record['trainable_params']:,} trainable of {record['total_params']:,} parameters "
        f"({record['trainable_pct']:.3f} %); {len(train_ex)} train / {len(eval_ex)} eval examples"
    )

    config = OmegaConf.to_container(cfg, resolve=True)
    with_seed = tracking.seeds_vary(sweep_dir, record["overrides"])
    name = tracking.run_name(cfg.method.name, ds.name, mc.name, cfg.seed, with_seed)
    group = tracking.sweep_group(sweep_dir, cfg.logger.get("group"))
    tags = [cfg.method.name, ds.name, mc.name, task] + ([f"seed{cfg.seed}"] if with_seed else [])
    tracker = tracking.make_tracker(cfg.logger, run_dir, group, name, config, tags)
    record.update(wandb_run_id=tracker.run_id, wandb_group=group if tracker.run_id else None, wandb_mode=tracker.mode)
    failed = True
    try:

        def run_eval() -> dict:
            return training.evaluate(
                model, eval_ex, task, loaded.tokenizer, cfg.train.eval_batch_size, device, autocast, method
            )

        if cfg.train.eval_before:
            record["eval_before"] = run_eval()
            log.info(f"before training: {record['eval_before']}")

        def on_eval(step: int) -> None:
            result = run_eval()
            log.info(f"eval at step {step}: {result}")
            tracker.log({f"eval/{k}": v for k, v in result.items()}, step)

        result = training.train(
            model,
            method,
            train_ex,
            cfg=cfg,
            task=task,
            tokenizer=loaded.tokenizer,
            device=device,
            autocast=autocast,
            run_dir=run_dir,
            on_log=tracker.log,
            on_eval=on_eval,
        )
        eval_metrics = run_eval()
        log.info(f"eval: {eval_metrics}")
        tracker.log({f"eval/{k}": v for k, v in eval_metrics.items()}, result.steps)
        main_metric = _main_metric(ds, task)
        record.update(
            eval=eval_metrics,
            main_metric=main_metric,
            main_metric_value=eval_metrics[main_metric],
            steps=result.steps,
            resumed_from_step=result.resumed_from,
            final_train_loss=result.final_loss,
            train_wall_s=result.wall_s,
            step_time_median_s=statistics.median(result.step_times) if result.step_times else None,
            time_to_first_step_s=_since_start(result.first_step_done_at),
            samples_per_s=result.samples / max(1e-9, result.wall_s),
            tokens_per_s=result.tokens / max(1e-9, result.wall_s),
            model_footprint_bytes=base_footprint,
            **method.metrics(model),
            **metrics.peak_memory(device),
            **metrics.environment(),
        )
        if cfg.train.save_adapter:
            adapter_dir = run_dir / "adapter"
            method.save_adapter(model, adapter_dir)
            record["adapter_dir"] = str(adapter_dir)
            record["adapter_bytes"] = metrics.dir_size(adapter_dir)
            if cfg.logger.get("log_artifacts"):
                tracker.log_adapter(adapter_dir, f"adapter-{name}")
        record["status"] = "completed"
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        record["run_wall_s"] = time.perf_counter() - t0
        write_json_atomic(run_dir / METRICS_FILE, record)
        failed = False
        log.info(f"{name}: {main_metric} = {eval_metrics[main_metric]:.4f}  ({run_dir / METRICS_FILE})")
        return float(eval_metrics[main_metric])
    finally:
        if failed:  # the summary still says what happened (main() writes the same into metrics.json)
            err = sys.exc_info()[1]
            interrupted = isinstance(err, (SystemExit, KeyboardInterrupt))
            record = {
                **record,
                "status": "interrupted" if interrupted else "failed",
                "error": f"{type(err).__name__}: {err}",
            }
        tracker.summary(record)
        tracker.finish(failed=failed)


def build_model(cfg: DictConfig, method: Any, task: str, device: str, dtype: Any) -> tuple[Any, Any, int]:
    """Load the base model, let the method prepare and adapt it, place it on ``device``:
    (loaded, adapted model, base footprint in bytes). Runs and ``peft_lab.bench`` share this path."""
    loaded = models.load(cfg.model, task, cfg.dataset.num_labels, method.load_kwargs(device), dtype)
    loaded.model = method.prepare_base(loaded.model)
    base_footprint = loaded.model.get_memory_footprint()
    model = method.adapt(loaded.model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if not getattr(model, "is_loaded_in_4bit", False):  # 4-bit weights were placed by device_map
        model.to(device)
    return loaded, model, base_footprint


def _since_start(t: float | None) -> float | None:
    """Seconds from this process's start to ``t`` (the first optimizer step): start-up cost of a run or cell."""
    from peft_lab.metrics import process_start_time

    start = process_start_time()
    return None if t is None or start is None else round(t - start, 3)


def _main_metric(ds: Any, task: str) -> str:
    if task == "classification":
        return str(ds.metrics[0]) if ds.metrics else "accuracy"
    return "perplexity" if task == "causal_lm" else "mlm_perplexity"


def _device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible. Fix: use train.device=auto or cpu")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _precision(precision: str, device: str):
    """(weights dtype, autocast context factory): bf16 autocast on CUDA, fp32 on CPU by default."""
    import torch

    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise UserError(f"train.precision={precision} is not known. Fix: use auto, fp32, bf16 or fp16")
    if precision == "fp32":
        return torch.float32, contextlib.nullcontext
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.float32, lambda: torch.autocast(dev_type, dtype=dtypes[precision])
