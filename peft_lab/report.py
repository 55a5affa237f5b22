"""A sweep as a paper table and plots: ``python -m peft_lab.report <sweep dir>``.

Reads every cell's ``metrics.json`` and ``test_outputs.jsonl`` (and the sweep's manifest, so cells
that never ran show as pending; and ``protocol.json`` for a learning-rate protocol sweep),
aggregates seeds (mean ± sample std), and writes into ``<sweep>/report/``:

- ``report.md``: rows are methods (one per config variant), columns datasets; each cell holds
  the main metric on the test split, its paired comparison with the column's best row
  (Δ, 95 % interval, Holm-adjusted p), trainable %, peak memory and wall time. The best row
  per dataset is bold (with the 95 % test-sampling interval of its metric); rows not
  distinguishable from it are marked ``≈``. Under the table: a warning per dataset where the
  adapter methods' trainable-parameter budgets differ by more than 10 %. A protocol sweep
  adds the chosen learning rate to each cell and a stage-1 table (selection metric per lr). A sweep
  with ``sparse`` / ``sparselora`` runs adds a "Sparsity study" section: per dataset, one row per
  configuration of LoRA and the sparse methods (mean sparsity, test metric, Δ vs LoRA, median
  training step time and speed-up vs LoRA; ``sparsity_study``). Runs that recorded their inference cost
  (metrics.json ``inference``, ``peft_lab.inference``) add an "Inference cost" section: per method × dataset,
  the latency per example (ms, mean over seeds) unmerged / merged (PEFT's ``merge_and_unload``) and the
  model's footprint (MiB), with a footnote wherever merged outputs differ from unmerged ones or the merge failed.
- ``report.csv``: the same table as numbers (one row per method, columns per dataset);
  ``runs.csv``: one row per run (a protocol sweep's stage-1 runs included, ``stage`` column; its inference
  record as ``inference.<key>`` columns).
- PNG plots: ``PLOTS`` always, ``PROTOCOL_PLOTS`` (selection metric vs lr) for a protocol sweep,
  ``SPARSITY_PLOTS`` (test metric and step time vs sparsity, LoRA as a reference band) for a sweep
  with sparse / sparselora runs, ``INFERENCE_PLOTS`` (unmerged vs merged latency per method) when runs
  recorded their inference cost.

**Statistics.** In each dataset column, every row is compared with the best row (best mean)
by a paired bootstrap (Efron & Tibshirani 1993; Koehn 2004 for NLP test sets): the per-run
metric is recomputed from the per-example test outputs (``metric_from_outputs``), and each of
``BOOTSTRAP_REPS`` resamples draws the test examples with replacement (one draw shared by both
rows and all seeds) and the seeds both rows ran (with replacement, when there are at least
two). The 95 % percentile interval of Δ = row − best and a two-sided bootstrap p follow; the
p-values of one column are Holm-corrected (Holm 1979). A row is ``≈`` (not distinguishable
from the best) when its adjusted p ≥ 0.05, else worse. With one seed the same test runs over
test examples only, and the footnote says the intervals then exclude seed variance. Runs
without ``test_outputs.jsonl`` (older sweeps) are untested, and the footnote says why. The
resampling is seeded (``BOOTSTRAP_SEED``): a report is reproducible.

**Protocol sweeps** (``+protocol=select_lr``): the main table holds only the stage-2 runs (each
arm's chosen lr × every seed); stage-1 runs (one per lr of the grid) appear in the stage-1
table, the ``select_lr`` plot and ``runs.csv``.

It runs at the end of every sweep and logs the table and plots to W&B as a ``report``
run in the sweep's group.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

from peft_lab import runfiles as rf
from peft_lab.runfiles import Status, write_atomic

log = logging.getLogger(__name__)

REPORT_DIR = rf.REPORT_DIR
PLOTS = ("metric_by_method", "metric_vs_trainable", "peak_memory", "throughput", "metric_vs_walltime")
PROTOCOL_PLOTS = ("select_lr",)  # made only for a protocol sweep
SPARSITY_PLOTS = ("sparsity_metric", "sparsity_step_time")  # made only for a sweep with sparse / sparselora runs
INFERENCE_PLOTS = ("latency",)  # made only when a run recorded its inference cost (metrics.json "inference")
_SWEPT_ELSEWHERE = ("method=", "dataset=", "seed=", "hydra.", "cluster", "logger")
_PROTOCOL_KEYS = ("method.lr",)  # what a protocol chooses per arm: shown in the cell, never in the row label

# table rows: the LoRA family, the other adapters, the sparse methods, the baselines; any other method after these,
# alphabetically (``_row_order``)
METHOD_ORDER = (
    "lora", "rslora", "dora", "pissa", "olora", "qlora",
    "hira", "vera", "adalora", "loha", "lokr", "oft", "ia3", "shira",
    "sparse", "sparselora",
    "full", "head",
)  # fmt: skip
DATASET_ORDER = ("sst2", "imdb", "wikitext2")

BOOTSTRAP_REPS = 2000
BOOTSTRAP_SEED = 0
ALPHA = 0.05  # two-sided level of the ≈ mark (after Holm) and of the 95 % intervals
BUDGET_TOLERANCE = 0.10  # adapter rows whose trainable parameters differ by more are flagged
ADAPTER_WEIGHTS = ("adapter", None)  # saved_weights of a parameter-efficient method (None: an older record)
NO_LR = "no lr completed"  # a protocol arm whose stage-1 runs all failed
NO_OUTPUTS = "no test_outputs.jsonl"

# the sparsity study: the sparse methods, the method_metrics key each records its sparsity under (0..1), the reference
SPARSITY_KEYS = {"sparse": "sparsity_achieved", "sparselora": "sparselora_flops_skipped"}
SPARSITY_REFERENCE = "lora"
SPARSITY_XLABEL = "sparsity (sparse: share of adapter weights zero; sparselora: share of base-linear FLOPs skipped)"
EVAL_MODES = ("accuracy_dense", "accuracy_sparse")  # sparselora on classification: test accuracy per evaluation mode

_LM_METRICS = ("perplexity", "mlm_perplexity")

# metrics.json "inference" (peft_lab.inference.measure), flattened into runs.csv as inference.<key>; ms, bytes
INFERENCE_KEYS = ("examples", "batch_size", "repeats", "latency_ms", "merged_latency_ms", "merge", "merge_error",
                  "max_abs_diff", "tolerance", "outputs_match", "pred_agreement", "footprint_bytes",
                  "merged_footprint_bytes")  # fmt: skip
MISMATCH_MARK = "†"  # an inference cell where merged outputs differ from unmerged ones
MERGE_FAILED_MARK = "‡"  # an inference cell where merge_and_unload failed


def _order(name: str, known: tuple) -> int:
    """``name``'s place in ``known``; every other name ranks after all of them (callers sort ties by name)."""
    return known.index(name) if name in known else len(known)


def lower_is_better(metric: str) -> bool:
    return "perplexity" in metric or metric.endswith("loss")


# ----------------------------------------------------------------------------- per-example metrics


def outputs_arrays(rows: list[dict]) -> dict[str, np.ndarray]:
    """The rows of ``test_outputs.jsonl`` as arrays of length N, sorted by example id.

    Keys: ``id`` (int), then ``label`` / ``pred`` (int class ids) for classification, or ``nll``
    (summed token NLL of the block, nats) / ``tokens`` (predicted tokens of the block) for an LM.
    Raises ValueError for no rows, a row without those keys, or an id that occurs twice.
    """
    if not rows:
        raise ValueError("no rows")
    keys = ("label", "pred") if "pred" in rows[0] else ("nll", "tokens")
    try:
        ids = np.array([r["id"] for r in rows], dtype=np.int64)
        cols = {k: np.array([r[k] for r in rows], dtype=np.float64 if k == "nll" else np.int64) for k in keys}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"a row without {'/'.join(keys)} ({type(err).__name__}: {err})") from None
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if np.any(ids[1:] == ids[:-1]):
        raise ValueError("an example id occurs twice")
    return {"id": ids, **{k: v[order] for k, v in cols.items()}}


def _features(metric: str, out: dict[str, np.ndarray], classes: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, k) per-example quantities whose column sums determine the metric (``_metric_of_sums``).

    accuracy: [correct, 1]; macro_f1: [tp, fp, fn] per class of ``classes`` (default: the classes in
    ``out``); perplexity: [nll, tokens]. A bootstrap resample is then a weighted column sum.
    """
    try:
        if metric == "accuracy":
            return np.stack([out["pred"] == out["label"], np.ones(len(out["id"]), bool)], 1).astype(np.float64)
        if metric == "macro_f1":
            classes = np.union1d(out["label"], out["pred"]) if classes is None else classes
            pred, gold = out["pred"][:, None] == classes, out["label"][:, None] == classes  # (N, C)
            return np.stack([pred & gold, pred & ~gold, ~pred & gold], 2).reshape(len(pred), -1).astype(np.float64)
        if metric in _LM_METRICS:
            return np.stack([out["nll"], out["tokens"]], 1).astype(np.float64)
    except KeyError:
        raise ValueError(f"the test outputs hold no {metric} fields") from None
    raise ValueError(f"{metric} cannot be recomputed from test outputs")


def _metric_of_sums(metric: str, sums: np.ndarray) -> np.ndarray:
    """The metric from column sums of ``_features`` (shape (..., k)); returns shape (...)."""
    if metric == "accuracy":
        return sums[..., 0] / sums[..., 1]
    if metric == "macro_f1":  # F1 per class seen (in labels or predictions), averaged over those classes
        s = sums.reshape(*sums.shape[:-1], -1, 3)
        tp, fp, fn = s[..., 0], s[..., 1], s[..., 2]
        denom = 2 * tp + fp + fn
        seen = denom > 0
        f1 = np.where(seen, 2 * tp / np.maximum(denom, 1), 0.0)
        return f1.sum(-1) / np.maximum(seen.sum(-1), 1)
    return np.exp(np.minimum(sums[..., 0] / sums[..., 1], 700.0))  # as peft_lab.training.evaluate caps it


def metric_from_outputs(metric: str, rows: list[dict]) -> float:
    """A run's main metric recomputed from its ``test_outputs.jsonl`` rows (``runfiles.read_outputs``).

    accuracy = mean(pred == label); macro_f1 = mean over the classes seen in labels or predictions of
    F1 = 2·tp / (2·tp + fp + fn); perplexity / mlm_perplexity = exp(Σ nll / Σ tokens) (nats per token).
    Raises ValueError when the rows cannot give ``metric``.
    """
    return _metric_of_arrays(metric, outputs_arrays(rows))


def _metric_of_arrays(metric: str, out: dict[str, np.ndarray]) -> float:
    return float(_metric_of_sums(metric, _features(metric, out).sum(0)))


# ----------------------------------------------------------------------------- paired bootstrap


def holm(pvalues: list[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the order given.

    The i-th smallest of m p-values is multiplied by (m − i + 1), capped at 1, and made
    non-decreasing along that order; rejecting where the adjusted p < α controls the
    family-wise error rate at α. E.g. [0.01, 0.04, 0.03, 0.005] → [0.03, 0.06, 0.06, 0.02].
    """
    m = len(pvalues)
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass
class Comparison:
    """One row of a dataset column against the column's best row (``compare_column``); metric units.

    ``diff``: observed mean over the paired seeds of metric(row) − metric(best); ``ci_low`` /
    ``ci_high``: its 95 % bootstrap percentile interval; ``p_value``: two-sided bootstrap p;
    ``p_holm``: Holm-adjusted over the column. ``mean_ci_low`` / ``mean_ci_high``: the 95 % interval
    of the row's own mean metric over test-example resamples (seed variance not included).
    ``vs_best``: best | within_noise | worse | untested (``note`` says why). The names are ``Agg``'s.
    """

    vs_best: str = "untested"
    diff: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    p_value: Optional[float] = None
    p_holm: Optional[float] = None
    mean_ci_low: Optional[float] = None
    mean_ci_high: Optional[float] = None
    paired_seeds: int = 0  # seeds paired with the best row (the best row: its own seeds)
    test_examples: int = 0  # test examples (LM: blocks) resampled
    note: str = ""


def _resampled_metrics(
    metric: str, feats: np.ndarray, k: int, reps: int, rng: np.random.Generator, chunk: int = 4_000_000
) -> np.ndarray:
    """(reps, K) metric of each of K runs on ``reps`` resamples of the N test examples.

    ``feats``: (N, K·k), the K runs' ``_features`` side by side, rows aligned on example id. Each
    resample draws N example indices with replacement, the same draw for every run; as
    multiplicity weights (R, N) it turns into one matrix product. R is chunked to ~``chunk``
    weights in memory at a time.
    """
    n = feats.shape[0]
    out = np.empty((reps, feats.shape[1] // k))
    step = max(1, chunk // n)
    for lo in range(0, reps, step):
        c = min(step, reps - lo)
        idx = rng.integers(0, n, size=(c, n)) + (np.arange(c) * n)[:, None]
        weights = np.bincount(idx.ravel(), minlength=c * n).reshape(c, n).astype(np.float64)
        out[lo : lo + c] = _metric_of_sums(metric, (weights @ feats).reshape(c, -1, k))
    return out


def _interval(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(lo), float(hi)


def compare_column(
    metric: str,
    outputs: dict[str, dict[int, dict]],
    best: str,
    reps: int = BOOTSTRAP_REPS,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Comparison]:
    """Paired bootstrap of every row of one dataset column against ``best`` (Efron & Tibshirani 1993,
    ch. 16; Koehn 2004), Holm-corrected over the rows compared (Holm 1979).

    ``outputs[row][seed]``: a run's ``outputs_arrays``. Rows are paired on the seeds both ran and
    on the test examples, which must be the same ids in every run ("not paired: different test
    examples" otherwise). Each of ``reps`` iterations resamples the test examples (one draw for all
    runs) and, with ≥ 2 paired seeds, the seeds, and averages metric(row) − metric(best) over the
    drawn seeds. p = min(1, 2·min(P(d ≤ 0), P(d ≥ 0))) over the resampled differences d. Seeded
    (numpy Generator ``seed``): the same inputs give the same numbers.
    """
    res = {row: Comparison() for row in outputs}
    ref = next(iter(outputs[best].values()))["id"]
    paired = {row: all(np.array_equal(o["id"], ref) for o in runs.values()) for row, runs in outputs.items()}
    if not paired[best]:
        for c in res.values():
            c.note = "not paired: the best row's seeds differ in test examples"
        return res
    cols = [(row, s) for row, runs in outputs.items() if paired[row] for s in sorted(runs)]
    classes = None
    if metric == "macro_f1":
        classes = np.unique(np.concatenate([np.r_[outputs[r][s]["label"], outputs[r][s]["pred"]] for r, s in cols]))
    feats = np.concatenate([_features(metric, outputs[r][s], classes) for r, s in cols], axis=1)
    k = feats.shape[1] // len(cols)
    col = {rs: i for i, rs in enumerate(cols)}
    observed = _metric_of_sums(metric, feats.sum(0).reshape(len(cols), k))  # (K,)
    boot = _resampled_metrics(metric, feats, k, reps, np.random.default_rng(seed))  # (R, K)
    seed_rng = np.random.default_rng([seed, 1])
    for row, runs in outputs.items():
        c = res[row]
        if not paired[row]:
            c.note = "not paired: different test examples"
            continue
        c.test_examples = len(ref)
        c.mean_ci_low, c.mean_ci_high = _interval(boot[:, [col[(row, s)] for s in sorted(runs)]].mean(1))
        if row == best:
            c.vs_best, c.paired_seeds = "best", len(runs)
            continue
        common = sorted(set(runs) & set(outputs[best]))
        if not common:
            c.note = "no seed in common with the best row"
            continue
        ours, theirs = [col[(row, s)] for s in common], [col[(best, s)] for s in common]
        per_seed = boot[:, ours] - boot[:, theirs]  # (R, S)
        if len(common) > 1:
            per_seed = np.take_along_axis(per_seed, seed_rng.integers(0, len(common), per_seed.shape), 1)
        d = per_seed.mean(1)
        c.paired_seeds = len(common)
        c.diff = float(np.mean(observed[ours] - observed[theirs]))
        c.ci_low, c.ci_high = _interval(d)
        c.p_value = float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))
    tested = [row for row in outputs if res[row].p_value is not None]
    for row, p in zip(tested, holm([res[row].p_value for row in tested])):
        res[row].p_holm = p
        res[row].vs_best = "within_noise" if p >= ALPHA else "worse"
    return res


# ----------------------------------------------------------------------------- loading


@dataclass
class Run:
    method: str
    dataset: str
    model: str
    seed: int
    status: Status
    overrides: list
    metric: Optional[str] = None
    value: Optional[float] = None
    select_value: Optional[float] = None  # the main metric on the selection split
    trainable_pct: Optional[float] = None
    trainable_params: Optional[int] = None
    saved_weights: Optional[str] = None  # adapter | head | full_model | none (None: an older record)
    peak_memory_mib: Optional[float] = None
    wall_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    step_time_s: Optional[float] = None  # median training step time (s)
    device: Optional[str] = None  # what it ran on: cpu | cuda:0 | ...
    method_metrics: dict = field(default_factory=dict)  # what the method reports about itself (sparsity, ...)
    test: dict = field(default_factory=dict)  # every metric on the test split (the main one, and e.g. EVAL_MODES)
    run_dir: str = ""
    error: str = ""
    row: str = ""
    config: dict = field(default_factory=dict)  # the computation config (runfiles.computation_config)
    # protocol sweeps: stage1 | stage2 ("" in a plain sweep), the arm of protocol.json, the run's lr
    stage: str = ""
    arm: Optional[dict] = None
    lr: Optional[float] = None
    in_table: bool = True  # a plain sweep's runs and a protocol's stage-2 runs
    outputs: Optional[dict] = None  # outputs_arrays of test_outputs.jsonl (completed table runs)
    outputs_note: str = ""  # why ``outputs`` is None
    inference: Optional[dict] = None  # metrics.json "inference" (INFERENCE_KEYS); None: not measured, older record


@dataclass(kw_only=True)
class Agg(Comparison):
    """One table cell: a row's runs on one dataset, aggregated over seeds, and (inherited from
    ``Comparison``) its paired comparison with the column's best row."""

    row: str
    dataset: str
    status: str  # a Status value, "partial" (some seeds completed) or NO_LR
    metric: Optional[str] = None
    n: int = 0
    n_expected: int = 0
    values: list = field(default_factory=list)
    mean: float = float("nan")
    std: float = float("nan")  # sample std (ddof=1); nan with one seed
    trainable_pct: Optional[float] = None
    trainable_params: Optional[float] = None
    saved_weights: Optional[str] = None
    peak_memory_mib: Optional[float] = None
    wall_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    lr: Optional[float] = None  # protocol sweeps: the chosen learning rate
    at_edge: Optional[bool] = None  # ... and whether it is at the end of the grid
    lr_note: str = ""  # "grid edge" | "flat grid" (every lr scored the same) | "nothing trains" (zero-shot)
    # inference cost (``_agg_inference``), over the completed runs that recorded it (``inference_n`` of them)
    inference_n: int = 0
    latency_ms: Optional[float] = None  # mean over runs of the unmerged latency, ms per example
    merged_latency_ms: Optional[float] = None  # mean over the merged runs (``merged_n``) of the merged latency
    merged_n: int = 0
    merge: Optional[str] = None  # merged | not_applicable | failed, or "failed 1, merged 2" when the runs differ
    merge_failed: int = 0  # runs whose merge_and_unload failed
    merge_error: Optional[str] = None  # the first of their errors
    outputs_match: Optional[bool] = None  # False: some run's merged outputs differ beyond its tolerance
    mismatched: int = 0  # runs with outputs_match false
    max_abs_diff: Optional[float] = None  # the largest max |merged − unmerged| output (among mismatched runs if any)
    tolerance: Optional[float] = None  # that run's tolerance (absolute, in output units: logits or nats)
    pred_agreement: Optional[float] = None  # mean share of examples whose predicted class merging left unchanged
    footprint_bytes: Optional[float] = None  # mean parameters + buffers, unmerged (bytes)
    merged_footprint_bytes: Optional[float] = None  # ... after merge_and_unload


def _mean(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def load_runs(sweep_dir: Path) -> list[Run]:
    """Every cell of the sweep: those with a record (metrics.json), plus manifest cells that have none
    (pending). A completed run whose main metric is not a finite number counts as failed: it is never
    averaged or ranked. In a protocol sweep only stage-2 runs have ``in_table`` (see ``_apply_protocol``).
    Completed table runs carry their test outputs (``outputs``) or the reason they have none."""
    sweep_dir = Path(sweep_dir)
    runs, seen = [], set()
    for path in sorted(sweep_dir.glob(f"*/{rf.METRICS_FILE}")):
        rec = rf.read_record(path.parent)
        seen.add(path.parent.name)
        if rec is None:
            runs.append(
                Run("?", "?", "?", 0, Status.failed, [], run_dir=path.parent.name, error="unreadable metrics.json")
            )
            continue
        status, error = rec.status, str(rec.error or "")[:200]
        if status == Status.completed and rec.value is None:
            status, error = Status.failed, f"{rec.main_metric} = {rec.main_metric_value} is not a finite number"
        mem = rec.peak_memory_bytes
        runs.append(
            Run(
                method=rec.method or "?",
                dataset=rec.dataset or "?",
                model=rec.model or "?",
                seed=int(rec.seed or 0),
                status=status,
                overrides=list(rec.overrides),
                metric=rec.main_metric,
                value=rec.value,
                select_value=rec.select_value,
                trainable_pct=rec.trainable_pct,
                trainable_params=rec.trainable_params,
                saved_weights=rec.saved_weights,
                peak_memory_mib=mem / 2**20 if mem is not None else None,
                wall_s=rec.train_wall_s,
                tokens_per_s=rec.tokens_per_s,
                step_time_s=rec.step_time_median_s,
                device=rec.device,
                method_metrics=rec.method_metrics if isinstance(rec.method_metrics, dict) else {},
                test=rec.test if isinstance(rec.test, dict) else {},
                run_dir=path.parent.name,
                error=error,
                config=rec.config,
                inference=_inference_of(rec),
            )
        )
    for c in rf.read_manifest(sweep_dir).get("cells", []):
        name = Path(c.get("run_dir") or "").name
        if name in seen or "method" not in c:
            continue
        status = Status.failed if c.get("status") == Status.failed.value else Status.pending
        runs.append(
            Run(
                c["method"],
                c["dataset"],
                c.get("model", "?"),
                int(c.get("seed", 0)),
                status,
                list(c.get("overrides", [])),
                run_dir=name,
                error=str(c.get("error", ""))[:200],
                config=c.get("config") or {},
            )  # fmt: skip
        )
    protocol = rf.read_protocol(sweep_dir)
    if protocol:
        runs += _apply_protocol(runs, protocol)
    _label_rows([r for r in runs if r.in_table], drop=_PROTOCOL_KEYS if protocol else ())
    arm_rows = {id(r.arm): r.row for r in runs if r.in_table and r.arm is not None}
    for r in runs:
        if not r.in_table:  # a stage-1 run takes the row of its arm; any other is outside the protocol
            r.row = arm_rows.get(id(r.arm), r.method)
        elif r.status == Status.completed:
            _attach_outputs(r, sweep_dir / r.run_dir)
    return runs


def _inference_of(rec: rf.RunRecord) -> Optional[dict]:
    """The record's ``inference`` dict (keys ``INFERENCE_KEYS``), or None: not measured (older record,
    ``train.inference.measure=false``) or not a dict."""
    return rec.inference if isinstance(rec.inference, dict) else None


def _apply_protocol(runs: list[Run], protocol: dict) -> list[Run]:
    """Mark runs by their place in ``protocol.json``: stage-2 runs (an arm's chosen lr × every seed)
    stay in the table, stage-1 runs and runs of no arm leave it. An arm without a chosen lr
    (``NO_LR``) or without its stage-2 runs yet gets placeholder runs, one per protocol seed,
    which are returned (the runs of ``runs`` are changed in place)."""
    by_name = {r.run_dir: r for r in runs if r.run_dir}
    for r in runs:
        r.in_table = False
    arms = [a for a in protocol.get("arms", []) if isinstance(a, dict)]
    for arm in arms:
        for entry in arm.get("stage1") or []:
            r = by_name.get(_dir_name(entry.get("run_dir")))
            if r is not None:
                r.stage, r.arm, r.lr = "stage1", arm, entry.get("lr")
    seeds = protocol.get("seeds") or [0]
    added: list[Run] = []
    for arm in arms:
        chosen, names = arm.get("chosen_lr"), [_dir_name(n) for n in arm.get("stage2") or []]
        stage1 = [by_name[n] for e in arm.get("stage1") or [] if (n := _dir_name(e.get("run_dir"))) in by_name]
        template = stage1[0] if stage1 else None
        if chosen is not None and names:
            members = [by_name.get(n) or _placeholder(arm, seeds[i] if i < len(seeds) else i, template, n)
                       for i, n in enumerate(names)]  # fmt: skip
        else:  # no lr chosen, or stage 2 not launched yet
            members = [_placeholder(arm, s, template) for s in seeds]
        added += [r for r in members if not r.run_dir or r.run_dir not in by_name]
        for r in members:
            r.stage, r.arm, r.lr, r.in_table = "stage2", arm, chosen, True
    return added


def _dir_name(run_dir: Any) -> str:
    """A run dir of protocol.json as the folder name the runs are keyed by (a path is tolerated)."""
    return Path(str(run_dir or "")).name


def _placeholder(arm: dict, seed: Any, template: Optional[Run], name: str = "") -> Run:
    """A stage-2 run of ``arm`` that has no record: failed (NO_LR) when the arm chose no lr, else pending.
    ``template``: one of the arm's stage-1 runs, whose config labels the row like its stage-2 runs."""
    chosen = arm.get("chosen_lr")
    return Run(
        str(arm.get("method", "?")),
        str(arm.get("dataset", "?")),
        template.model if template else "?",
        int(seed),
        Status.failed if chosen is None else Status.pending,
        list(arm.get("overrides") or []),
        run_dir=name,
        error=str(arm.get("problem") or f"{NO_LR}: no stage-1 run completed") if chosen is None else "",
        config=template.config if template else {},
    )


def _attach_outputs(r: Run, run_dir: Path) -> None:
    """Load the run's test outputs, checked against its record: they must give the recorded metric."""
    rows = rf.read_outputs(run_dir)
    if rows is None:
        r.outputs_note = NO_OUTPUTS if not (run_dir / rf.TEST_OUTPUTS).exists() else f"unreadable {rf.TEST_OUTPUTS}"
        return
    try:
        out = outputs_arrays(rows)
        value = _metric_of_arrays(str(r.metric), out)
    except ValueError as err:
        r.outputs_note = f"{rf.TEST_OUTPUTS}: {err}"
        return
    # the evaluation computes the metric from these very rows: only the order of summation may differ
    if r.value is None or not math.isclose(value, r.value, rel_tol=1e-9, abs_tol=1e-12):
        r.outputs_note = f"{rf.TEST_OUTPUTS} gives {r.metric} {value:.6g}, metrics.json {r.value}"
        return
    r.outputs = out


def _variant(r: Run, drop: tuple = ()) -> dict:
    """What a run computed, seed (and ``drop``) aside, as flat keys: its stored config, else (older records)
    its overrides."""
    if r.config:
        flat = rf.flatten(r.config)
    else:
        flat = dict(o.lstrip("+").split("=", 1) for o in r.overrides if "=" in o and not o.startswith(_SWEPT_ELSEWHERE))
    for key in ("seed", *drop):
        flat.pop(key, None)
    return flat


def _label_rows(runs: list[Run], drop: tuple = ()) -> None:
    """Row label = method, plus every config key that takes more than one value among this method's runs
    on one dataset (method.r=16, model.name=tiny, ...). Runs that computed different things therefore
    never share a row; seeds of one configuration always do. ``drop``: keys left out (a protocol's lr)."""
    variants = [_variant(r, drop) for r in runs]
    missing = object()
    varying: dict[str, set] = {}
    by_cell: dict[tuple, list[dict]] = {}
    for r, v in zip(runs, variants):
        by_cell.setdefault((r.method, r.dataset), []).append(v)
    for (method, _), vs in by_cell.items():
        keys = set().union(*vs)
        varying.setdefault(method, set()).update(
            k for k in keys if len({json.dumps(v.get(k, missing), default=str, sort_keys=True) for v in vs}) > 1
        )
    for r, v in zip(runs, variants):
        keys = sorted(varying.get(r.method, ()), key=_label_priority)
        # a study point (+variant=NAME, conf/variant/) names the method settings it sets: its name stands for them
        named = _variant_name(r)
        covered = [k for k in keys if named and k.startswith("method.")]
        keys = [k for k in keys if k not in covered]
        shown = [k for k in keys if not ("model.name" in keys and k.startswith("model.") and k != "model.name")]
        parts = [f"{k}={json.dumps(v[k], default=str) if not isinstance(v.get(k), str) else v[k]}" if k in v
                 else f"{k}=(unset)" for k in shown]  # fmt: skip
        if len(parts) > 4 or len(shown) < len(keys):  # the hash tells apart what the label leaves out
            digest = rf.fingerprint({k: v.get(k) for k in keys})[:6]
            parts = parts[:4] + [f"+{len(keys) - min(4, len(parts))} more #{digest}"]
        if named and (covered or len({_variant_name(x) for x in runs if x.method == r.method}) > 1):
            same = [w for x, w in zip(runs, variants) if x.method == r.method and _variant_name(x) == named]
            if len({rf.fingerprint({k: w.get(k) for k in covered}) for w in same}) > 1:  # the variant file changed
                named += f" #{rf.fingerprint({k: v.get(k) for k in covered})[:6]}"
            parts = [f"variant={named}"] + parts
        r.row = r.method + (f" [{', '.join(parts)}]" if parts else "")


def _variant_name(r: Run) -> Optional[str]:
    return next((o.split("=", 1)[1] for o in r.overrides if o.lstrip("+").startswith("variant=")), None)


def _label_priority(key: str) -> tuple:
    """The keys a reader looks for first: the model, the method's settings, training, then data and the rest."""
    for rank, prefix in enumerate(("model.name", "method.", "train.", "dataset.", "seed", "model.")):
        if key.startswith(prefix):
            return rank, key
    return 9, key


def _row_order(row: str) -> tuple:
    return _order(row.split(" ")[0], METHOD_ORDER), row


def aggregate(runs: list[Run]) -> tuple[list[str], list[str], dict]:
    """(rows, datasets, {(row, dataset): Agg}) of the table runs: mean ± std over seeds, and each
    column's paired comparison with its best row (``compare_column``)."""
    runs = [r for r in runs if r.in_table]
    rows = sorted(dict.fromkeys(r.row for r in runs), key=_row_order)
    datasets = sorted(dict.fromkeys(r.dataset for r in runs), key=lambda d: (_order(d, DATASET_ORDER), d))
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.row, r.dataset), []).append(r)
    cells: dict = {}
    for row in rows:
        for ds in datasets:
            group = groups.get((row, ds))
            if group:
                cells[(row, ds)] = _agg(row, ds, group)
    for ds in datasets:
        _compare(ds, {row: cells[(row, ds)] for row in rows if (row, ds) in cells}, groups)
    return rows, datasets, cells


def _agg(row: str, ds: str, group: list[Run]) -> Agg:
    done = sorted((r for r in group if r.status == Status.completed and r.value is not None), key=lambda r: r.seed)
    a = Agg(row=row, dataset=ds, status=Status.pending.value, n=len(done), n_expected=len(group))
    a.metric = next((r.metric for r in group if r.metric), None)
    arm = next((r.arm for r in group if r.arm is not None), None)
    if arm is not None:
        a.lr, a.at_edge = arm.get("chosen_lr"), bool(arm.get("at_edge"))
        a.lr_note = ("nothing trains" if arm.get("trains") is False else "flat grid" if arm.get("flat")
                     else "grid edge" if a.at_edge else "")  # fmt: skip
    if done:
        a.status = Status.completed.value if len(done) == len(group) else "partial"
        a.values = [float(r.value) for r in done]
        a.mean = sum(a.values) / a.n
        a.std = math.sqrt(sum((v - a.mean) ** 2 for v in a.values) / (a.n - 1)) if a.n > 1 else float("nan")
        a.trainable_pct = _mean([r.trainable_pct for r in done])
        a.trainable_params = _mean([r.trainable_params for r in done])
        a.saved_weights = next((r.saved_weights for r in done if r.saved_weights), None)
        a.peak_memory_mib = _mean([r.peak_memory_mib for r in done])
        a.wall_s = _mean([r.wall_s for r in done])
        a.tokens_per_s = _mean([r.tokens_per_s for r in done])
        _agg_inference(a, done)
    elif arm is not None and arm.get("chosen_lr") is None:
        a.status, a.note = NO_LR, str(arm.get("problem") or "")
    else:  # the most telling status among the seeds: failed > interrupted > running > requeued > pending
        a.status = next(st.value for st in (Status.failed, Status.interrupted, Status.running, Status.requeued,
                                            Status.pending) if any(r.status == st for r in group))  # fmt: skip
    return a


def _agg_inference(a: Agg, done: list[Run]) -> None:
    """The cell's inference cost from its completed runs' ``inference`` records (those with a finite
    ``latency_ms``): latencies (ms per example) and footprints (bytes) are means over runs, the merged latency over
    the runs that merged; a mismatch or a failed merge in any run is kept (``mismatched``, ``merge_failed``)."""
    infs = [r.inference for r in done if r.inference and _finite(r.inference.get("latency_ms")) is not None]
    a.inference_n = len(infs)
    if not infs:
        return
    a.latency_ms = _mean([_finite(i["latency_ms"]) for i in infs])
    merged = [m for i in infs if i.get("merge") == "merged" and (m := _finite(i.get("merged_latency_ms"))) is not None]
    a.merged_n, a.merged_latency_ms = len(merged), _mean(merged)
    counts: dict[str, int] = {}
    for i in infs:
        counts[str(i.get("merge") or "?")] = counts.get(str(i.get("merge") or "?"), 0) + 1
    a.merge = next(iter(counts)) if len(counts) == 1 else ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    a.merge_failed = counts.get("failed", 0)
    a.merge_error = next((str(i["merge_error"]) for i in infs if i.get("merge") == "failed" and i.get("merge_error")),
                         None)  # fmt: skip
    matches = [i["outputs_match"] for i in infs if isinstance(i.get("outputs_match"), bool)]
    a.mismatched = sum(not m for m in matches)
    a.outputs_match = all(matches) if matches else None
    worst = [i for i in infs if i.get("outputs_match") is False] or infs  # a mismatch's diff is the one to show
    diffs = [(d, _finite(i.get("tolerance"))) for i in worst if (d := _finite(i.get("max_abs_diff"))) is not None]
    if diffs:
        a.max_abs_diff, a.tolerance = max(diffs, key=lambda dt: dt[0])
    a.pred_agreement = _mean([_finite(i.get("pred_agreement")) for i in infs])
    a.footprint_bytes = _mean([_finite(i.get("footprint_bytes")) for i in infs])
    a.merged_footprint_bytes = _mean([_finite(i.get("merged_footprint_bytes")) for i in infs])


def _compare(ds: str, column: dict[str, Agg], groups: dict) -> None:
    """Fill the comparison fields of one dataset column's Aggs: the best row (best mean) and, for the
    others, the paired bootstrap from the runs' test outputs; rows without them are untested."""
    done = {row: a for row, a in column.items() if a.n > 0}
    if not done:
        return
    sign = 1 if lower_is_better(next(iter(done.values())).metric or "") else -1
    best = min(done, key=lambda row: sign * done[row].mean)
    outputs, notes = {}, {}
    for row in done:
        ok = [r for r in groups[(row, ds)] if r.status == Status.completed and r.value is not None]
        with_outputs = {r.seed: r.outputs for r in ok if r.outputs is not None}
        if with_outputs:
            outputs[row] = with_outputs
        else:
            notes[row] = next((r.outputs_note for r in ok if r.outputs_note), NO_OUTPUTS)
    if best in outputs:
        results = compare_column(done[best].metric or "", outputs, best)
    else:
        results = {row: Comparison(note="the best row has no test outputs") for row in outputs}
    results[best] = results.get(best) or Comparison(note=notes.get(best, ""))
    results[best].vs_best = "best"
    for row, a in done.items():
        c = results.get(row) or Comparison(note=notes.get(row, ""))
        for f in fields(Comparison):
            setattr(a, f.name, getattr(c, f.name))


# ----------------------------------------------------------------------------- tables


def _fmt(v: float, ref: float) -> str:
    """``v`` with 3 decimals when the column's values are below 10 (accuracy), else 2 (perplexity)."""
    return (f"{v:.3f}" if abs(ref) < 10 else f"{v:.2f}").replace("-", "−")


def _fmt_lr(lr: float) -> str:
    mantissa, exp = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exp}"


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else (f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}")


def metric_text(a: Agg) -> str:
    if a.n == 0:
        return a.status
    text = _fmt(a.mean, a.mean)
    if a.n > 1:
        text += f" ± {_fmt(a.std, a.mean)}"
    return text


def _comparison_text(a: Agg) -> str:
    """The second line's first item: the best row's own interval, a row's Δ to the best, or why untested."""
    if a.vs_best == "best":
        return "" if a.mean_ci_low is None else f"95 % [{_fmt(a.mean_ci_low, a.mean)}, {_fmt(a.mean_ci_high, a.mean)}]"
    if a.diff is not None:
        p = "p<0.001" if a.p_holm < 0.001 else f"p={a.p_holm:.3f}"
        sign = "+" if a.diff >= 0 else ""
        return f"Δ {sign}{_fmt(a.diff, a.mean)} [{_fmt(a.ci_low, a.mean)}, {_fmt(a.ci_high, a.mean)}] {p}"
    return f"untested: {a.note}" if a.note else "untested"


def cell_text(a: Agg) -> str:
    """A markdown cell: the metric (bold: best, ≈: not distinguishable from it) and seeds, then the
    comparison, the chosen lr (protocol sweeps), trainable %, peak memory and wall time."""
    if a.n == 0:
        return f"*{a.status}*"
    m = metric_text(a)
    m = f"**{m}**" if a.vs_best == "best" else (f"≈ {m}" if a.vs_best == "within_noise" else m)
    seeds = f" (n={a.n})" if a.n > 1 or a.n_expected > 1 else ""
    if a.n < a.n_expected:
        seeds = f" (n={a.n} of {a.n_expected})"
    info = [_comparison_text(a)]
    if a.lr_note == "nothing trains":
        info.append("zero-shot: nothing trains")
    elif a.lr is not None:
        info.append(f"lr {_fmt_lr(a.lr)}" + (f" ({a.lr_note})" if a.lr_note else ""))
    if a.trainable_pct is not None:
        info.append(f"{a.trainable_pct:.2f} % trainable")
    if a.peak_memory_mib is not None:
        info.append(f"{a.peak_memory_mib:,.0f} MiB")
    if a.wall_s is not None:
        info.append(f"{a.wall_s:,.0f} s" if a.wall_s >= 10 else f"{a.wall_s:.1f} s")
    info = [i for i in info if i]
    return f"{m}{seeds}" + (f"<br>{' · '.join(info)}" if info else "")


def budget_warnings(rows: list[str], datasets: list[str], cells: dict) -> list[str]:
    """One line per dataset where the adapter rows' trainable parameters differ by more than
    ``BUDGET_TOLERANCE`` (max > 1.1 · min): their metrics are then not an equal-budget comparison.
    Baselines (``saved_weights`` full_model, head or none) are left out of the check."""
    out = []
    for ds in datasets:
        adapters = [a for row in rows if (a := cells.get((row, ds))) is not None and a.n > 0
                    and a.trainable_params and a.saved_weights in ADAPTER_WEIGHTS]  # fmt: skip
        if len(adapters) < 2:
            continue
        lo = min(adapters, key=lambda a: a.trainable_params)
        hi = max(adapters, key=lambda a: a.trainable_params)
        if hi.trainable_params > (1 + BUDGET_TOLERANCE) * lo.trainable_params:
            out.append(
                f"⚠ {ds}: trainable parameters differ by more than {BUDGET_TOLERANCE * 100:.0f} % among adapter methods "
                f"({lo.row} {_fmt_params(lo.trainable_params)}, {hi.row} {_fmt_params(hi.trainable_params)}): "
                "not an equal-budget comparison"
            )
    return out


def _footnotes(cells: dict, protocol: bool) -> list[str]:
    done = [a for a in cells.values() if a.n > 0]
    chosen_lr = "; the learning rate the protocol chose (stage 1 below)" if protocol else ""
    lines = [
        "Each cell: main metric on the test split (mean ± sample std over seeds; n = seeds); then the comparison "
        f"with the column's best row{chosen_lr}; trainable parameters; peak memory (CUDA max allocated, or on CPU "
        "the process's peak RSS after the model is loaded); training wall time.",
        f"**Bold**: best mean per dataset, with the 95 % interval of its metric over test examples. "
        "Δ = row − best, averaged over the seeds both rows ran (paired bootstrap, Efron & Tibshirani 1993; "
        f"Koehn 2004): {BOOTSTRAP_REPS} resamples of the test examples (the same examples for both rows) and of "
        "those seeds; the 95 % percentile interval of Δ and its two-sided p, Holm-corrected over the rows compared "
        "in the column (Holm 1979). ≈: not distinguishable from the best (adjusted p ≥ 0.05); do not rank these. "
        "Rows without a mark (adjusted p < 0.05) are worse than the best.",
    ]
    compared = [a for a in done if a.vs_best != "untested" and a.paired_seeds > 0]
    single = [a for a in compared if a.paired_seeds == 1]
    if single and len(single) == len(compared):
        more = "the other seeds have not completed" if any(a.n_expected > 1 for a in done) else "run seed=0,1,2"
        lines.append(
            "One seed per comparison: the intervals and p-values cover test-example sampling only, not "
            f"seed-to-seed variance ({more} to include it)."
        )
    elif single:
        lines.append(
            "Where a comparison rests on one seed (paired_seeds = 1 in report.csv: "
            + ", ".join(f"{a.row} × {a.dataset}" for a in single)
            + "), its interval covers test-example sampling only, not seed-to-seed variance."
        )
    untested: dict[str, list[str]] = {}
    for a in done:
        if a.vs_best == "untested" or (a.vs_best == "best" and a.note):
            untested.setdefault(a.note or "not compared", []).append(f"{a.row} × {a.dataset}")
    for note, where in untested.items():
        why = (" (written by runs of this peft_lab: per-example test outputs; re-run older runs to test them)"
               if note == NO_OUTPUTS else "")  # fmt: skip
        lines.append(f"Untested, {note}{why}: {'; '.join(where)}.")
    problems = [a for a in cells.values() if a.status != Status.completed.value]
    if problems:
        lines.append(
            "Incomplete: "
            + "; ".join(
                f"{a.row} × {a.dataset}: {a.status} ({a.n}/{a.n_expected} seeds)"
                + (f", {a.note}" if a.note and a.n == 0 else "")
                for a in problems
            )
        )
    return lines


def _metric_names(datasets: list[str], cells: dict) -> dict[str, str]:
    return {ds: next((a.metric for (_, d), a in cells.items() if d == ds and a.metric), "?") for ds in datasets}


def _arrow(metric: str) -> str:
    return "↓" if lower_is_better(metric) else "↑"


def _md_table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


def setup_line(runs: list[Run]) -> str:
    """What the table was computed on: the models, where the data came from and how much was trained on,
    so a smoke report (tiny model, synthetic data) cannot pass for a real one."""

    def values(key: str) -> str:
        found = sorted({str(rf.flatten(r.config).get(key)) for r in runs if r.config and key in rf.flatten(r.config)})
        return ", ".join(found) or "?"

    models = ", ".join(sorted({r.model for r in runs if r.model and r.model != "?"})) or "?"
    return (f"Model: {models} · dataset.source: {values('dataset.source')} · dataset.max_train_samples: "
            f"{values('dataset.max_train_samples')} (None: all) · seeds: {len({r.seed for r in runs})}")  # fmt: skip


def markdown(rows: list[str], datasets: list[str], cells: dict, title: str = "", protocol: bool = False,
             setup: str = "") -> str:  # fmt: skip
    """The main table (under a line saying what it was computed on), the equal-budget warnings under it,
    and the footnotes."""
    metrics = _metric_names(datasets, cells)
    head = ["method"] + [f"{ds} ({metrics[ds]} {_arrow(metrics[ds])})" for ds in datasets]
    body = [[row] + [cell_text(cells[(row, ds)]) if (row, ds) in cells else "–" for ds in datasets] for row in rows]
    lines = [f"# {title}" if title else "# Sweep report", ""] + ([setup, ""] if setup else []) + _md_table(head, body)
    for note in budget_warnings(rows, datasets, cells) + _footnotes(cells, protocol):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _fmt_ms(v: float) -> str:
    """A latency in ms with about three significant digits: 0.123, 1.23, 12.3, 123."""
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def _fmt_mib(n_bytes: float) -> str:
    mib = n_bytes / 2**20
    return f"{mib:.2f}" if mib < 10 else f"{mib:,.0f}"


def latency_text(a: Agg) -> str:
    """An "Inference cost" cell: ``1.23 / 0.98 ms`` (per example, unmerged / merged, means over seeds), ``1.23 ms /
    n/a`` (nothing to merge) or ``1.23 ms / merge failed``; ``MISMATCH_MARK`` when a run's merged outputs differ
    from its unmerged ones, ``MERGE_FAILED_MARK`` when a run's merge failed; then the footprint in MiB (unmerged /
    merged). "–" for a cell without inference data."""
    if not a.inference_n:
        return "–"
    lat = _fmt_ms(a.latency_ms)
    if a.merged_latency_ms is not None:
        text = f"{lat} / {_fmt_ms(a.merged_latency_ms)} ms"
        if a.merged_n < a.inference_n:
            text += f" (merged in {a.merged_n} of {a.inference_n} runs)"
    elif a.merge == "not_applicable":
        text = f"{lat} ms / n/a"
    elif a.merge == "failed":
        text = f"{lat} ms / merge failed"
    else:
        text = f"{lat} ms / –"
    marks = (MISMATCH_MARK if a.mismatched else "") + (MERGE_FAILED_MARK if a.merge_failed else "")
    text += f" {marks}" if marks else ""
    if a.inference_n < a.n:
        text += f" ({a.inference_n} of {a.n} runs)"
    if a.footprint_bytes is not None:
        merged = f" / {_fmt_mib(a.merged_footprint_bytes)}" if a.merged_footprint_bytes is not None else ""
        text += f"<br>{_fmt_mib(a.footprint_bytes)}{merged} MiB"
    return text


def _joined(values) -> str:
    return ", ".join(str(v) for v in sorted(set(values), key=str))


def inference_markdown(rows: list[str], datasets: list[str], cells: dict, runs: list[Run]) -> str:
    """The "Inference cost" section: rows (table order) × datasets, each cell ``latency_text`` (ms per example
    unmerged / merged; MiB unmerged / merged), then footnotes: marked mismatches and failed merges, cells without
    data, differing settings or devices. "" when no run recorded its inference cost."""
    have = {k: a for k, a in cells.items() if a.inference_n}
    if not have:
        return ""
    measured = [r for r in runs if r.in_table and r.status == Status.completed and r.value is not None
                and r.inference and (r.row, r.dataset) in have]  # fmt: skip
    settings = [(i.get("examples"), i.get("batch_size"), i.get("repeats")) for i in (r.inference for r in measured)]
    examples, batch, repeats = (_joined(v) for v in zip(*settings))
    lines = [
        "## Inference cost",
        "",
        f"Measured at the end of each run on the first {examples} test examples (batch size {batch}; the median of "
        f"{repeats} timed passes after a warm-up batch). Each cell: the evaluation forward's latency per example in "
        "ms, unmerged (the adapter as trained) / merged (after PEFT's merge_and_unload), mean over seeds; n/a: "
        "nothing to merge (full fine-tuning, a trained head). Then the model's parameters and buffers in MiB, "
        f"unmerged / merged. {MISMATCH_MARK}: the merged outputs differ from the unmerged ones; "
        f"{MERGE_FAILED_MARK}: the merge failed (below). Plot: latency.png.",
        "",
    ]
    cols = [ds for ds in datasets if any(d == ds for _, d in have)]
    body = [[row] + [latency_text(cells[(row, ds)]) if (row, ds) in cells else "–" for ds in cols]
            for row in rows if any((row, ds) in have for ds in cols)]  # fmt: skip
    lines += _md_table(["method"] + [f"{ds} (ms per example; MiB)" for ds in cols], body)
    notes = []
    for (row, ds), a in have.items():
        if a.mismatched:
            diff = "" if a.max_abs_diff is None else f" by up to {a.max_abs_diff:.3g}"
            tol = "" if a.tolerance is None else f" (tolerance {a.tolerance:.3g})"
            agree = (
                "" if a.pred_agreement is None else f"; predictions agree on {100 * a.pred_agreement:.1f} % of examples"
            )
            notes.append(f"{MISMATCH_MARK} {row} × {ds}: the merged model's outputs differ from the unmerged ones{diff}"
                         f"{tol}: the merged numbers are not those of the trained adapter ({a.mismatched} of "
                         f"{a.inference_n} runs{agree}).")  # fmt: skip
        if a.merge_failed:
            notes.append(f"{MERGE_FAILED_MARK} {row} × {ds}: merge_and_unload failed ({a.merge_error or 'no error recorded'}): "
                         f"no merged latency ({a.merge_failed} of {a.inference_n} runs).")  # fmt: skip
    missing = [f"{a.row} × {a.dataset}" + (f" ({a.n - a.inference_n} of {a.n} runs)" if a.inference_n else "")
               for a in cells.values() if a.n > a.inference_n]  # fmt: skip
    if missing:
        notes.append("No inference cost recorded (runs of an older peft_lab, or train.inference.measure=false): "
                     f"{'; '.join(missing)}.")  # fmt: skip
    if len(set(settings)) > 1:
        notes.append("⚠ The runs measured with different settings (examples, batch size, repeats: "
                     f"{_joined(settings)}): their latencies are not directly comparable.")  # fmt: skip
    kinds = sorted({str(r.device).split(":")[0] for r in measured if r.device})
    if len(kinds) > 1:
        notes.append(f"⚠ Latencies were measured on different devices ({', '.join(kinds)}): a difference between "
                     "them compares devices, not methods.")  # fmt: skip
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _stage1_points(arm: dict, by_dir: dict[str, Run]) -> list[tuple[float, Optional[float], str]]:
    """(lr, selection metric or None, status) for each stage-1 entry of ``arm``, sorted by lr. A value
    missing from protocol.json is taken from the run's record; a failed run is ``diverged`` or ``failed``."""
    points = []
    for e in arm.get("stage1") or []:
        r = by_dir.get(_dir_name(e.get("run_dir")))
        value = e.get("select") if isinstance(e.get("select"), (int, float)) else (r.select_value if r else None)
        status = str(e.get("status") or (r.status.value if r else Status.pending.value))
        if status in ("diverged", Status.failed.value) or (r is not None and r.status == Status.failed):
            status = "diverged" if e.get("failure") == "diverged" else Status.failed.value
        ok = status == Status.completed.value and value is not None and math.isfinite(value)
        points.append((float(e["lr"]), float(value) if ok else None, status))
    return sorted(points)


def _is_chosen(arm: dict, lr: float) -> bool:
    return arm.get("chosen_lr") is not None and math.isclose(lr, float(arm["chosen_lr"]))


def _protocol_arms(protocol: dict, runs: list[Run]) -> dict[str, list[tuple[str, dict]]]:
    """{dataset: [(row label, arm), ...]} in the table's order; the label is that of the arm's stage-2 runs."""
    labels = {id(r.arm): r.row for r in runs if r.in_table and r.arm is not None}
    arms: dict[str, list] = {}
    for arm in protocol.get("arms", []):
        if isinstance(arm, dict):
            arms.setdefault(str(arm.get("dataset")), []).append((labels.get(id(arm), str(arm.get("method"))), arm))
    order = sorted(arms, key=lambda d: (_order(d, DATASET_ORDER), d))
    return {ds: sorted(arms[ds], key=lambda la: _row_order(la[0])) for ds in order}


def stage1_markdown(protocol: dict, runs: list[Run]) -> str:
    """One table per dataset: rows = arms (labelled as in the main table), columns = the learning rates
    tried, value = the selection-split metric of each stage-1 run; the chosen lr in bold."""
    by_dir = {r.run_dir: r for r in runs if r.run_dir}
    lines = [
        "## Stage 1: selection metric per learning rate",
        "",
        "Each method's learning rate is chosen on the selection split (one run per lr); **bold**: the chosen "
        "lr, run with every seed in the table above. (grid edge) there: the best lr is at an end of the grid, "
        "so the optimum may lie outside it; (flat grid): every lr scored the same, so the grid told nothing "
        "and the first lr was taken; diverged: that lr is too high and out of the running.",
    ]
    for ds, arms in _protocol_arms(protocol, runs).items():
        metric = next((str(a.get("metric")) for _, a in arms if a.get("metric")), "?")
        lrs = sorted({lr for _, arm in arms for lr, _, _ in _stage1_points(arm, by_dir)})
        body = []
        for label, arm in arms:
            got = {lr: (v, st) for lr, v, st in _stage1_points(arm, by_dir)}
            row = [label]
            for lr in lrs:
                v, st = got.get(lr, (None, ""))
                text = _fmt(v, v) if v is not None else (st if st in ("diverged", Status.failed.value)
                                                          else f"*{st}*" if st else "–")  # fmt: skip
                row.append(f"**{text}**" if _is_chosen(arm, lr) and v is not None else text)
            body.append(row)
        lines += ["", f"### {ds} ({metric} on the selection split {_arrow(metric)})", ""]
        lines += _md_table(["method"] + [f"lr {_fmt_lr(lr)}" for lr in lrs], body)
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "metric",
    "status",
    "n",
    "mean",
    "std",
    "vs_best",
    "diff",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "mean_ci_low",
    "mean_ci_high",
    "paired_seeds",
    "test_examples",
    "note",
    "lr",
    "at_edge",
    "lr_note",
    "trainable_pct",
    "trainable_params",
    "saved_weights",
    "peak_memory_mib",
    "wall_s",
    "tokens_per_s",
    # inference cost (``_agg_inference``): ms per example, bytes
    "inference_n",
    "latency_ms",
    "merged_latency_ms",
    "merge",
    "outputs_match",
    "max_abs_diff",
    "tolerance",
    "pred_agreement",
    "footprint_bytes",
    "merged_footprint_bytes",
)


def _csv_value(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def table_csv(rows: list[str], datasets: list[str], cells: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method"] + [f"{ds}/{f}" for ds in datasets for f in CSV_FIELDS])
    for row in rows:
        out: list[Any] = [row]
        for ds in datasets:
            a = cells.get((row, ds))
            out += ["" if a is None or (v := _csv_value(getattr(a, f))) is None else v for f in CSV_FIELDS]
        w.writerow(out)
    return buf.getvalue()


def runs_csv(runs: list[Run]) -> str:
    """One row per run; its ``inference`` record flattened as ``inference.<key>`` (``INFERENCE_KEYS``; empty when
    not measured)."""
    buf = io.StringIO()
    cols = ["row", "method", "dataset", "model", "seed", "status", "stage", "lr", "metric", "value", "select_value",
            "trainable_pct", "trainable_params", "saved_weights", "peak_memory_mib", "wall_s", "tokens_per_s",
            "run_dir", "error", "outputs_note"]  # fmt: skip
    w = csv.DictWriter(buf, fieldnames=cols + [f"inference.{k}" for k in INFERENCE_KEYS], extrasaction="ignore")
    w.writeheader()
    for r in runs:
        row = {c: getattr(getattr(r, c), "value", getattr(r, c)) for c in cols}
        row.update({f"inference.{k}": _csv_value(r.inference.get(k)) for k in INFERENCE_KEYS} if r.inference else {})
        w.writerow(row)
    return buf.getvalue()


# ----------------------------------------------------------------------------- sparsity study


def _finite(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _step_time(r: Run) -> Optional[float]:
    """The run's median training step time (s), when recorded and positive."""
    s = _finite(r.step_time_s)
    return s if s is not None and s > 0 else None


def run_sparsity(r: Run) -> Optional[float]:
    """The run's x in the sparsity study, a share in 0..1. ``sparse``: the fraction of zeros in its LoRA factors
    (``method_metrics["sparsity_achieved"]``); ``sparselora``: the share of base-linear FLOPs skipped while training
    (``method_metrics["sparselora_flops_skipped"]``). None for another method, or a record without it (older runs).
    """
    key = SPARSITY_KEYS.get(r.method)
    return _finite(r.method_metrics.get(key)) if key else None


def _mean_std(xs: list[float]) -> tuple[Optional[float], float]:
    """(mean, sample std) of ``xs``: (None, nan) for none; the std is nan for one value."""
    if not xs:
        return None, float("nan")
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")


@dataclass
class SparsityPoint:
    """One configuration (table ``row``) of a method on one dataset in the sparsity study, over its seeds.

    ``runs``: its completed runs with a finite test metric, in seed order; ``left_out``: {status: count} of its
    other runs (failed, pending, ...), in no mean. ``mean`` / ``std``: the test main metric (sample std; nan for
    one seed). ``x``: the mean sparsity (``run_sparsity``, 0..1) over the ``n_x`` runs that recorded it.
    ``step_s`` / ``step_std``: mean / sample std of the median training step time (s) over the ``n_step`` runs
    that recorded it. ``dense`` / ``sparse_eval``: mean test accuracy under dense / sparse evaluation
    (``EVAL_MODES``) where recorded. Against the dataset's LoRA reference: ``delta`` = mean − LoRA's mean (metric
    units), ``speedup`` = LoRA's step time / ``step_s`` (> 1: faster than LoRA); ``reference``: this is it.
    """

    method: str
    dataset: str
    row: str
    metric: str
    runs: list = field(default_factory=list)
    n_runs: int = 0
    left_out: dict = field(default_factory=dict)
    mean: Optional[float] = None
    std: float = float("nan")
    x: Optional[float] = None
    n_x: int = 0
    step_s: Optional[float] = None
    step_std: float = float("nan")
    n_step: int = 0
    dense: Optional[float] = None
    sparse_eval: Optional[float] = None
    delta: Optional[float] = None
    speedup: Optional[float] = None
    reference: bool = False

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def variant(self) -> str:
        """The config keys that set this row apart from the method's others (``method.sparsity=0.5``); "" if none."""
        return self.row[len(self.method) :].strip().removeprefix("[").removesuffix("]")


def _sparsity_point(ds: str, row: str, group: list[Run]) -> SparsityPoint:
    done = sorted((r for r in group if r.status == Status.completed and r.value is not None), key=lambda r: r.seed)
    p = SparsityPoint(group[0].method, ds, row, next((r.metric for r in group if r.metric), None) or "?", done,
                      len(group))  # fmt: skip
    kept = {id(r) for r in done}
    for r in group:
        if id(r) not in kept:
            p.left_out[r.status.value] = p.left_out.get(r.status.value, 0) + 1
    p.mean, p.std = _mean_std([r.value for r in done])
    xs = [x for r in done if (x := run_sparsity(r)) is not None]
    p.x, p.n_x = _mean_std(xs)[0], len(xs)
    steps = [s for r in done if (s := _step_time(r)) is not None]
    (p.step_s, p.step_std), p.n_step = _mean_std(steps), len(steps)
    p.dense, p.sparse_eval = (_mean_std([v for r in done if (v := _finite(r.test.get(k))) is not None])[0]
                              for k in EVAL_MODES)  # fmt: skip
    return p


def sparsity_study(runs: list[Run]) -> dict[str, list[SparsityPoint]]:
    """{dataset: points} of the sparsity study, for each dataset where the table holds runs of a sparse method
    (``SPARSITY_KEYS``); {} for a sweep without any. The points are the table rows of LoRA and of the sparse methods
    on that dataset, in table order; the first LoRA row with a completed run is the reference (``delta``,
    ``speedup``)."""
    table = [r for r in runs if r.in_table]
    datasets = sorted(
        {r.dataset for r in table if r.method in SPARSITY_KEYS}, key=lambda d: (_order(d, DATASET_ORDER), d)
    )
    study = {}
    for ds in datasets:
        groups: dict[str, list[Run]] = {}
        for r in table:
            if r.dataset == ds and (r.method in SPARSITY_KEYS or r.method == SPARSITY_REFERENCE):
                groups.setdefault(r.row, []).append(r)
        points = [_sparsity_point(ds, row, groups[row]) for row in sorted(groups, key=_row_order)]
        ref = next((p for p in points if p.method == SPARSITY_REFERENCE and p.n), None)
        if ref is not None:
            ref.reference = True
            for p in points:
                p.delta = p.mean - ref.mean if p.mean is not None else None
                p.speedup = ref.step_s / p.step_s if p.step_s and ref.step_s else None
        study[ds] = points
    return study


def _of_runs(p: SparsityPoint, n_with: int, text: str) -> str:
    return text if n_with == p.n else f"{text} ({n_with} of {p.n})"


def _sparsity_row(p: SparsityPoint, modes: bool) -> list[str]:
    ref = p.mean if p.mean is not None else 0.0
    metric = "–" if p.mean is None else _fmt(p.mean, ref) + (f" ± {_fmt(p.std, ref)}" if p.n > 1 else "")
    if p.method not in SPARSITY_KEYS or p.n == 0:
        x = "–"
    else:
        x = "not recorded" if p.x is None else _of_runs(p, p.n_x, f"{p.x:.3f}")
    delta = "–" if p.delta is None else ("+" if p.delta >= 0 else "") + _fmt(p.delta, ref)
    speedup = "–" if p.speedup is None else f"{p.speedup:.2f}×"
    if p.reference:
        delta, speedup = "reference", "reference" if p.step_s is not None else "–"
    step = "–" if p.step_s is None else _of_runs(p, p.n_step, f"{p.step_s:.3f}" if p.step_s < 10 else f"{p.step_s:.1f}")
    row = [p.method, p.variant or "–", f"{p.n}" if p.n == p.n_runs else f"{p.n} of {p.n_runs}", x, metric, delta,
           step, speedup]  # fmt: skip
    if modes:
        row += ["–" if v is None else f"{v:.3f}" for v in (p.dense, p.sparse_eval)]
    return row


def _sparsity_footnotes(study: dict[str, list[SparsityPoint]]) -> list[str]:
    lines = []
    for ds, points in study.items():
        refs = [p for p in points if p.method == SPARSITY_REFERENCE]
        ref = next((p for p in refs if p.reference), None)
        if ref is None:
            lines.append(f"{ds}: no completed LoRA run, so Δ and speed-up there have no reference.")
        elif len(refs) > 1:
            lines.append(f"{ds}: LoRA ran in {len(refs)} configurations; Δ and speed-up are against {ref.row}.")
    where = lambda ps: "; ".join(ps)  # noqa: E731
    every = [p for points in study.values() for p in points]
    failed = [f"{p.row} × {p.dataset}: {sum(p.left_out.values())} of {p.n_runs} ("
              + ", ".join(f"{v} {k}" for k, v in sorted(p.left_out.items())) + ")" for p in every if p.left_out]  # fmt: skip
    if failed:
        lines.append(f"Failed or not completed, left out of the means: {where(failed)}.")
    no_x = [f"{p.row} × {p.dataset} ({p.n - p.n_x} of {p.n} runs)" for p in every
            if p.method in SPARSITY_KEYS and p.n_x < p.n]  # fmt: skip
    if no_x:
        keys = " / ".join(f"method_metrics.{k}" for k in SPARSITY_KEYS.values())
        lines.append(f"Left out of the plots, no sparsity recorded ({keys}; runs of an older peft_lab): {where(no_x)}.")
    no_step = [f"{p.row} × {p.dataset} ({p.n - p.n_step} of {p.n} runs)" for p in every if p.n_step < p.n]
    if no_step:
        lines.append(f"No step time recorded (step_time_median_s), left out of the step-time means and plot: "
                     f"{where(no_step)}.")  # fmt: skip
    kinds = sorted({str(r.device).split(":")[0] for p in every for r in p.runs if r.device})
    if len(kinds) > 1:
        lines.append(f"⚠ Step times were measured on different devices ({', '.join(kinds)}): a speed-up between "
                     "them compares devices, not methods.")  # fmt: skip
    return lines


def sparsity_markdown(study: dict[str, list[SparsityPoint]]) -> str:
    """The "Sparsity study" section: per dataset, one row per configuration of LoRA and the sparse methods
    (seeds, mean sparsity, test metric mean ± std, Δ vs LoRA, step time (s), speed-up vs LoRA, and the
    dense / sparse-evaluation accuracies where a run recorded them), then footnotes on what was left out."""
    lines = [
        "## Sparsity study",
        "",
        "One row per configuration (variant: the config keys that differ), over its seeds. sparsity: for sparse, "
        "the share of the LoRA factors' weights that are zero at the end of training; for sparselora, the share of "
        "base-linear FLOPs skipped while training (mean over seeds; two different quantities, so compare each "
        "method with LoRA rather than with the other at equal sparsity). Test metric: mean ± sample std over seeds. "
        "Δ vs LoRA: mean − the LoRA row's mean (not tested here: the paired tests are in the table above, against "
        "each dataset's best row). "
        "step time: the median training step time of each run (s), mean over seeds; speed-up vs LoRA: LoRA's "
        "step time / this one (> 1: faster than LoRA). Plots: sparsity_metric.png, sparsity_step_time.png.",
    ]
    for ds, points in study.items():
        metric = next((p.metric for p in points if p.metric != "?"), "?")
        modes = any(p.dense is not None or p.sparse_eval is not None for p in points)
        head = ["method", "variant", "seeds", "sparsity", f"{metric} (mean ± std)",
                f"Δ vs LoRA ({'lower' if lower_is_better(metric) else 'higher'} is better)", "step time (s)",
                "speed-up vs LoRA"] + (["accuracy, dense eval", "accuracy, sparse eval"] if modes else [])  # fmt: skip
        lines += ["", f"### {ds} ({metric} on the test split {_arrow(metric)})", ""]
        lines += _md_table(head, [_sparsity_row(p, modes) for p in points])
    for note in _sparsity_footnotes(study):
        lines += ["", note]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes_per_dataset(datasets: list[str], title: str):
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(4.5 * max(1, len(datasets)), 4), squeeze=False)
    fig.suptitle(title)
    return fig, axes[0]


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _metric_label(metric: str, split: str = "") -> str:
    return f"{metric}{f' on the {split} split' if split else ''} ({'lower' if lower_is_better(metric) else 'higher'} is better)"


def figures(rows: list[str], datasets: list[str], cells: dict) -> dict:
    """The five figures as matplotlib Figure objects (Agg backend), keyed by PLOTS names."""
    plt = _pyplot()
    colors = {row: plt.cm.tab10(i % 10) for i, row in enumerate(rows)}
    done = {k: a for k, a in cells.items() if a.n > 0}
    metrics = _metric_names(datasets, cells)

    out = {}
    # 1. metric per method x dataset (error bars: sample std over seeds)
    fig, axes = _axes_per_dataset(datasets, "Main metric per method (error bars: std over seeds)")
    for ax, ds in zip(axes, datasets):
        present = [r for r in rows if (r, ds) in done]
        means = [done[(r, ds)].mean for r in present]
        errs = [0.0 if math.isnan(done[(r, ds)].std) else done[(r, ds)].std for r in present]
        ax.bar(range(len(present)), means, yerr=errs, capsize=4, color=[colors[r] for r in present], label=ds)
        ax.set_xticks(range(len(present)), present, rotation=30, ha="right")
        ax.set_title(ds)
        ax.set_xlabel("method")
        ax.set_ylabel(_metric_label(metrics[ds]))
    out["metric_by_method"] = fig

    # 2. metric vs trainable parameters
    fig, axes = _axes_per_dataset(datasets, "Main metric vs trainable parameters")
    for ax, ds in zip(axes, datasets):
        for r in rows:
            a = done.get((r, ds))
            if a is not None and a.trainable_pct:
                ax.scatter([a.trainable_pct], [a.mean], color=colors[r], label=r, s=50)
        ax.set_xscale("log")
        ax.set_title(ds)
        ax.set_xlabel("trainable parameters (% of model, log scale)")
        ax.set_ylabel(_metric_label(metrics[ds]))
        _legend(ax)
    out["metric_vs_trainable"] = fig

    # 3./4. grouped bars per method, one series per dataset
    def grouped(attr: str, ylabel: str, title: str):
        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows) + 2), 4))
        width = 0.8 / max(1, len(datasets))
        for j, ds in enumerate(datasets):
            xs = [i + j * width for i, r in enumerate(rows) if (r, ds) in done]
            ys = [getattr(done[(r, ds)], attr) or 0 for r in rows if (r, ds) in done]
            ax.bar(xs, ys, width=width, label=ds)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], rows, rotation=30, ha="right")
        ax.set_xlabel("method")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(title="dataset", fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
        return fig

    out["peak_memory"] = grouped("peak_memory_mib", "peak memory (MiB)", "Peak memory per method")
    out["throughput"] = grouped("tokens_per_s", "throughput (tokens/s)", "Training throughput per method")

    # 5. metric vs wall time, with the Pareto front (faster and better)
    fig, axes = _axes_per_dataset(datasets, "Main metric vs training wall time (line: Pareto front)")
    for ax, ds in zip(axes, datasets):
        pts = [(done[(r, ds)].wall_s, done[(r, ds)].mean, r) for r in rows if (r, ds) in done and done[(r, ds)].wall_s]
        for x, y, r in pts:
            ax.scatter([x], [y], color=colors[r], label=r, s=50)
        sign = 1 if lower_is_better(metrics[ds]) else -1
        front, best = [], math.inf
        for x, y, _ in sorted(pts):
            if sign * y < best:
                best = sign * y
                front.append((x, y))
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", linewidth=1, label="Pareto front")
        ax.set_title(ds)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel(_metric_label(metrics[ds]))
        _legend(ax)
    out["metric_vs_walltime"] = fig
    for fig in out.values():
        fig.tight_layout()
    return out


def protocol_figures(protocol: dict, runs: list[Run]) -> dict:
    """``select_lr``: the selection-split metric against the learning rate (log scale), one line per arm
    (labelled with its table row), one subplot per dataset; a star marks the chosen lr."""
    by_dir = {r.run_dir: r for r in runs if r.run_dir}
    arms = _protocol_arms(protocol, runs)
    datasets = list(arms)
    fig, axes = _axes_per_dataset(datasets, "Stage 1: selection metric per learning rate (★: chosen)")
    for ax, ds in zip(axes, datasets):
        tried = set()
        for label, arm in arms[ds]:
            points = _stage1_points(arm, by_dir)
            tried.update(lr for lr, _, _ in points)
            pts = [(lr, v) for lr, v, _ in points if v is not None]
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label if pts else f"{label}: {NO_LR}")
            chosen = [(lr, v) for lr, v in pts if _is_chosen(arm, lr)]
            if chosen:
                ax.plot(*chosen[0], "*", markersize=16, color=line[0].get_color(), label="_chosen")
        metric = next((str(a["metric"]) for _, a in arms[ds] if a.get("metric")), "metric")
        ax.set_xscale("log")
        ax.set_xticks(sorted(tried), [_fmt_lr(lr) for lr in sorted(tried)], rotation=30)
        ax.minorticks_off()
        ax.set_title(ds)
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel(_metric_label(metric, "selection"))
        _legend(ax)
    fig.tight_layout()
    return {"select_lr": fig}


def inference_figures(rows: list[str], datasets: list[str], cells: dict) -> dict:
    """``latency`` (``INFERENCE_PLOTS``): per dataset with inference data, grouped bars per method (table order):
    unmerged and merged latency per example (ms, means over seeds; ``_agg_inference``). A merged bar is hatched
    when a run's merged outputs differ from its unmerged ones; a method without one says "n/a" (nothing to merge)
    or "merge failed". {} when no cell has inference data."""
    have = {k: a for k, a in cells.items() if a.inference_n}
    if not have:
        return {}
    cols = [ds for ds in datasets if any(d == ds for _, d in have)]
    hatched = any(a.mismatched and a.merged_latency_ms is not None for a in have.values())
    title = "Inference latency per example (mean over seeds; merged: after merge_and_unload)" + (
        "\n(hatched: merged outputs differ from unmerged ones)" if hatched else "")  # fmt: skip
    fig, axes = _axes_per_dataset(cols, title)
    width = 0.4
    for ax, ds in zip(axes, cols):
        present = [have[(r, ds)] for r in rows if (r, ds) in have]
        xs = np.arange(len(present), dtype=float)
        ax.bar(xs - width / 2, [a.latency_ms for a in present], width, label="unmerged")
        merged = [(x, a) for x, a in zip(xs, present) if a.merged_latency_ms is not None]
        if merged:
            bars = ax.bar([x + width / 2 for x, _ in merged], [a.merged_latency_ms for _, a in merged], width,
                          label="merged")  # fmt: skip
            for bar, (_, a) in zip(bars, merged):
                if a.mismatched:
                    bar.set_hatch("//")
        for x, a in zip(xs, present):
            if a.merged_latency_ms is None:
                why = "n/a" if a.merge == "not_applicable" else "merge failed" if a.merge_failed else "–"
                ax.text(x + width / 2, 0, why, rotation=90, ha="center", va="bottom", fontsize="small")
        ax.set_xticks(xs, [a.row for a in present], rotation=30, ha="right")
        ax.set_xlim(-0.75, len(present) - 0.25)  # one method: two bars of the usual width, "n/a" inside the axes
        top = max(max(a.latency_ms, a.merged_latency_ms or 0) for a in present)
        ax.set_ylim(0, 1.3 * top if top > 0 else 1)  # room for the legend above the bars
        ax.set_title(ds)
        ax.set_xlabel("method")
        ax.set_ylabel("latency per example (ms)")
        ax.legend(fontsize="small", loc="upper left", ncols=2)
    fig.tight_layout()
    return {"latency": fig}


def _plot_point(p: SparsityPoint, y_of) -> Optional[tuple[float, float, float]]:
    """(mean x, mean y, sample std of y; nan for one run) over the point's runs that recorded a sparsity and y."""
    pairs = [(x, y) for r in p.runs if (x := run_sparsity(r)) is not None and (y := y_of(r)) is not None]
    if not pairs:
        return None
    y, err = _mean_std([y for _, y in pairs])
    return _mean_std([x for x, _ in pairs])[0], y, err


def sparsity_figures(study: dict[str, list[SparsityPoint]]) -> dict:
    """``SPARSITY_PLOTS`` from ``sparsity_study``, one subplot per dataset, x = sparsity (0..1, ``SPARSITY_XLABEL``).

    ``sparsity_metric``: the test main metric; ``sparsity_step_time``: the median training step time (s). One line
    per sparse method through its points sorted by x (x: mean sparsity, y: mean over seeds, error bar: sample std,
    none for one seed); on accuracy, sparselora's sparse-evaluation accuracy as a dashed "sparselora (sparse eval)"
    line; the LoRA reference's mean as a horizontal line with a ± std band. Runs without a recorded sparsity (or
    step time) are left out."""
    plt = _pyplot()
    datasets = list(study)
    colors = {m: plt.cm.tab10(i) for i, m in enumerate((SPARSITY_REFERENCE, *SPARSITY_KEYS))}
    out = {}
    for name, title in (
        ("sparsity_metric", "Test metric vs sparsity"),
        ("sparsity_step_time", "Training step time vs sparsity"),
    ):
        fig, axes = _axes_per_dataset(datasets, f"{title}\n(error bars: std over seeds; band: LoRA mean ± std)")
        for ax, ds in zip(axes, datasets):
            points = study[ds]
            metric = next((p.metric for p in points if p.metric != "?"), "?")
            ref = next((p for p in points if p.reference), None)
            mean, std = (None, math.nan) if ref is None else (ref.mean, ref.std) if name == "sparsity_metric" else (
                ref.step_s, ref.step_std)  # fmt: skip
            if mean is not None:
                band = f"{ref.row} (mean ± std)" if not math.isnan(std) else f"{ref.row} (mean, one seed)"
                ax.axhline(mean, color=colors[SPARSITY_REFERENCE], linewidth=1.5, label=band)
                if not math.isnan(std):
                    ax.axhspan(mean - std, mean + std, color=colors[SPARSITY_REFERENCE], alpha=0.2, linewidth=0)
            series = [(m, m, (lambda r: r.value) if name == "sparsity_metric" else _step_time, "o-")
                      for m in SPARSITY_KEYS]  # fmt: skip
            if name == "sparsity_metric" and metric == "accuracy":
                series.append(
                    ("sparselora", "sparselora (sparse eval)", lambda r: _finite(r.test.get(EVAL_MODES[1])), "s--")
                )
            drawn = False
            for method, label, y_of, style in series:
                pts = sorted(pt for p in points if p.method == method and (pt := _plot_point(p, y_of)) is not None)
                if pts:
                    drawn = True
                    ax.errorbar([pt[0] for pt in pts], [pt[1] for pt in pts], yerr=[pt[2] for pt in pts], fmt=style,
                                capsize=4, color=colors[method], label=label)  # fmt: skip
            if not drawn:
                ax.text(
                    0.5,
                    0.5,
                    "no completed run with a sparsity recorded",
                    transform=ax.transAxes,
                    ha="center",
                    va="center",
                )
            ax.set_xlim(-0.03, 1.03)
            ax.set_title(ds)
            ax.set_xlabel(SPARSITY_XLABEL.replace("zero; ", "zero;\n"), fontsize="small")  # fits one subplot
            ax.set_ylabel(_metric_label(metric) if name == "sparsity_metric" else "median training step time (s)")
            _legend(ax)
        fig.tight_layout()
        out[name] = fig
    return out


# ----------------------------------------------------------------------------- build


def sweep_logger(sweep_dir: Path) -> Optional[dict]:
    """The sweep's logger config, from the multirun.yaml Hydra wrote into the sweep dir."""
    path = Path(sweep_dir) / rf.MULTIRUN_YAML
    if not path.exists():
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    lc = cfg.get("logger")
    return OmegaConf.to_container(lc, resolve=False) if lc is not None else None


def build(sweep_dir: Path, logger: Optional[dict] = None, out_dir: Optional[Path] = None, quiet: bool = False) -> dict:
    """Write report.md / report.csv / runs.csv / PNGs; log them to W&B when a logger is given.

    Returns {"markdown", "csv", "runs_csv", <plot name>: path, ...}: the ``PLOTS`` always, the
    ``PROTOCOL_PLOTS`` only for a protocol sweep, the ``SPARSITY_PLOTS`` only for a sweep with sparse /
    sparselora runs, the ``INFERENCE_PLOTS`` only when a run recorded its inference cost (and "wandb_run_id" when
    logged)."""
    sweep_dir = Path(sweep_dir)
    runs = load_runs(sweep_dir)
    if not runs:
        from peft_lab.errors import UserError

        raise UserError(
            f"no runs found in {sweep_dir} (no */metrics.json and no .cells/manifest.json). "
            "Fix: pass the sweep dir itself (the folder holding one sub-folder per cell)"
        )
    protocol = rf.read_protocol(sweep_dir)
    rows, datasets, cells = aggregate(runs)
    out_dir = Path(out_dir) if out_dir else sweep_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, datasets, cells, title=f"Sweep report: {sweep_dir.name}", protocol=bool(protocol),
                  setup=setup_line(runs))  # fmt: skip
    if protocol:
        md += "\n" + stage1_markdown(protocol, runs)
    inference = inference_markdown(rows, datasets, cells, runs)
    if inference:
        md += "\n" + inference
    study = sparsity_study(runs)
    if study:
        md += "\n" + sparsity_markdown(study)
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "report.csv", "runs_csv": out_dir / "runs.csv"}
    write_atomic(paths["markdown"], md)
    write_atomic(paths["csv"], table_csv(rows, datasets, cells))
    write_atomic(paths["runs_csv"], runs_csv(runs))
    plt = _pyplot()
    figs = figures(rows, datasets, cells)
    if protocol:
        figs.update(protocol_figures(protocol, runs))
    if study:
        figs.update(sparsity_figures(study))
    figs.update(inference_figures(rows, datasets, cells))
    for name, fig in figs.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        paths[name] = out_dir / f"{name}.png"
        write_atomic(paths[name], buf.getvalue())
    if not quiet:
        print(md, flush=True)
        print(f"Report written to {out_dir}", flush=True)
    if logger and logger.get("backend") == "wandb":
        try:
            plots = {name: paths[name] for name in figs}
            paths["wandb_run_id"] = log_to_wandb(sweep_dir, out_dir, logger, runs, rows, datasets, cells, plots)
        except Exception as err:  # the files are the report; W&B is a copy of it
            log.warning(
                f"report: W&B logging failed ({type(err).__name__}: {err}); the files in {out_dir} are complete"
            )
    return paths


def log_to_wandb(sweep_dir: Path, out_dir: Path, lc: dict, runs, rows, datasets, cells, plots: dict) -> Optional[str]:
    """The table (``CSV_FIELDS`` per row × dataset) and the ``plots`` PNGs as a ``report`` run of the sweep's group."""
    from omegaconf import OmegaConf

    from peft_lab import tracking
    from peft_lab.schemas import LoggerConfig

    lcfg = OmegaConf.merge(OmegaConf.structured(LoggerConfig(name="wandb")), lc)  # the schema's defaults
    group = tracking.sweep_group(sweep_dir, lcfg.group)
    tracker = tracking.make_tracker(
        lcfg, out_dir, group, "report", {"sweep_dir": sweep_dir.name, "rows": rows, "datasets": datasets},
        ["report"], job_type="report",
    )  # fmt: skip
    if tracker.run_id is None:
        return None
    import wandb

    failed = True
    try:
        data = [[row, ds] + [_csv_value(getattr(a, f)) for f in CSV_FIELDS] for (row, ds), a in cells.items()]
        payload = {"report/table": wandb.Table(columns=["method", "dataset", *CSV_FIELDS], data=data)}
        for name, path in plots.items():
            payload[f"report/{name}"] = wandb.Image(str(path))
        tracker.run.log(payload, step=0)
        tracker.summary(
            {"cells": len(cells), "runs": len(runs), "completed_runs": sum(r.status == Status.completed for r in runs)}
        )
        failed = False
        return tracker.run_id
    finally:
        tracker.finish(failed=failed)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peft_lab.report", description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir", type=Path, help="the sweep folder (hydra.sweep.dir), e.g. multirun/2026-11-29/10-00-00")
    p.add_argument("--out", type=Path, default=None, help="where to write the report (default: <sweep>/report)")
    p.add_argument(
        "--wandb",
        choices=["auto", "online", "offline", "disabled"],
        default=None,
        help="log the report to W&B in this mode (default: the sweep's logger config; disabled if it had none)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    if not args.sweep_dir.is_dir():
        print(
            f"peft_lab: error: {args.sweep_dir} is not a folder. Fix: pass a sweep dir (hydra.sweep.dir)",
            file=sys.stderr,
        )
        return 2
    lc = sweep_logger(args.sweep_dir)
    if args.wandb is not None:
        lc = {
            **(lc or {"backend": "wandb"}),
            "backend": "wandb" if args.wandb != "disabled" else "none",
            "mode": args.wandb,
        }
    from peft_lab.errors import UserError

    try:
        build(args.sweep_dir, lc, args.out)
    except UserError as err:
        print(f"peft_lab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
