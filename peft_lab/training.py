"""The training loop, evaluation and checkpoint/resume.

A plain PyTorch loop rather than the HF Trainer: the methods need hooks after
every optimizer step (sparsity masks), the checkpoint must hold the exact data
position for resume, and the loop must cost no more than a hand-written one
(the benchmark compares them). See README, "Design notes".
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from peft_lab import distributed as dist_mod
from peft_lab import runfiles as rf
from peft_lab.errors import DivergedError
from peft_lab.schemas import plain

log = logging.getLogger(__name__)

CKPT_DIR = rf.CHECKPOINT_DIR


# ----------------------------------------------------------------------------- batches


def collate(examples: list[dict], task: str, tokenizer: Any, generator: Optional[torch.Generator] = None) -> dict:
    """Right-pad a batch; LM labels are -100 on padding (pad == eos on SmolLM2) and on unmasked MLM tokens."""
    pad_id = tokenizer.pad_token_id
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, e in enumerate(examples):
        ids = torch.tensor(e["input_ids"], dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if task == "classification":
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    elif task == "causal_lm":
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        batch["input_ids"], batch["labels"] = _mask_tokens(input_ids, attention_mask, tokenizer, generator)
    return batch


def _mask_tokens(input_ids, attention_mask, tokenizer, generator, prob: float = 0.15):
    """BERT masking: 15 % of real tokens predicted; of those 80 % [MASK], 10 % random, 10 % kept."""
    labels = input_ids.clone()
    chosen = (torch.rand(input_ids.shape, generator=generator) < prob) & (attention_mask == 1)
    labels[~chosen] = -100
    roll = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    rand_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[rand_pos] = torch.randint(len(tokenizer), input_ids.shape, generator=generator)[rand_pos]
    return inputs, labels


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: Any,
    examples: list[dict],
    task: str,
    tokenizer: Any,
    batch_size: int,
    device: str,
    autocast: Any,
    method: Any = None,
    outputs: Optional[list] = None,
) -> dict[str, float]:
    """Accuracy / macro-F1 for classification; token-level NLL and perplexity for LM.

    With several ranks (``peft_lab.distributed``) the batches are dealt out whole (batch i to rank
    i mod size) and the rows gathered, so every rank returns the metrics of the whole set, computed
    from the same batches as one process would.

    The metrics are computed from the per-example values, so ``outputs`` (when a list is given, it is
    filled with one row per example, in order: ``{"id", "label", "pred"}`` for classification,
    ``{"id", "nll", "tokens"}`` per LM block, nll summed in nats) reproduces them exactly:
    ``peft_lab.report.metric_from_outputs``. Perplexity = exp(sum of block NLLs / sum of tokens).
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(1234)  # the same MLM masks in every evaluation
    rows = []
    world = dist_mod.current()
    # batches of similar lengths pad less; the rows go back to the examples' order below
    order = sorted(range(len(examples)), key=lambda k: len(examples[k]["input_ids"]))
    starts = list(range(0, len(examples), batch_size))
    mine = set(starts[world.rank :: world.size])  # several ranks: whole batches dealt out, rows gathered below
    for i in starts:
        chunk = [examples[k] for k in order[i : i + batch_size]]
        if i not in mine:  # another rank's batch: draw its MLM masks all the same (same generator stream)
            if task == "masked_lm":
                collate(chunk, task, tokenizer, generator)
            continue
        batch = _to(collate(chunk, task, tokenizer, generator), device)
        if method is not None:
            method.before_forward(batch, 0, 1, training=False)
        labels = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits.float()
        ids = [e.get("id", k) for k, e in zip(order[i : i + batch_size], chunk)]
        if task == "classification":
            rows += [
                {"id": k, "label": g, "pred": p} for k, g, p in zip(ids, labels.tolist(), logits.argmax(-1).tolist())
            ]
            continue
        if task == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
        rows += [
            {"id": k, "nll": n, "tokens": t} for k, n, t in zip(ids, nll.tolist(), (labels != -100).sum(1).tolist())
        ]
    model.train(was_training)
    positions = [k for i in starts if i in mine for k in order[i : i + batch_size]]
    if world.distributed:
        parts = dist_mod.gather_objects((positions, rows))
        positions, rows = [k for p, _ in parts for k in p], [r for _, rs in parts for r in rs]
    rows = [row for _, row in sorted(zip(positions, rows), key=lambda pair: pair[0])]
    if outputs is not None:
        outputs.extend(rows)
    if task == "classification":
        return classification_metrics([r["pred"] for r in rows], [r["label"] for r in rows])
    nll_sum, count = sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
    mean = nll_sum / max(1, count)
    name = "perplexity" if task == "causal_lm" else "mlm_perplexity"
    return {"eval_loss": mean, name: math.exp(min(mean, 700.0)), "eval_tokens": count}


def classification_metrics(preds: list[int], golds: list[int]) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes seen in either list) of predicted vs gold label ids; 0..1."""
    accuracy = sum(p == g for p, g in zip(preds, golds)) / max(1, len(golds))
    f1s = []
    for c in sorted(set(golds) | set(preds)):
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        f1s.append(2 * tp / max(1, 2 * tp + fp + fn))
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / max(1, len(f1s)), "eval_samples": len(golds)}


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What ``train`` did: optimizer steps (this process and before a resume), wall seconds of this process's
    steps, examples and non-pad tokens of the global batches this process took part in (all ranks' rows),
    the last step's loss (None if no step ran here)."""

    steps: int
    total_steps: int
    wall_s: float
    samples: int
    tokens: int
    final_loss: Optional[float]
    resumed_from: int
    history: list[dict]
    step_times: list[float] = field(default_factory=list)  # seconds per optimizer step, in order
    first_step_done_at: Optional[float] = None  # time.time() when this process finished its first step

    @classmethod
    def nothing(cls) -> TrainResult:
        """No loop ran: the method trains nothing for this task (``Method.trains()`` is False)."""
        return cls(0, 0, 0.0, 0, 0, None, 0, [])


def train(
    model: Any,
    method: Any,
    examples: list[dict],
    *,
    cfg: Any,
    task: str,
    tokenizer: Any,
    device: str,
    autocast: Any,
    run_dir: Path,
    on_log: Callable[[dict, int], None],
    on_eval: Callable[[int], None],
    grad_scaler: bool = False,
    on_progress: Optional[Callable[[int, int, int], None]] = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.train`` (steps or epochs), resuming from ``run_dir/checkpoint`` if asked.

    Args:
        model: the PEFT model (its trainable parameters are optimised), already on ``device``.
        method: the method object (hooks ``before_forward``, ``extra_loss``, ``after_optimizer_step``,
            ``optimizer_class``, ``state_dict``).
        examples: tokenized examples, ``{"input_ids": list[int]}`` plus ``"labels": int`` for classification.
        cfg: the composed config (``cfg.train``, ``cfg.method.lr``, ``cfg.seed``).
        task: ``classification``, ``causal_lm`` or ``masked_lm``.
        tokenizer: gives ``pad_token_id`` (and ``mask_token_id`` for masked LM).
        device: ``cpu``, ``cuda``, ``cuda:N``, ...
        autocast: a zero-argument factory of the autocast context (``contextlib.nullcontext`` for fp32).
        run_dir: the run folder; the checkpoint lives in ``run_dir/checkpoint``.
        on_log: called ``(entry, step)`` every ``train.log_every`` steps and at the last one; ``entry`` has
            ``step``, ``loss`` (the step's loss, below), ``lr``, ``samples_per_s``, ``tokens_per_s``.
        on_eval: called with the step every ``train.eval_every`` steps (not at the last one).
        on_progress: if given, called ``(steps done, total steps, step resumed from (0: fresh))`` once before
            the first step and after every optimizer step (outside the timed part of the step).
        grad_scaler: use a ``torch.amp.GradScaler`` (for fp16 autocast): the loss is scaled for backward,
            gradients are unscaled before clipping, steps with inf/nan gradients are skipped and the scale
            adapts; its state is checkpointed with the rest.

    One optimizer step takes ``train.grad_accum`` micro-batches of ``train.batch_size`` examples (fewer at
    the end of an epoch). Each micro-batch's mean loss is weighted by its share of the group's examples
    (classification) or predicted tokens (causal LM: ``labels[:, 1:] != -100``; masked LM:
    ``labels != -100``), so the step optimises, and logs, the mean loss over all of the step's examples
    or tokens, exactly as one batch of the whole group would. The method's ``extra_loss`` (a penalty on
    the weights) is added once per step, and is part of the logged loss.

    Several ranks (``peft_lab.distributed``): the global batch is the same; each rank computes its
    rows of every micro-batch (``distributed.shard``), weighted by their share of the group's count,
    and the gradients are summed over ranks once per step, so every rank takes the one-process step
    (up to reduction order). Rank 0 alone writes the checkpoint; every rank resumes from it.

    The step losses stay on the device and are read (one host sync, summed over ranks) at log,
    evaluation and checkpoint steps and at the end; ``train.compile`` runs the training forward
    through ``torch.compile``.

    Returns:
        TrainResult; ``final_loss`` is the last step's loss, ``wall_s`` and ``step_times`` are seconds.

    Raises:
        DivergedError: the loss of an optimizer step is nan or inf, with that step. Raised when the losses
            are next read (the next log, evaluation or checkpoint step, or the end), so before any checkpoint
            or evaluation after it: the last checkpoint saved stays the last good one.
        RuntimeError: the checkpoint does not match the model.
    """
    tc = cfg.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_cls, opt_name = method.optimizer_class(device)
    optimizer = opt_cls(trainable, lr=cfg.method.lr, weight_decay=tc.weight_decay)
    micro_per_epoch = math.ceil(len(examples) / tc.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    total = tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(tc.epochs * steps_per_epoch))
    from transformers import get_scheduler

    schedule = plain(tc.scheduler)  # a schemas.Scheduler member -> its plain name
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=round(tc.warmup_ratio * total), num_training_steps=total
    )
    scaler = torch.amp.GradScaler(device.split(":")[0]) if grad_scaler else None
    pos = {"step": 0, "epoch": 0, "micro": 0}
    mlm_gen = torch.Generator().manual_seed(cfg.seed)  # masked-LM masks; part of the checkpointed RNG state
    ckpt = run_dir / CKPT_DIR
    if tc.resume and (ckpt / "state.json").exists():
        pos = load_checkpoint(ckpt, model, optimizer, scheduler, method, mlm_gen, scaler=scaler)
        log.info(f"Resumed from step {pos['step']} (epoch {pos['epoch']}, batch {pos['micro']}) of {total}")
    resumed_from = pos["step"]
    log.info(
        f"Training {total} steps ({steps_per_epoch}/epoch, batch {tc.batch_size} x {tc.grad_accum}), "
        f"optimizer {opt_name}, lr {cfg.method.lr}" + (", fp16 gradient scaler" if scaler is not None else "")
    )

    if on_progress is not None:
        on_progress(pos["step"], total, resumed_from)

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    model.train()
    world = dist_mod.current()
    dist_mod.broadcast_parameters(trainable)  # every rank starts from rank 0's adapters
    forward = model
    if tc.compile:
        forward = torch.compile(model)  # the training forward only; hooks and evaluation use the model itself
    history, samples, tokens, last_loss = [], 0, 0, None
    timer = StepTimer(device)
    first_step_done_at: Optional[float] = None
    window_t, window_samples, window_tokens = time.perf_counter(), 0, 0
    pending: list[tuple[int, torch.Tensor]] = []  # (step, its loss on the device): read at log steps only
    zero = torch.zeros((), device=device)

    def read_losses() -> Optional[float]:
        """The pending steps' losses (summed over ranks) in one host sync; the last one. Raises DivergedError
        at the first non-finite one (the run is failed: nothing is saved after it)."""
        nonlocal pending
        if not pending:
            return None
        values = dist_mod.all_reduce_sum(torch.stack([v.float() for _, v in pending])).tolist()
        steps, pending = [k for k, _ in pending], []
        for k, v in zip(steps, values):
            if not math.isfinite(v):
                optimizer.zero_grad(set_to_none=True)
                raise DivergedError(k, v, total)
        return values[-1]

    while pos["step"] < total:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed * 100003 + pos["epoch"]))
        micros = [order[i : i + tc.batch_size].tolist() for i in range(0, len(examples), tc.batch_size)]
        while pos["micro"] < len(micros) and pos["step"] < total:
            timer.start()
            group = micros[pos["micro"] : pos["micro"] + tc.grad_accum]
            # collate the whole group first (on the host, in the same order as ever, so the masked-LM
            # generator advances as before): each micro-batch's weight needs the group's total count.
            # Every rank collates the global batch and computes its own rows of each micro-batch.
            batches = [collate([examples[i] for i in idx], task, tokenizer, mlm_gen) for idx in group]
            counts = [loss_count(b, task) for b in batches]
            group_count = sum(counts)
            step_loss = None  # this rank's share of the step's loss, on the device
            for batch, n in zip(batches, counts):
                n_tok = int(batch["attention_mask"].sum())
                samples += len(batch["input_ids"])
                tokens += n_tok
                window_samples += len(batch["input_ids"])
                window_tokens += n_tok
                if n == 0:  # nothing to predict here (its mean loss would be 0/0): no part in the step
                    continue
                part, n_part, padding = batch, n, False
                if world.distributed:
                    rows = dist_mod.shard(len(batch["input_ids"]))
                    padding = not rows  # fewer rows than ranks: a stand-in row keeps this rank in step
                    part = {k: v[rows or [0]] for k, v in batch.items()}
                    n_part = 0 if padding else loss_count(part, task)
                part = _to(part, device)
                method.before_forward(part, pos["step"], total, training=True, shared=world.distributed,
                                      padding=padding)  # fmt: skip
                with autocast():
                    loss = forward(**part).loss
                if n_part == 0:  # forward only (methods may choose per global batch); nothing to learn here
                    continue
                if n_part != group_count:  # the mean over these rows -> their share of the group's mean
                    loss = loss * (n_part / group_count)
                backward(loss)
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            extra = None
            if world.main:  # once per step, whatever the accumulation and the number of ranks
                with autocast():
                    extra = method.extra_loss(model)
            if extra is not None:
                if torch.is_tensor(extra) and extra.requires_grad:
                    backward(extra)
                extra = torch.as_tensor(extra).detach().float()
                step_loss = extra if step_loss is None else step_loss + extra.to(step_loss.device)
            dist_mod.sum_gradients(trainable)  # one all_reduce of every gradient (several ranks)
            if any(p.grad is not None for p in trainable):  # else nothing to step (and no gradient to scale)
                if scaler is not None:
                    if tc.max_grad_norm > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
                    scaler.step(optimizer)  # skipped when the gradients hold inf/nan (the scale then drops)
                    scaler.update()
                else:
                    if tc.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
                    optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pos["step"] += 1
            pos["micro"] += len(group)
            pending.append((pos["step"], zero if step_loss is None else step_loss))
            method.after_optimizer_step(model, pos["step"], total)
            timer.stop()
            if first_step_done_at is None:
                if timer.cuda:
                    torch.cuda.synchronize()  # once: the first step done, not just launched
                first_step_done_at = time.time()
            if on_progress is not None:
                on_progress(pos["step"], total, resumed_from)
            log_now = pos["step"] % max(1, tc.log_every) == 0 or pos["step"] == total
            eval_now = tc.eval_every > 0 and pos["step"] % tc.eval_every == 0 and pos["step"] < total
            ckpt_now = tc.checkpoint_every > 0 and pos["step"] % tc.checkpoint_every == 0 and pos["step"] < total
            if log_now or eval_now or ckpt_now:
                last_loss = read_losses()
                timer.flush()  # the device has caught up: the steps' times are known now
            if log_now:
                now = time.perf_counter()
                rate = window_samples / max(1e-9, now - window_t)
                tok_rate = window_tokens / max(1e-9, now - window_t)
                window_t, window_samples, window_tokens = now, 0, 0
                entry = {
                    "step": pos["step"],
                    "loss": last_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": rate,
                    "tokens_per_s": tok_rate,
                }
                history.append(entry)
                eta = (total - pos["step"]) * sum(timer.times) / max(1, pos["step"] - resumed_from)
                log.info(
                    f"step {pos['step']}/{total}  loss {last_loss:.4f}  lr {entry['lr']:.2e}  "
                    f"{rate:.1f} samples/s  eta {eta:.0f}s"
                )
                on_log(entry, pos["step"])
            if eval_now:
                on_eval(pos["step"])
            if ckpt_now:
                save_checkpoint(ckpt, model, optimizer, scheduler, method, pos, mlm_gen, scaler=scaler)
        if pos["micro"] >= len(micros):
            pos["epoch"] += 1
            pos["micro"] = 0
    last_loss = read_losses() if pending else last_loss
    timer.flush()
    save_checkpoint(ckpt, model, optimizer, scheduler, method, pos, mlm_gen, scaler=scaler)
    return TrainResult(
        steps=pos["step"],
        total_steps=total,
        wall_s=sum(timer.times),
        samples=samples,
        tokens=tokens,
        final_loss=last_loss,
        resumed_from=resumed_from,
        history=history,
        step_times=timer.times,
        first_step_done_at=first_step_done_at,
    )


class StepTimer:
    """Seconds per optimizer step without a host sync per step: wall-clock on a CPU; on CUDA, events recorded on
    the stream at the start and end of each step, read at ``flush`` (after the loop has synced anyway), so a
    step's time is the time the device took from its first to its last kernel, idle gaps included."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.times: list[float] = []
        self._pending: list = []
        self._t0: Any = None

    def start(self) -> None:
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._t0, end))
        else:
            self.times.append(time.perf_counter() - self._t0)

    def flush(self) -> None:
        for start, end in self._pending:
            end.synchronize()
            self.times.append(start.elapsed_time(end) / 1000.0)
        self._pending = []


def loss_count(batch: dict, task: str) -> int:
    """What the model's mean loss over ``batch`` averages: its examples (classification; ``labels`` of shape
    ``(B,)``), its predicted tokens for causal LM (``labels[:, 1:] != -100``: the model shifts the labels
    by one) or for masked LM (``labels != -100``); ``labels`` of shape ``(B, T)``. Read on the host."""
    labels = batch["labels"]
    if task == "classification":
        return int(labels.shape[0])
    if task == "causal_lm":
        labels = labels[:, 1:]
    return int((labels != -100).sum())


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    ckpt: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    method: Any,
    pos: dict,
    generator: Any,
    *,
    scaler: Any = None,
) -> None:
    """Trainable weights, optimizer, scheduler, RNG, method state, the gradient scaler's state (``scaler``, a
    ``torch.amp.GradScaler`` or None) and data position (``pos``: step, epoch, micro), swapped in atomically.

    Several ranks: every rank calls it; rank 0 writes (with every rank's RNG state) and the others wait."""
    world = dist_mod.current()
    rng_ranks = dist_mod.gather_objects(_rng_state(generator)) if world.distributed else None
    if not world.main:
        dist_mod.barrier()
        return
    try:
        _write_checkpoint(ckpt, model, optimizer, scheduler, method, pos, generator, scaler, rng_ranks)
    finally:
        dist_mod.barrier()


def _write_checkpoint(ckpt, model, optimizer, scheduler, method, pos, generator, scaler, rng_ranks) -> None:
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(trainable, tmp / "trainable.pt")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "method": method.state_dict(),
            "rng": _rng_state(generator),
            "rng_ranks": rng_ranks,  # several ranks: each one's RNG state, by rank
            "scaler": scaler.state_dict() if scaler is not None else None,
        },
        tmp / "state.pt",
    )
    (tmp / "state.json").write_text(json.dumps(pos))
    old = ckpt.with_name(f".{ckpt.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    ckpt: Path, model: Any, optimizer: Any, scheduler: Any, method: Any, generator: Any, *, scaler: Any = None
) -> dict:
    """Restore what ``save_checkpoint`` wrote, in place; returns the data position (step, epoch, micro).

    ``scaler`` (a ``torch.amp.GradScaler``) gets the saved scale and growth state when the checkpoint has
    one (a checkpoint written without a scaler leaves it at its initial state).
    Raises RuntimeError when the checkpoint's trainable weights do not match ``model``."""
    trainable = torch.load(ckpt / "trainable.pt", weights_only=True)
    params = dict(model.named_parameters())
    missing = [n for n in trainable if n not in params]
    if missing:
        raise RuntimeError(
            f"checkpoint {ckpt} does not match this model (e.g. {missing[:2]}); delete it to start again"
        )
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    method.load_state_dict(state["method"])
    world, ranks = dist_mod.current(), state.get("rng_ranks")
    _set_rng_state(ranks[world.rank] if ranks and len(ranks) == world.size else state["rng"], generator)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return json.loads((ckpt / "state.json").read_text())


def _rng_state(generator: Any) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: Any) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
