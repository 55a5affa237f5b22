"""One run, start to finish: checks -> data -> model -> method -> train -> evaluate -> metrics.json.

``main`` is Hydra's task function (what ``train.py`` calls): it builds a ``RunContext``
from Hydra's runtime and calls ``execute``, which needs no Hydra runtime, so tests and
tools run the same pipeline in-process. Cheap checks run before torch is imported, so a
bad combination fails in a second with a one-line message and exit code 2.

Outcome, as written to ``metrics.json`` (``peft_lab.runfiles.RunRecord``):
``completed`` with the main metric; ``failed`` (an error, a diverged loss, a non-finite
metric: never a number); ``interrupted`` (a signal; resumes from its checkpoint). A run dir
that already holds a completed run of the same config is not run again; one that holds a
run of another config is refused (``runfiles.check_reusable``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from peft_lab import data as data_mod
from peft_lab import models
from peft_lab import runfiles as rf
from peft_lab.errors import DivergedError, UserError, fail
from peft_lab.methods import get_method_class
from peft_lab.schemas import plain

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Where a run writes and how it was asked for; all the pipeline needs from Hydra's runtime.

    ``run_dir``: the run's folder. ``sweep_dir``: the sweep it belongs to (None for a single
    run). ``overrides``: the command-line overrides of this run (``hydra.overrides.task``).
    """

    run_dir: Path
    sweep_dir: Optional[Path] = None
    overrides: list = field(default_factory=list)

    @property
    def multirun(self) -> bool:
        return self.sweep_dir is not None


def context_from_hydra() -> RunContext:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    sweep_dir = Path(str(hc.sweep.dir)) if hc.mode == RunMode.MULTIRUN else None
    return RunContext(Path(hc.runtime.output_dir), sweep_dir, list(hc.overrides.task))


def main(cfg: DictConfig) -> Optional[float]:
    """Hydra's task function. A single run turns a UserError into exit 2 and a diverged run into
    exit 1, each with one ``peft_lab: error:`` line; in a sweep the launcher reports them."""
    ctx = context_from_hydra()
    if not ctx.multirun:  # cluster.nproc_per_cell=N: the other ranks run this command into the same run dir
        from peft_lab import distributed
        from peft_lab.cell import watch_launcher

        args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
        distributed.rank_command = lambda rank: [sys.executable, sys.argv[0], *args, f"hydra.run.dir={ctx.run_dir}",
                                                 "hydra.output_subdir=null"]  # fmt: skip
        if int(os.environ.get("RANK") or 0) > 0:
            watch_launcher()  # rank 0 started this process: stop when it is gone
    try:
        if not ctx.multirun:
            _check_no_sweeper_alone()
        return execute(cfg, ctx)
    except (KeyboardInterrupt, SystemExit) as stop:
        if ctx.multirun or (isinstance(stop, SystemExit) and not isinstance(stop.code, int)):
            raise
        code = 130 if isinstance(stop, KeyboardInterrupt) else stop.code
        if int(os.environ.get("RANK") or 0) == 0:  # one line per run, not per rank
            print(f"peft_lab: interrupted; run the same command again to resume ({ctx.run_dir})", file=sys.stderr,
                  flush=True)  # fmt: skip
        sys.exit(code)
    except (UserError, DivergedError) as err:
        if ctx.multirun:
            raise
        if isinstance(err, UserError):  # execute already logged a divergence
            log.error(str(err))
        print(f"peft_lab: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(err, UserError) else 1)


def _check_no_sweeper_alone() -> None:
    """A protocol sweeper (``+protocol=select_lr``) only acts in a ``-m`` sweep: a single run with it would
    train at ``method.lr`` and look like the protocol's result. Raises UserError."""
    from hydra.core.hydra_config import HydraConfig

    target = str(HydraConfig.get().sweeper.get("_target_", ""))
    if target.endswith("SelectLrSweeper"):
        raise fail(
            "+protocol=select_lr chooses the learning rate over a sweep, but this is a single run (no -m)",
            "add -m: python train.py -m ... +protocol=select_lr",
        )


def execute(cfg: DictConfig, ctx: RunContext) -> Optional[float]:
    """Run one configuration into ``ctx.run_dir``; return the main metric (None if it was not computed).

    Raises ``UserError`` for bad input (nothing is written but a ``failed`` record),
    ``DivergedError`` when the training loss is not finite (record ``failed``, failure
    ``diverged``, no adapter saved); any other error propagates after the record says ``failed``.
    """
    from peft_lab import distributed

    world = _world(cfg)
    comp = rf.computation_config(cfg)
    decision = rf.check_reusable(ctx.run_dir, comp)
    if decision.action in (rf.Reuse.conflict, rf.Reuse.skip) and world.main:
        rf.restore_hydra_files(ctx.run_dir)  # .hydra/ keeps describing the run that is there
    if decision.action == rf.Reuse.conflict:
        raise fail(
            decision.conflict_message(ctx.run_dir),
            "write this run to a new folder (hydra.sweep.dir=... or hydra.run.dir=...), or delete that folder "
            "to run it again there",
        )
    if decision.action == rf.Reuse.skip:
        rec = decision.record
        log.info(
            f"{ctx.run_dir}: already completed with this config ({rec.main_metric} = {rec.main_metric_value}); "
            "nothing to do"
        )
        return rec.value
    if not cfg.train.resume and rf.has_checkpoint(ctx.run_dir) and world.main:
        log.info("train.resume=false: discarding the checkpoint in this run dir; starting from step 0")
        shutil.rmtree(rf.checkpoint_dir(ctx.run_dir))
    if world.main:
        rf.keep_hydra_files(ctx.run_dir)
    t0 = time.perf_counter()
    record = rf.RunRecord(
        status=rf.Status.running,
        method=str(cfg.method.name),
        dataset=str(cfg.dataset.name),
        model=str(cfg.model.name),
        seed=int(cfg.seed),
        overrides=list(ctx.overrides),
        run_dir=str(ctx.run_dir),
        fingerprint=rf.fingerprint(comp),
        config=comp,
        started_at=rf.now(),
        pid=os.getpid(),
        host=_host(),
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    if not world.main:  # another rank of a multi-process cell: it computes, rank 0 writes every file
        logging.getLogger("peft_lab").setLevel(logging.WARNING)
        try:
            return _pipeline(cfg, ctx, record, {}, t0, world)
        finally:
            distributed.shutdown()
    record.save(ctx.run_dir)
    tracker_box: dict = {}
    ranks = None
    try:
        with _sigterm_interrupts():
            ranks, world = _start_ranks(cfg, world, record, ctx.run_dir)
            value = _pipeline(cfg, ctx, record, tracker_box, t0, world)
    except BaseException as err:
        interrupted = isinstance(err, (SystemExit, KeyboardInterrupt))
        # a rank that died first is the cause, not the symptom (rank 0's error is then a collective's); a divergence
        # or a bad input ends every rank alike, and rank 0's own message says it
        shared = interrupted or isinstance(err, (UserError, DivergedError))
        dead = ranks.dead(wait_s=3.0) if ranks is not None and not shared else []
        if ranks is not None:
            ranks.stop(wait_s=10.0)
        distributed.shutdown()
        record.end(rf.Status.interrupted if interrupted else rf.Status.failed, err)
        if dead:
            record.error = f"{'; '.join(dead)} (see its lines in the log), then rank 0: {record.error}"
            log.error(f"{'; '.join(dead)}: the cell failed")
        record.failure = (
            "interrupted"
            if interrupted
            else "diverged"
            if isinstance(err, DivergedError)
            else "user_error"
            if isinstance(err, UserError)
            else "error"
        )
        if isinstance(err, DivergedError):
            record.diverged_at_step = err.step
            log.error(f"{err}; the run is marked failed")
        record.save(ctx.run_dir)
        _finish_tracker(tracker_box, record, failed=True)
        raise
    if ranks is not None:
        ranks.stop()
    distributed.shutdown()
    _finish_tracker(tracker_box, record, failed=False)
    return value


def nproc_per_cell(cfg: DictConfig) -> int:
    """``cluster.nproc_per_cell`` (1 when the cluster profile has no such key)."""
    value = cfg.cluster.get("nproc_per_cell", 1)
    return 1 if value is None else int(value)


def _world(cfg: DictConfig) -> Any:
    """This process's ``distributed.World`` from the environment, checked against ``cluster.nproc_per_cell``.
    Raises UserError for an incomplete torch.distributed environment or two ways of asking for ranks."""
    from peft_lab import distributed

    nproc = nproc_per_cell(cfg)
    if nproc < 1:
        raise fail(
            f"cluster.nproc_per_cell={nproc} is not a number of processes", "use 1 (one process per cell) or more"
        )
    if (
        str(cfg.cluster.get("name")) == "local"
        and max(int(cfg.cluster.get(k) or 1) for k in ("tasks_per_node", "nodes")) > 1
    ):
        raise fail(
            "cluster.tasks_per_node / cluster.nodes are SLURM settings, but this cell runs on this machine (cluster=local)",
            "use cluster.nproc_per_cell=N here, or cluster=slurm",
        )
    try:
        world = distributed.world_from_env()
    except ValueError as err:
        raise fail(str(err), "see README, 'Several GPUs (or processes) for one cell'") from None
    if world.distributed and nproc > 1 and nproc != world.size:
        raise fail(
            f"cluster.nproc_per_cell={nproc} but this process is already rank {world.rank} of WORLD_SIZE={world.size} "
            "(torchrun or SLURM tasks)",
            "ask for the ranks one way: cluster.nproc_per_cell alone, or cluster.tasks_per_node / torchrun alone",
        )
    return world


def _start_ranks(cfg: DictConfig, world: Any, record: rf.RunRecord, run_dir: Path) -> tuple[Any, Any]:
    """``cluster.nproc_per_cell=N`` in a process that is not yet part of a world: become rank 0 and start
    ranks 1..N-1 (``distributed.LocalRanks``). Returns (the ranks or None, this process's World)."""
    from peft_lab import distributed

    nproc = nproc_per_cell(cfg)
    if nproc <= 1 or world.distributed:
        return None, world
    if distributed.rank_command is None:
        raise fail(
            f"cluster.nproc_per_cell={nproc} needs the ranks to be started from train.py or a sweep cell "
            "(this run was called in-process)",
            "run it with python train.py ... cluster.nproc_per_cell=N, or under torchrun",
        )

    def on_lost(message: str) -> None:  # another rank died: the cell failed, whatever rank 0 was doing
        record.end(rf.Status.failed, RuntimeError(message))
        record.failure = "error"
        record.save(run_dir)

    cores = os.cpu_count() or 1
    if nproc > cores and not os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        log.warning(f"cluster.nproc_per_cell={nproc} processes on {cores} CPU cores: on CPUs they share the cores, "
                    "so the cell runs slower, not faster (each also holds its own copy of the model)")  # fmt: skip
    if nproc > int(cfg.train.batch_size):
        log.warning(f"cluster.nproc_per_cell={nproc} > train.batch_size={cfg.train.batch_size}: some ranks have no row "
                    "of a micro-batch and compute a stand-in row that counts for nothing")  # fmt: skip
    log.info(f"cluster.nproc_per_cell={nproc}: this process is rank 0; starting ranks 1..{nproc - 1}")
    ranks = distributed.LocalRanks(nproc, distributed.rank_command, on_lost)
    return ranks, distributed.world_from_env()


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (``kill``, a launcher stopping its cells) and SIGHUP (a closed terminal) end the run like
    Ctrl-C: the record says ``interrupted`` and the process exits with 128 + the signal. Only where
    nobody else handles the signal: under SLURM, submitit's own handlers decide (preemption and
    timeouts requeue the task)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    mine = [sig for sig in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(sig) == signal.SIG_DFL]

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in mine:
        signal.signal(sig, on_term)
    try:
        yield
    finally:
        for sig in mine:
            signal.signal(sig, signal.SIG_DFL)


def _finish_tracker(box: dict, record: rf.RunRecord, failed: bool) -> None:
    tracker = box.get("tracker")
    if tracker is None:
        return
    try:
        tracker.summary(record.to_dict())
    finally:
        tracker.finish(failed=failed)


def _pipeline(cfg: DictConfig, ctx: RunContext, record: rf.RunRecord, box: dict, t0: float, world: Any) -> float:
    from peft_lab import distributed

    ds, mc = cfg.dataset, cfg.model
    run_dir = ctx.run_dir

    def save() -> None:  # rank 0 alone writes
        if world.main:
            record.save(run_dir)

    # --- start-up checks: no heavy imports yet
    check_known_keys(cfg)
    data_mod.check_config(ds)
    models.check_config(mc)
    check_train_config(cfg.train)
    task = models.resolve_task(mc, plain(ds.task))
    method = get_method_class(cfg.method.name)(cfg.method, mc, task)
    method.validate()
    method.check_overrides(list(record.overrides))
    record.task, record.main_metric = task, main_metric_name(ds, task)

    # --- data next (validated before torch and the model load: bad data fails in a second or two)
    splits = data_mod.load_splits(ds)

    threads = cfg.train.threads or int(os.environ.get("PEFT_LAB_THREADS", 0)) or (os.cpu_count() or 1)
    import torch

    torch.set_num_threads(threads)
    from transformers import set_seed

    from peft_lab import metrics, tracking, training

    set_seed(cfg.seed)
    device = _device(str(cfg.train.device), world)
    prec = resolve_precision(plain(cfg.train.precision), device)
    record.device, record.torch_threads, record.precision = device, threads, prec.name
    record.world_size, record.compiled = world.size, bool(cfg.train.compile)
    record.grad_scaler = prec.grad_scaler

    # --- model + method
    loaded, model, base_footprint = build_model(cfg, method, task, device, prec.weight_dtype)
    # several ranks: the rendezvous (every rank waits for the others here). After loading: transformers saves
    # nothing on a rank other than 0 once a process group exists, and the first load may build the model cache
    distributed.init(device)
    dirs = distributed.gather_objects(str(run_dir))
    if len(set(dirs)) > 1:  # e.g. torchrun without hydra.run.dir: each rank's own timestamped folder
        raise fail(
            f"the ranks of this cell run in different folders ({', '.join(sorted(set(dirs)))})",
            "give one: hydra.run.dir=<folder> (torchrun), or use cluster.nproc_per_cell",
        )
    models.check_input_length(ds, task, loaded.model.config if hasattr(loaded.model, "config") else model.config)
    record.weight_dtype, record.compute_dtype, record.trainable_dtype = _dtypes(model, prec)
    train_ex = data_mod.tokenize(ds, loaded.tokenizer, splits.train, ds.max_train_samples)
    select_ex = data_mod.tokenize(ds, loaded.tokenizer, splits.select, ds.select_size if ds.select_split else None)
    test_ex = data_mod.tokenize(ds, loaded.tokenizer, splits.test, ds.max_test_samples if ds.test_split else None)
    gc.collect()
    metrics.reset_peak_memory(device)  # the peak covers training + evaluation, not the loading transient
    record.model_source, record.base_model_folder = loaded.source, loaded.folder
    record.data_source, record.select_source, record.test_source = (
        splits.sources[k] for k in ("train", "select", "test")
    )
    record.train_examples, record.select_examples, record.test_examples = len(train_ex), len(select_ex), len(test_ex)
    _set_fields(record, metrics.count_parameters(model))
    record.saved_weights = method.saved_weights
    if method.saved_weights == "head":  # a plain model's head is not a PEFT-wrapped one: what trains is the head
        record.head_params = record.trainable_params
    record.method_metrics = _json_values(method.metrics(model))
    save()
    log.info(
        f"{record.trainable_params:,} trainable of {record.total_params:,} parameters "
        f"({record.trainable_pct:.3f} %); {len(train_ex)} train / {len(select_ex)} selection / {len(test_ex)} test "
        "examples"
    )

    config = OmegaConf.to_container(cfg, resolve=True)
    swept = tracking.swept_overrides(ctx.sweep_dir, record.overrides)
    with_seed = any(o.startswith("seed=") for o in swept)
    name = tracking.run_name(cfg.method.name, ds.name, mc.name, swept)
    group = tracking.sweep_group(ctx.sweep_dir, cfg.logger.get("group"))
    tags = [cfg.method.name, ds.name, mc.name, task] + ([f"seed{cfg.seed}"] if with_seed else [])
    if world.main:
        tracker = tracking.make_tracker(cfg.logger, run_dir, group, name, config, tags)
    else:
        tracker = tracking.NullTracker()
    box["tracker"] = tracker
    record.wandb_run_id, record.wandb_mode = tracker.run_id, tracker.mode
    record.wandb_group = group if tracker.run_id else None

    def run_eval(examples: list, outputs: Optional[list] = None) -> dict:
        return training.evaluate(model, examples, task, loaded.tokenizer, cfg.train.eval_batch_size, device,
                                 prec.autocast, method, outputs)  # fmt: skip

    if cfg.train.eval_before:
        record.eval_before = run_eval(select_ex)
        log.info(f"before training, selection split: {record.eval_before}")

    def on_eval(step: int) -> None:  # periodic evaluation: the selection split, never the test split
        result = run_eval(select_ex)
        log.info(f"selection split at step {step}: {result}")
        tracker.log({f"select/{k}": v for k, v in result.items()}, step)

    def on_progress(step: int, total: int, resumed_from: int) -> None:
        if world.main and (step in (resumed_from, total) or step % max(1, cfg.train.log_every) == 0):
            rf.write_progress(run_dir, step, total, resumed_from)

    if not method.trains():
        log.info(f"method={cfg.method.name} trains nothing on a {task} task: evaluating the base model as it is")
        result = training.TrainResult.nothing()
    else:
        result = training.train(
            model,
            method,
            train_ex,
            cfg=cfg,
            task=task,
            tokenizer=loaded.tokenizer,
            device=device,
            autocast=prec.autocast,
            run_dir=run_dir,
            on_log=tracker.log,
            on_eval=on_eval,
            on_progress=on_progress,
            grad_scaler=prec.grad_scaler,
        )
    record.steps, record.total_steps, record.resumed_from_step = result.steps, result.total_steps, result.resumed_from
    record.final_train_loss = result.final_loss
    record.train_history = result.history or None
    main_metric = main_metric_name(ds, task)
    record.select = run_eval(select_ex)
    test_outputs: list = []
    record.test = run_eval(test_ex, test_outputs)
    modes = method.eval_modes()  # e.g. SparseLoRA: the main metric under dense and under sparse evaluation
    if modes and main_metric in record.test:
        record.test[f"{main_metric}_{modes[0]}"] = record.test[main_metric]
        for mode in modes[1:]:
            with method.eval_mode(mode):
                record.test[f"{main_metric}_{mode}"] = run_eval(test_ex)[main_metric]
    log.info(f"selection split: {record.select}; test split: {record.test}")
    tracker.log({f"{split}/{k}": v for split in ("select", "test") for k, v in getattr(record, split).items()},
                result.steps)  # fmt: skip
    value = record.test.get(main_metric)
    record.main_metric, record.main_metric_value = main_metric, value
    record.select_metric_value = record.select.get(main_metric)
    for split, v in (("test", value), ("selection", record.select_metric_value)):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RuntimeError(
                f"the {split} split gave {main_metric} = {v} (not a finite number); the run is not a result"
            )
    if world.main:
        rf.write_outputs(run_dir, test_outputs)
    record.train_wall_s = result.wall_s
    record.step_time_median_s = statistics.median(result.step_times) if result.step_times else None
    record.time_to_first_step_s = _since_start(result.first_step_done_at)
    record.samples_per_s = result.samples / max(1e-9, result.wall_s) if result.samples else None
    record.tokens_per_s = result.tokens / max(1e-9, result.wall_s) if result.tokens else None
    record.model_footprint_bytes = base_footprint
    record.method_metrics = _json_values(method.metrics(model))
    _set_fields(record, metrics.peak_memory(device))
    _set_fields(record, metrics.environment())
    if cfg.train.save_adapter and method.saved_weights != "none" and world.main:
        adapter_dir = run_dir / rf.ADAPTER_DIR
        method.save_adapter(model, adapter_dir)
        record.adapter_dir, record.adapter_bytes = str(adapter_dir), metrics.dir_size(adapter_dir)
        if cfg.logger.get("log_artifacts"):
            tracker.log_adapter(adapter_dir, f"adapter-{name}")
    if cfg.train.inference.measure and world.main:  # last: merging folds the adapter into the model in place
        from peft_lab import inference

        record.inference = inference.measure(model, test_ex[: int(cfg.train.inference.examples)], task,
                                             loaded.tokenizer, int(cfg.train.eval_batch_size), device, prec.autocast,
                                             method, int(cfg.train.inference.repeats), record.compute_dtype)  # fmt: skip
        log.info(
            f"inference cost on {record.inference['examples']} test examples: {inference.summary(record.inference)}"
        )
    record.end(rf.Status.completed)
    record.run_wall_s = time.perf_counter() - t0
    save()
    log.info(f"{name}: {main_metric} = {value:.4f}  ({run_dir / rf.METRICS_FILE})")
    return float(value)


def _set_fields(record: rf.RunRecord, values: dict) -> None:
    for k, v in values.items():
        if hasattr(record, k):
            setattr(record, k, v)


def _json_values(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}


def _host() -> str:
    import socket

    return socket.gethostname()


def build_model(cfg: DictConfig, method: Any, task: str, device: str, dtype: Any) -> tuple[Any, Any, int]:
    """Load the base model, let the method prepare and adapt it, place it on ``device``:
    (loaded, adapted model, base footprint in bytes). Runs and ``peft_lab.bench`` share this path."""
    loaded = models.load(cfg.model, task, cfg.dataset.num_labels, method.load_kwargs(device), dtype)
    loaded.model = method.prepare_base(loaded.model)
    base_footprint = loaded.model.get_memory_footprint()
    model = method.adapt(loaded.model)
    trainable_in_fp32(model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if not getattr(model, "is_loaded_in_4bit", False):  # 4-bit weights were placed by device_map
        model.to(device)
    return loaded, model, base_footprint


def trainable_in_fp32(model: Any) -> int:
    """Cast every trainable floating-point parameter that is not fp32 to fp32, in place (a bf16 / fp16 base
    gives its adapters and trainable head copies its own dtype unless PEFT casts them); returns how many
    were cast. The optimizer then updates fp32 master weights while the frozen base stays low-precision."""
    import torch

    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


def _since_start(t: Optional[float]) -> Optional[float]:
    """Seconds from this process's start to ``t`` (the first optimizer step): start-up cost of a run or cell."""
    from peft_lab.metrics import process_start_time

    start = process_start_time()
    return None if t is None or start is None else round(t - start, 3)


def main_metric_name(ds: Any, task: str) -> str:
    """The metric a run reports and a protocol selects by: ``dataset.metrics[0]`` for classification,
    else (causal / masked LM) the perplexity."""
    if task == "classification":
        return str(ds.metrics[0]) if ds.metrics else "accuracy"
    return "perplexity" if task == "causal_lm" else "mlm_perplexity"


def check_known_keys(cfg: DictConfig) -> None:
    """A key the schema does not have (added with ``+`` on the command line, e.g. ``+method.quantize=nf4`` on
    method=lora) would be stored in the run's config and read by nothing: refused. Raises UserError."""
    from peft_lab.schemas import unknown_keys

    extra = unknown_keys(cfg)
    if extra:
        raise fail(
            f"{', '.join(extra)}: not a key of this config (method={cfg.method.name}); nothing would read "
            f"{'it' if len(extra) == 1 else 'them'}",
            "drop the override, or check the key's name and group in README 'Config groups' / 'Methods' "
            "(a generic PEFT method takes its PEFT arguments as method.config.<name>)",
        )


def check_train_config(tc: Any) -> None:
    """Start-up checks of ``train.*`` values that their types allow but no run can use (a batch of 0 rows,
    0 timed passes, ...). Raises UserError naming the key and a value that works."""
    import math

    def need(ok: bool, key: str, what: str, example: str) -> None:
        if not ok:
            raise fail(f"train.{key}={OmegaConf.select(tc, key)} {what}", f"give e.g. train.{key}={example}")

    for key in ("batch_size", "eval_batch_size"):
        need(int(tc[key]) >= 1, key, "is not a number of rows (>= 1)", "8")
    need(int(tc.grad_accum) >= 1, "grad_accum", "is not a number of micro-batches per step (>= 1)", "1")
    need(int(tc.max_steps) > 0 or float(tc.epochs) > 0, "epochs", "with train.max_steps <= 0 trains nothing", "1")
    need(0.0 <= float(tc.warmup_ratio) < 1.0, "warmup_ratio", "is outside [0, 1)", "0.06")
    for key in ("eval_every", "checkpoint_every", "threads", "num_workers", "weight_decay"):
        need(float(tc[key]) >= 0, key, "is negative", "0")
    need(int(tc.log_every) >= 1, "log_every", "is not a number of steps (>= 1)", "10")
    need(math.isfinite(float(tc.max_grad_norm)), "max_grad_norm", "is not a finite number", "1.0")
    if tc.inference.measure:
        need(int(tc.inference.examples) >= 1, "inference.examples", "is not a number of examples (>= 1)", "64")
        need(int(tc.inference.repeats) >= 1, "inference.repeats", "is not a number of timed passes (>= 1)", "3")
    check_device_name(str(tc.device))


def check_device_name(requested: str) -> None:
    """``train.device`` is open (``cuda:3``), but not free text: a UserError for anything else."""
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", requested):
        raise fail(f"train.device={requested} is not a device", "use auto, cpu, cuda, cuda:<index> or mps")


def _device(requested: str, world: Any = None) -> str:
    """``train.device`` -> the torch device of this process; with several ranks on CUDA, ``cuda:<LOCAL_RANK>``
    (one device each, of those visible). Raises UserError for an unusable request."""
    import torch

    check_device_name(requested)
    device = requested
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise fail(f"train.device={requested} but no CUDA device is visible", "use train.device=auto or cpu")
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world is not None and world.distributed and device.startswith("cuda"):
        if ":" in requested:
            raise fail(
                f"train.device={requested} names one device, but the cell runs on {world.size} ranks",
                "use train.device=cuda or auto: rank r uses visible device LOCAL_RANK",
            )
        if world.local_rank >= torch.cuda.device_count():
            raise fail(
                f"rank {world.rank} (local rank {world.local_rank}) has no CUDA device: "
                f"{torch.cuda.device_count()} visible",
                "give the cell as many GPUs as processes per node (cluster.gpus_per_node)",
            )
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    return device


@dataclass
class Precision:
    """How a run computes: ``weight_dtype`` of the loaded base, ``autocast`` (a context factory),
    the autocast dtype (``compute``; None without autocast) and whether fp16 needs a gradient scaler."""

    name: str
    weight_dtype: Any
    compute: Any
    autocast: Callable[[], Any]
    grad_scaler: bool


def resolve_precision(precision: str, device: str) -> Precision:
    """``train.precision`` -> Precision. auto: bf16 on a CUDA device with bf16, else fp32.

    bf16 / fp16 load the frozen base weights in that dtype and run under autocast in it; the trainable
    weights stay fp32 (``build_model`` casts them), as PEFT's ``autocast_adapter_dtype`` and the QLoRA
    recipe do, so the optimizer updates fp32 master weights. fp16 adds a gradient scaler
    (``torch.amp.GradScaler``). Raises UserError for an unknown name.
    """
    import torch

    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise fail(f"train.precision={precision} is not known", "use auto, fp32, bf16 or fp16")
    if precision == "fp32":
        return Precision("fp32", torch.float32, None, contextlib.nullcontext, False)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    low = dtypes[precision]
    return Precision(precision, low, low, lambda: torch.autocast(dev_type, dtype=low), precision == "fp16")


def _dtypes(model: Any, prec: Precision) -> tuple[str, str, Optional[str]]:
    """(frozen weight dtype, compute dtype, trainable dtype) as they are, read from the model: a 4-bit base
    reports its quant type and the bitsandbytes compute dtype; under autocast the compute dtype is autocast's.
    Several dtypes among the frozen (or trainable) weights are joined with ``+`` (e.g. ``bfloat16+float32``)."""
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731

    def names(params: list) -> Optional[str]:
        seen = sorted({name(p.dtype) for p in params if p.is_floating_point()})
        return "+".join(seen) if seen else None

    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = names([p for p in model.parameters() if p.requires_grad])
    weight = name(frozen[0].dtype) if frozen else name(prec.weight_dtype)
    compute = name(prec.compute) if prec.compute is not None else weight
    if quant is not None and getattr(quant, "load_in_4bit", False):
        weight = f"4bit-{quant.bnb_4bit_quant_type}"
        if prec.compute is None:
            compute = name(quant.bnb_4bit_compute_dtype)
    return weight, compute, trainable
