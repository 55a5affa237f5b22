"""Typed schemas for every config group (plain dataclasses; ``peft_lab.config`` registers them).

Values live in ``conf/``; these only say which keys exist and what type each has,
so a misspelt key or ``method.r=abc`` fails at composition with Hydra's message.
Method-specific schemas live in each method's module and extend ``MethodConfig``.

Every closed choice is a ``Choice`` enum, so ``logger.backend=nonee`` or
``train.precision=bf61`` fails at composition with the list of valid values
(``Invalid value 'nonee', expected one of [wandb, none]``). OmegaConf hands such
fields over as enum members: they compare equal to their string value and print
as it, but pass ``.value`` wherever a library or a dict keyed by strings gets one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class Choice(str, Enum):
    """Base of every closed choice in the config: a ``str`` enum that prints as its plain value.

    OmegaConf matches a config string to a member by *name*, so each member's name
    must equal its value (``bf16 = "bf16"``). ``str()`` and f-strings give the value
    (``"bf16"``, not ``"Precision.bf16"``), and a member equals its string.
    """

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)


def plain(value: Any) -> Any:
    """A config value as libraries take it: a ``Choice`` member becomes its plain ``str``; anything else
    (a string from an older config, None) is returned as it is."""
    return str.__str__(value) if isinstance(value, Enum) else value


class Task(Choice):
    """What a dataset trains: ``classification``, ``causal_lm`` or ``masked_lm``."""

    classification = "classification"
    causal_lm = "causal_lm"
    masked_lm = "masked_lm"


class DataSource(Choice):
    """Where ``dataset.*`` data comes from (``dataset.source``)."""

    auto = "auto"  # data_dir, then $PEFT_LAB_DATA_ROOT/<name>, then the Hub
    local = "local"  # a local folder only (data_dir or the env root)
    hub = "hub"  # the Hugging Face Hub (or its cache) only
    synthetic = "synthetic"  # generated in-process; for smoke runs and tests


class EvalMetric(Choice):
    """A metric name in ``dataset.metrics`` (the first is a classification run's main metric)."""

    accuracy = "accuracy"
    macro_f1 = "macro_f1"
    perplexity = "perplexity"  # causal LM
    mlm_perplexity = "mlm_perplexity"  # masked LM (an encoder on an LM dataset)


class TruncationSide(Choice):
    """``dataset.truncation_side``: which end of a too-long text the tokenizer drops (its own setting).
    ``right`` keeps the start; ``left`` keeps the end (a decoder classifies from the last token)."""

    right = "right"
    left = "left"


@dataclass
class DatasetConfig:
    """One dataset (``conf/dataset/*.yaml``): where it lives, its columns, task, metrics and its three splits.

    Three splits, never mixed: ``train_split`` trains; the *selection* split chooses hyper-parameters
    and is what periodic evaluation reports; the *test* split is evaluated once, at the end, and is the
    reported number. A null ``select_split`` carves ``select_size`` rows out of the train split (seeded by
    ``subset_seed``, disjoint from the training rows, duplicates of their texts dropped from training); a
    null ``test_split`` carves ``max_test_samples`` rows the same way.
    """

    name: str = MISSING
    task: Task = MISSING
    hub_path: str = MISSING
    hub_config: Optional[str] = None
    train_split: str = "train"
    select_split: Optional[str] = None  # null: carved from train_split
    test_split: Optional[str] = "validation"  # null: carved from train_split
    select_size: Optional[int] = None  # rows carved (required when select_split is null), or a cap on it
    text_column: str = "text"
    label_column: Optional[str] = "label"
    num_labels: int = 2
    metrics: List[EvalMetric] = field(default_factory=lambda: [EvalMetric.accuracy])
    max_length: int = 128
    truncation_side: TruncationSide = TruncationSide.right
    block_size: int = 256
    source: DataSource = DataSource.auto
    data_dir: Optional[str] = None
    max_train_samples: Optional[int] = None
    max_test_samples: Optional[int] = None  # a cap on the test split (rows carved when test_split is null)
    subset_seed: int = 0
    synthetic_train_size: int = 256
    synthetic_eval_size: int = 64  # rows of each synthetic split other than train


class ModelSource(Choice):
    """Where the model's weights come from (``model.source``)."""

    auto = "auto"  # path, then Hub cache / Hub, then the packaged copy
    path = "path"
    hub = "hub"
    packaged = "packaged"
    config = "config"  # random weights built from `config_kwargs` (tests, smoke)


@dataclass
class ModelConfig:
    """One model (``conf/model/*.yaml``): weights, supported tasks, modules each method adapts."""

    name: str = MISSING
    name_or_path: Optional[str] = None
    path: Optional[str] = None
    source: ModelSource = ModelSource.auto
    packaged: Optional[str] = None
    arch: Optional[str] = None
    config_kwargs: Dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    tasks: List[Task] = field(default_factory=lambda: [Task.classification, Task.causal_lm])
    target_modules: List[str] = field(default_factory=list)
    method_target_modules: Dict[str, List[str]] = field(default_factory=dict)
    cls_head_modules: List[str] = field(default_factory=list)
    keep_unquantised: List[str] = field(default_factory=list)
    trust_remote_code: bool = False


@dataclass
class MethodConfig:
    """Fields every method has; each method module subclasses this."""

    name: str = MISSING
    lr: float = 2e-4
    # the learning rates +protocol=select_lr tries (stage 1); each method's own range
    lr_grid: List[float] = field(default_factory=list)
    target_modules: Optional[List[str]] = None  # null: the model config's list


class Precision(Choice):
    """Floating-point precision: ``train.precision`` and QLoRA's ``method.compute_dtype``."""

    auto = "auto"  # bf16 on CUDA (where supported), fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Scheduler(Choice):
    """``train.scheduler``: the ``transformers.SchedulerType`` names that need nothing beyond warmup
    and total steps (``reduce_lr_on_plateau``, ``greedy``, ``cosine_with_min_lr``,
    ``cosine_warmup_with_min_lr`` and ``warmup_stable_decay`` need a metric or extra kwargs)."""

    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    inverse_sqrt = "inverse_sqrt"


@dataclass
class InferenceConfig:
    """``train.inference.*``: the inference cost measured at the end of every run (``peft_lab.inference``):
    latency per example unmerged and after ``merge_and_unload``, merged == unmerged outputs, footprints."""

    measure: bool = True
    examples: int = 64  # the first N examples of the test split (all of them if fewer)
    repeats: int = 3  # timed passes per model after one warm-up batch; the median is reported


@dataclass
class TrainConfig:
    """The training loop (``train.*``): batches, steps, schedule, evaluation, checkpoints, precision."""

    batch_size: int = 16
    eval_batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    scheduler: Scheduler = Scheduler.linear
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0: evaluate once at the end
    eval_before: bool = False  # also evaluate the untrained model
    log_every: int = 10
    checkpoint_every: int = 50  # 0: only at the end
    resume: bool = True
    save_adapter: bool = True
    precision: Precision = Precision.auto  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N (open: any torch device string)
    threads: int = 0  # torch threads per job; 0: cores / parallel jobs
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model's forward for training
    num_workers: int = 0
    inference: InferenceConfig = field(default_factory=InferenceConfig)


class LoggerBackend(Choice):
    """``logger.backend``: the experiment tracker (``none``: metrics.json only)."""

    wandb = "wandb"
    none = "none"


class LoggerMode(Choice):
    """``logger.mode``: how W&B logs (``auto``: online with an API key and a reachable server, else offline)."""

    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    """The experiment tracker (``conf/logger/*.yaml``); W&B keys are ignored with ``backend: none``."""

    name: str = MISSING
    backend: LoggerBackend = LoggerBackend.none
    project: str = "peft_lab"
    entity: Optional[str] = None
    mode: LoggerMode = LoggerMode.auto
    group: Optional[str] = None  # W&B group; default: the sweep (pinned in <sweep>/.cells/group.txt)
    init_timeout: float = 30.0  # seconds wandb.init may take online before falling back to offline
    log_artifacts: bool = False  # upload each run's adapter as a W&B artifact


@dataclass
class ClusterConfig:
    """Where sweep cells run. ``local`` uses ``parallel``; ``slurm`` (and site profiles built on it)
    feeds the rest into ``hydra.launcher.*`` (conf/cluster/slurm.yaml); null leaves a key to the site."""

    name: str = MISSING
    parallel: int = 1  # local: cells run at once
    nproc_per_cell: int = 1  # local: processes (data-parallel ranks) per cell; one CUDA device each on a GPU machine
    nodes: int = 1  # slurm: nodes per array task (one cell)
    tasks_per_node: int = 1  # slurm: processes (data-parallel ranks) per node; set gpus_per_node to match on GPUs
    max_array_size: Optional[int] = None  # slurm: tasks per array job; null: MaxArraySize from scontrol show config
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    timeout_min: int = 60
    array_parallelism: int = 256  # array tasks running at once
    constraint: Optional[str] = None
    setup: List[str] = field(default_factory=list)  # shell lines run in the sbatch script before the cell
    additional_parameters: Dict[str, Any] = field(default_factory=dict)  # extra sbatch options
    max_num_timeout: int = 3  # requeues after a timeout (preemptions requeue without limit)


@dataclass
class Config:
    """The whole run config (``conf/config.yaml``): one option per group plus ``train`` and ``seed``."""

    method: Any = MISSING
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    cluster: ClusterConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    experiment_name: str = "default"


def unknown_keys(cfg: Any) -> list[str]:
    """Dotted keys of ``cfg`` that its schema does not have: a key added on the command line with ``+``
    (Hydra's append bypasses the schema's struct flag), which no code would read. Open mappings
    (``Dict[str, Any]`` fields such as a generic method's ``config``) are not checked here; Hydra's own
    node is skipped."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, DictConfig) or node._is_missing() or node._is_none():
            return
        kind = OmegaConf.get_type(node)
        fields = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
        for key in node.keys():
            name = f"{path}{key}"
            if name == "hydra":
                continue
            if fields is not None and key not in fields:
                found.append(name)
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, f"{name}.")

    walk(cfg, "")
    return found
