"""Everything a run and a sweep write, in one place: names, the run record, identity, atomic writes.

This module owns the on-disk format. ``run`` (the pipeline), the launchers (``sweep``,
``cell``), ``status``, ``report`` and ``tracking`` read and write run and sweep files only
through it, and it imports nothing of theirs, so none of them needs the launcher.
It stays light (standard library + omegaconf): ``status`` and ``report`` import it
without torch.

A **run dir** holds::

    metrics.json          the run record (RunRecord), strict JSON, rewritten atomically
    progress.json         step / total / resumed_from, rewritten at every log step
    checkpoint/           resume state (peft_lab.training)
    adapter/              save_pretrained output
    train.log             Hydra's job log
    wandb_run_id.txt      the W&B run id, so a resumed run continues the same W&B run
    test_outputs.jsonl    one line per test example (classification: id, label, pred) or LM block
                          (id, nll, tokens): the report's paired statistics read these

A **sweep dir** holds one run dir per cell plus ``.cells/`` (manifest.json, group.txt,
<cell>.log / <cell>.result.json, launcher.pkl), ``summary.md`` / ``summary.csv`` and
``report/``, and ``protocol.json`` when a protocol sweeper (``+protocol=select_lr``) ran it.

**Identity.** A cell's run-dir name is derived from its overrides and is injective: a
name that had to be sanitised or shortened carries a hash of the exact override string
(``cell_dir_name``). What a run *computes* is identified by its **fingerprint**: a hash
of the resolved config without the keys that cannot change a number
(``NON_COMPUTATIONAL``). The fingerprint is stored in the record; a completed run is
reused (skipped) only if its fingerprint equals the new one, and a checkpoint is
resumed only under the same condition (``check_reusable``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Optional

# ----------------------------------------------------------------------------- layout

METRICS_FILE = "metrics.json"
PROGRESS_FILE = "progress.json"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE = "state.json"  # inside checkpoint/: the data position (step, epoch, micro)
ADAPTER_DIR = "adapter"
TRAIN_LOG = "train.log"
WANDB_RUN_ID_FILE = "wandb_run_id.txt"
HYDRA_DIR = ".hydra"  # Hydra's config.yaml / overrides.yaml / hydra.yaml of the latest launch
HYDRA_RECORDED = "recorded"  # .hydra/recorded/: the same files as of the run the record belongs to

CELLS_DIR = ".cells"
MANIFEST_FILE = "manifest.json"
GROUP_FILE = "group.txt"
LAUNCHER_STATE = "launcher.pkl"
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
REPORT_DIR = "report"
MULTIRUN_YAML = "multirun.yaml"
TEST_OUTPUTS = "test_outputs.jsonl"
PROTOCOL_FILE = "protocol.json"


def cells_dir(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / CELLS_DIR


def cell_log(sweep_dir: Path, name: str) -> Path:
    """The local launcher's log of the cell whose run dir is ``name``: one per cell, whatever its index in
    a launch (indices restart with every launch, and a protocol's stages number their cells in turn)."""
    return cells_dir(sweep_dir) / f"{name}.log"


def cell_result(sweep_dir: Path, name: str) -> Path:
    """The small file ``python -m peft_lab.cell`` writes when it ends: {status, error}."""
    return cells_dir(sweep_dir) / f"{name}.result.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def keep_hydra_files(run_dir: Path) -> None:
    """Copy Hydra's files of this launch to ``.hydra/recorded/``: the config of the run the record describes."""
    import shutil

    src = Path(run_dir) / HYDRA_DIR
    if src.is_dir():
        dst = src / HYDRA_RECORDED
        dst.mkdir(exist_ok=True)
        for f in src.glob("*.yaml"):
            shutil.copy2(f, dst / f.name)


def restore_hydra_files(run_dir: Path) -> bool:
    """Hydra rewrites ``.hydra/`` before a run can refuse or skip: put back the files of the recorded run."""
    import shutil

    kept = Path(run_dir) / HYDRA_DIR / HYDRA_RECORDED
    if not kept.is_dir():
        return False
    for f in kept.glob("*.yaml"):
        shutil.copy2(f, Path(run_dir) / HYDRA_DIR / f.name)
    return True


def has_checkpoint(run_dir: Path) -> bool:
    return (checkpoint_dir(run_dir) / CHECKPOINT_STATE).exists()


# ----------------------------------------------------------------------------- status


class Status(str, Enum):
    """The one status vocabulary of runs, cells and report entries.

    A run's record is ``running``, then ``completed``, ``failed`` (an error, a diverged loss)
    or ``interrupted`` (a signal: preemption, timeout, Ctrl-C, a closed terminal; it resumes from
    its checkpoint when run again). A sweep cell is additionally ``pending`` (not started, or in the
    manifest without a record) or ``requeued`` (SLURM: waiting to run again).
    """

    pending = "pending"
    running = "running"
    requeued = "requeued"
    interrupted = "interrupted"
    completed = "completed"
    failed = "failed"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Any) -> Status:
        try:
            return cls(str(getattr(value, "value", value)))
        except ValueError:
            return cls.failed  # an unknown word in a record from elsewhere is not a success


# ----------------------------------------------------------------------------- atomic writes


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write then rename, so a reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:  # a signal mid-write: no stray temporary file
        tmp.unlink(missing_ok=True)
        raise


def finite_or_none(data: Any) -> Any:
    """A copy where every non-finite float (nan, ±inf) is None: JSON has no NaN."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v) for v in data]
    return data


def to_json(data: Any) -> str:
    """Strict JSON (RFC 8259): non-finite floats become null, enums their value, paths strings."""

    def default(o: Any) -> Any:
        if isinstance(o, Enum):
            return o.value
        return str(o)

    return json.dumps(finite_or_none(data), indent=2, sort_keys=True, default=default, allow_nan=False) + "\n"


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, to_json(data))


def read_json(path: Path) -> dict:
    """The file's JSON object, or {} when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------- run record


@dataclass
class RunRecord:
    """What ``metrics.json`` holds: one run, from start to end. Units: seconds, bytes, samples, tokens.

    Written at start (status running), at the end (completed / failed / interrupted) and never
    half: ``save`` is atomic. ``fingerprint`` / ``config`` identify what the run computed.
    """

    status: Status = Status.running
    method: str = ""
    dataset: str = ""
    model: str = ""
    seed: int = 0
    task: Optional[str] = None
    overrides: list = field(default_factory=list)
    run_dir: str = ""
    fingerprint: Optional[str] = None
    config: dict = field(default_factory=dict)  # the computation config (see computation_config)
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    pid: Optional[int] = None
    host: Optional[str] = None
    error: Optional[str] = None
    failure: Optional[str] = None  # error | diverged | user_error | interrupted
    diverged_at_step: Optional[int] = None
    # where and how it ran
    device: Optional[str] = None
    visible_devices: Optional[str] = None  # CUDA_VISIBLE_DEVICES as the run saw it
    compiled: Optional[bool] = None  # train.compile: the training forward ran through torch.compile
    world_size: Optional[int] = None  # data-parallel processes (ranks) the cell ran on; 1: one process
    torch_threads: Optional[int] = None
    precision: Optional[str] = None  # train.precision as resolved: fp32 | bf16 | fp16
    weight_dtype: Optional[str] = None  # dtype of the frozen base weights (4-bit: uint8 storage)
    compute_dtype: Optional[str] = None  # dtype of the matmuls (autocast dtype, or the weight dtype)
    trainable_dtype: Optional[str] = None  # dtype of the trained weights (fp32 master weights under bf16 / fp16)
    grad_scaler: Optional[bool] = None
    model_source: Optional[str] = None
    base_model_folder: Optional[str] = None
    data_source: Optional[str] = None
    train_examples: Optional[int] = None
    select_examples: Optional[int] = None  # the selection split (hyper-parameters, periodic evaluation)
    test_examples: Optional[int] = None  # the test split (evaluated once, at the end)
    select_source: Optional[str] = None  # "split:<name>" or "carved from <train split>"
    test_source: Optional[str] = None
    # parameters (peft_lab.metrics.count_parameters)
    total_params: Optional[int] = None
    base_params: Optional[int] = None
    trainable_params: Optional[int] = None
    adapter_params: Optional[int] = None
    head_params: Optional[int] = None
    trainable_pct: Optional[float] = None
    saved_weights: Optional[str] = None  # what adapter_dir / adapter_bytes hold: adapter | head | full_model | none
    method_metrics: dict = field(default_factory=dict)  # what the method reports about itself
    # results
    eval_before: Optional[dict] = None  # the selection split before training (train.eval_before)
    select: Optional[dict] = None  # metrics on the selection split after training
    test: Optional[dict] = None  # metrics on the test split after training: the reported result
    main_metric: Optional[str] = None
    main_metric_value: Optional[float] = None  # test[main_metric]
    select_metric_value: Optional[float] = None  # select[main_metric]: what a protocol chooses by
    steps: Optional[int] = None
    total_steps: Optional[int] = None
    resumed_from_step: Optional[int] = None
    final_train_loss: Optional[float] = None
    train_history: Optional[list] = None  # this attempt's logged steps: {step, loss, lr, samples_per_s, tokens_per_s}
    train_wall_s: Optional[float] = None
    step_time_median_s: Optional[float] = None
    time_to_first_step_s: Optional[float] = None
    samples_per_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    model_footprint_bytes: Optional[int] = None
    peak_memory_bytes: Optional[int] = None
    peak_memory_kind: Optional[str] = None
    adapter_dir: Optional[str] = None
    adapter_bytes: Optional[int] = None
    inference: Optional[dict] = (
        None  # inference cost (peft_lab.inference.measure): latency unmerged / merged, footprints
    )
    run_wall_s: Optional[float] = None
    versions: dict = field(default_factory=dict)
    git_commit: Optional[str] = None
    wandb_run_id: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_mode: Optional[str] = None

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        """Tolerant of records written by other versions: unknown keys are dropped, missing ones default."""
        known = {f.name for f in fields(cls)}
        rec = cls(**{k: v for k, v in data.items() if k in known})
        rec.status = Status.parse(rec.status)
        return rec

    def to_dict(self) -> dict:
        return finite_or_none(asdict(self))

    @property
    def value(self) -> Optional[float]:
        """The main metric on the test split, only for a completed run and only when it is a finite number."""
        return self._finite(self.main_metric_value)

    @property
    def select_value(self) -> Optional[float]:
        """The main metric on the selection split, only for a completed run and only when finite."""
        return self._finite(self.select_metric_value)

    def _finite(self, v: Any) -> Optional[float]:
        if self.status != Status.completed or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v)

    def save(self, run_dir: Path) -> None:
        write_json_atomic(Path(run_dir) / METRICS_FILE, self.to_dict())

    def end(self, status: Status, err: Optional[BaseException] = None) -> None:
        """Mark the record finished with ``status`` (and the error that ended it, if any)."""
        self.status = status
        self.finished_at = now()
        if err is not None:
            self.error = f"{type(err).__name__}: {err}"


def read_record(run_dir: Path) -> Optional[RunRecord]:
    """The run's record, or None when it has none (or an unreadable one)."""
    data = read_json(Path(run_dir) / METRICS_FILE)
    return RunRecord.from_dict(data) if data else None


def write_outputs(run_dir: Path, rows: list[dict]) -> None:
    """``test_outputs.jsonl``: one JSON object per test example, in evaluation order (atomic).

    Classification: ``{"id": row index in the split file, "label": gold class, "pred": predicted class}``.
    Causal / masked LM: ``{"id": block index, "nll": summed token NLL in nats, "tokens": predicted tokens}``.
    Floats are written with ``repr`` precision, so the metric recomputed from the file is the reported one.
    """
    write_atomic(Path(run_dir) / TEST_OUTPUTS, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))


def read_outputs(run_dir: Path) -> Optional[list[dict]]:
    """The rows of ``test_outputs.jsonl``, or None when the run has none (or an unreadable one)."""
    try:
        text = (Path(run_dir) / TEST_OUTPUTS).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError):
        return None


def read_protocol(sweep_dir: Path) -> dict:
    """``protocol.json`` of a protocol sweep (``peft_lab.protocol``), or {} for a plain sweep."""
    return read_json(Path(sweep_dir) / PROTOCOL_FILE)


def write_protocol(sweep_dir: Path, data: dict) -> None:
    write_json_atomic(Path(sweep_dir) / PROTOCOL_FILE, data)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def pid_alive(pid: Optional[int], host: Optional[str], since: Optional[str] = None) -> Optional[bool]:
    """Is the process a record names still running? None when it cannot be told (another host).

    ``since``: the record's ``started_at``; a live process that started after it is another process
    that got the same pid, so it does not count.
    """
    import socket

    if not pid or (host and host != socket.gethostname()):
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        if Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie is not alive
            return False
        started = process_started_at(int(pid))
        if since and started is not None and started > time.mktime(time.strptime(since, "%Y-%m-%dT%H:%M:%S")) + 2:
            return False
    except (OSError, IndexError, ValueError):
        pass
    return True


def process_started_at(pid: int | str = "self") -> Optional[float]:
    """When a process started (epoch seconds), from /proc on Linux; None elsewhere."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields_[19])  # field 22 (starttime), counted after the ")" that ends the command name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------- progress


def write_progress(run_dir: Path, step: int, total: int, resumed_from: int) -> None:
    """``progress.json``: the optimizer step reached, of ``total``, this attempt resumed from (0: fresh)."""
    write_json_atomic(
        Path(run_dir) / PROGRESS_FILE, {"step": step, "total": total, "resumed_from": resumed_from, "at": now()}
    )


def read_progress(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / PROGRESS_FILE)


def checkpoint_step(run_dir: Path) -> Optional[int]:
    try:
        return int(read_json(checkpoint_dir(run_dir) / CHECKPOINT_STATE)["step"])
    except (KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- identity

_SAFE = re.compile(r"[^A-Za-z0-9_.,=+-]+")
MAX_DIR_NAME = 150


def cell_dir_name(override_dirname: str) -> str:
    """A run-dir name derived only from the cell's overrides; distinct overrides give distinct names.

    Readable when it can be: the override string itself if it is made of safe characters and
    at most ``MAX_DIR_NAME`` long. Otherwise the sanitised, shortened string plus ``~`` and a
    12-hex-digit SHA-256 of the exact string (``~`` never appears in a plain name, so a
    hashed name cannot equal a plain one): ``data_dir=/a/x/y`` and ``data_dir=/a/x_y``
    differ, and so do two long strings that share their first 150 characters.
    """
    raw = override_dirname or ""
    safe = _SAFE.sub("_", raw)
    if raw and safe == raw and len(raw) <= MAX_DIR_NAME:
        return raw
    if not raw:
        return "default"
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    return f"{safe[: MAX_DIR_NAME - 13]}~{digest}"


# keys that cannot change any number a run reports: where and how it is logged, scheduled,
# checkpointed and named. Everything else in the resolved config is part of the fingerprint.
# the pid a sweep cell (or a rank of a multi-process cell) watches: it stops when that process is gone
LAUNCHER_PID_ENV = "PEFT_LAB_LAUNCHER_PID"

NON_COMPUTATIONAL = (
    "logger",
    "cluster",
    "hydra",
    "experiment_name",
    "train.log_every",
    "train.threads",
    "train.resume",
    "train.checkpoint_every",
    "train.save_adapter",
    "train.num_workers",
    "train.compile",  # an execution detail, like the thread count
    "method.lr_grid",  # what a protocol may try; a run trains with method.lr alone
)


def computation_config(cfg: Any) -> dict:
    """The resolved config (a DictConfig or a plain dict) without ``NON_COMPUTATIONAL`` keys, as plain JSON types."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        if "hydra" in cfg:  # a launcher's per-cell config: Hydra's own node is not part of the run
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
        cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    data = json.loads(to_json(cfg))
    for key in NON_COMPUTATIONAL:
        node, *rest = key.split(".")
        if not rest:
            data.pop(node, None)
        elif isinstance(data.get(node), dict):
            data[node].pop(rest[0], None)
    return data


def fingerprint(comp: dict) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of a computation config."""
    return hashlib.sha256(json.dumps(comp, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def flatten(data: Any, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def config_diff(old: dict, new: dict, limit: int = 8) -> list[str]:
    """``key: old -> new`` for every flattened key whose value differs (at most ``limit``, then a count)."""
    a, b = flatten(old), flatten(new)
    missing = object()
    diffs = [
        f"{k}: {json.dumps(a.get(k)) if k in a else '(absent)'} -> {json.dumps(b.get(k)) if k in b else '(absent)'}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


class Reuse(str, Enum):
    """What may be done with a run dir that already exists, for a run of a given fingerprint."""

    fresh = "fresh"  # nothing there: start from step 0
    skip = "skip"  # completed with the same config: nothing to do
    resume = "resume"  # same config, not completed: resume from its checkpoint (if any)
    conflict = "conflict"  # a record or checkpoint of another config: refuse


@dataclass
class ReuseDecision:
    action: Reuse
    record: Optional[RunRecord] = None
    diff: list = field(default_factory=list)

    def conflict_message(self, run_dir: Path) -> str:
        what = (
            "a completed run" if self.record and self.record.status == Status.completed else "a run and its checkpoint"
        )
        keys = "; ".join(self.diff) if self.diff else "it has no fingerprint (written by an older peft_lab)"
        return f"{run_dir} holds {what} of a different config ({keys})"


def check_reusable(run_dir: Path, comp: dict) -> ReuseDecision:
    """Decide whether ``run_dir`` may be used for a run whose computation config is ``comp``.

    A completed record is reused (``skip``) only if its fingerprint equals ``fingerprint(comp)``;
    a checkpoint or partial record only if the same holds (``resume``). Any record or checkpoint
    of another (or an unknown) config is a ``conflict``: it is never overwritten or resumed
    silently. A record that never got past start-up (no checkpoint, not completed) is ``fresh``.
    """
    run_dir = Path(run_dir)
    rec = read_record(run_dir)
    ckpt = has_checkpoint(run_dir)
    if rec is None and not ckpt:
        return ReuseDecision(Reuse.fresh)
    fp = fingerprint(comp)
    same = rec is not None and rec.fingerprint == fp
    if same:
        if rec.status == Status.completed:
            return ReuseDecision(Reuse.skip, rec)
        return ReuseDecision(Reuse.resume if ckpt else Reuse.fresh, rec)
    if rec is not None and rec.status != Status.completed and not ckpt:
        return ReuseDecision(Reuse.fresh, rec)  # an earlier start-up failure left only a record
    diff = config_diff(rec.config, comp) if rec is not None and rec.config else []
    return ReuseDecision(Reuse.conflict, rec, diff)


# ----------------------------------------------------------------------------- sweep manifest


def read_manifest(sweep_dir: Path) -> dict:
    """``<sweep>/.cells/manifest.json`` (written by the launchers), or {}."""
    return read_json(cells_dir(sweep_dir) / MANIFEST_FILE)


def write_manifest(sweep_dir: Path, data: dict) -> None:
    write_json_atomic(cells_dir(sweep_dir) / MANIFEST_FILE, data)


def read_group(sweep_dir: Path) -> Optional[str]:
    path = cells_dir(sweep_dir) / GROUP_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def write_group(sweep_dir: Path, group: str) -> None:
    write_atomic(cells_dir(sweep_dir) / GROUP_FILE, group + "\n")
