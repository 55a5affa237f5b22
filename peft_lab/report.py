"""A sweep as a paper table and plots: ``python -m peft_lab.report <sweep dir>``.

Reads every cell's metrics.json (and the sweep's manifest, so cells that never ran
show as pending), aggregates seeds (mean ± sample std), and writes into
``<sweep>/report/``:

- ``report.md``: rows are methods, columns datasets; each cell holds the main metric,
  trainable %, peak memory and wall time. The best method per dataset is in bold and
  methods whose difference from it is within seed noise are marked ``≈``.
- ``report.csv``: the same table as numbers (one row per method, columns per dataset);
  ``runs.csv``: one row per run.
- five PNG plots: metric per method × dataset, metric vs trainable parameters, peak
  memory, throughput, metric vs wall time (with the Pareto front).

"Within seed noise": Welch's two-sided t-test at 5 % between a method and the best one,
both with at least two seeds. With a single seed nothing is tested and the report says so.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from peft_lab import runfiles as rf
from peft_lab.runfiles import Status, write_atomic

log = logging.getLogger(__name__)

REPORT_DIR = rf.REPORT_DIR
PLOTS = ("metric_by_method", "metric_vs_trainable", "peak_memory", "throughput", "metric_vs_walltime")
# two-sided 5 % critical values of Student's t, df 1..30; beyond that 1.96 is close enough
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip
_SWEPT_ELSEWHERE = ("method=", "dataset=", "seed=", "hydra.", "cluster", "logger")


METHOD_ORDER = ("lora", "qlora", "hira", "sparse", "sparselora")
DATASET_ORDER = ("sst2", "imdb", "wikitext2")


def _order(name: str, known: tuple) -> int:
    return known.index(name) if name in known else len(known)


def lower_is_better(metric: str) -> bool:
    return "perplexity" in metric or metric.endswith("loss")


def t_critical(df: float) -> float:
    if df < 1:
        return _T975[0]
    return _T975[min(int(df), 30) - 1] if df < 31 else 1.96


def welch_within_noise(a: Agg, b: Agg) -> Optional[bool]:
    """True if the difference of means is not significant at 5 % (Welch); None when either has < 2 seeds."""
    if a.n < 2 or b.n < 2:
        return None
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    diff = abs(a.mean - b.mean)
    if va + vb == 0:
        return diff == 0
    df = (va + vb) ** 2 / ((va**2 / (a.n - 1)) + (vb**2 / (b.n - 1)))
    return diff / math.sqrt(va + vb) < t_critical(df)


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
    trainable_pct: Optional[float] = None
    trainable_params: Optional[int] = None
    peak_memory_mib: Optional[float] = None
    wall_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    run_dir: str = ""
    error: str = ""
    row: str = ""
    config: dict = field(default_factory=dict)  # the computation config (runfiles.computation_config)


@dataclass
class Agg:
    row: str
    dataset: str
    status: str  # a Status value, or "partial" (some seeds completed)
    metric: Optional[str] = None
    n: int = 0
    n_expected: int = 0
    values: list = field(default_factory=list)
    mean: float = float("nan")
    std: float = float("nan")  # sample std (ddof=1); nan with one seed
    trainable_pct: Optional[float] = None
    trainable_params: Optional[float] = None
    peak_memory_mib: Optional[float] = None
    wall_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    vs_best: str = ""  # best | within_noise | worse | untested


def _mean(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def load_runs(sweep_dir: Path) -> list[Run]:
    """Every cell of the sweep: those with a record (metrics.json), plus manifest cells that have none
    (pending). A completed run whose main metric is not a finite number counts as failed: it is never
    averaged or ranked."""
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
                trainable_pct=rec.trainable_pct,
                trainable_params=rec.trainable_params,
                peak_memory_mib=mem / 2**20 if mem is not None else None,
                wall_s=rec.train_wall_s,
                tokens_per_s=rec.tokens_per_s,
                run_dir=path.parent.name,
                error=error,
                config=rec.config,
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
    _label_rows(runs)
    return runs


def _variant(r: Run) -> dict:
    """What a run computed, seed aside, as flat keys: its stored config, else (older records) its overrides."""
    if r.config:
        flat = rf.flatten(r.config)
    else:
        flat = dict(o.lstrip("+").split("=", 1) for o in r.overrides if "=" in o and not o.startswith(_SWEPT_ELSEWHERE))
    flat.pop("seed", None)
    return flat


def _label_rows(runs: list[Run]) -> None:
    """Row label = method, plus every config key that takes more than one value among this method's runs
    on one dataset (method.r=16, model.name=tiny, ...). Runs that computed different things therefore
    never share a row; seeds of one configuration always do."""
    variants = [_variant(r) for r in runs]
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
        shown = [k for k in keys if not ("model.name" in keys and k.startswith("model.") and k != "model.name")]
        parts = [f"{k}={json.dumps(v[k], default=str) if not isinstance(v.get(k), str) else v[k]}" if k in v
                 else f"{k}=(unset)" for k in shown]  # fmt: skip
        if len(parts) > 4 or len(shown) < len(keys):  # the hash tells apart what the label leaves out
            digest = rf.fingerprint({k: v.get(k) for k in keys})[:6]
            parts = parts[:4] + [f"+{len(keys) - min(4, len(parts))} more #{digest}"]
        r.row = r.method + (f" [{', '.join(parts)}]" if parts else "")


def _label_priority(key: str) -> tuple:
    """The keys a reader looks for first: the model, the method's settings, training, then data and the rest."""
    for rank, prefix in enumerate(("model.name", "method.", "train.", "dataset.", "seed", "model.")):
        if key.startswith(prefix):
            return rank, key
    return 9, key


def aggregate(runs: list[Run]) -> tuple[list[str], list[str], dict]:
    """(rows, datasets, {(row, dataset): Agg}) with mean ± std over seeds and the noise marks."""
    rows = sorted(dict.fromkeys(r.row for r in runs), key=lambda row: (_order(row.split(" ")[0], METHOD_ORDER), row))
    datasets = sorted(dict.fromkeys(r.dataset for r in runs), key=lambda d: (_order(d, DATASET_ORDER), d))
    cells: dict = {}
    for row in rows:
        for ds in datasets:
            group = [r for r in runs if r.row == row and r.dataset == ds]
            if not group:
                continue
            done = [r for r in group if r.status == Status.completed and r.value is not None]
            a = Agg(row, ds, Status.pending.value, n=len(done), n_expected=len(group))
            a.metric = next((r.metric for r in group if r.metric), None)
            if done:
                a.status = Status.completed.value if len(done) == len(group) else "partial"
                a.values = [float(r.value) for r in sorted(done, key=lambda r: r.seed)]
                a.mean = sum(a.values) / a.n
                a.std = math.sqrt(sum((v - a.mean) ** 2 for v in a.values) / (a.n - 1)) if a.n > 1 else float("nan")
                a.trainable_pct = _mean([r.trainable_pct for r in done])
                a.trainable_params = _mean([r.trainable_params for r in done])
                a.peak_memory_mib = _mean([r.peak_memory_mib for r in done])
                a.wall_s = _mean([r.wall_s for r in done])
                a.tokens_per_s = _mean([r.tokens_per_s for r in done])
            else:  # the most telling status among the seeds: failed > interrupted > running > requeued > pending
                for st in (Status.failed, Status.interrupted, Status.running, Status.requeued, Status.pending):
                    if any(r.status == st for r in group):
                        a.status = st.value
                        break
            cells[(row, ds)] = a
    for ds in datasets:
        done = [a for (_, d), a in cells.items() if d == ds and a.n > 0]
        if not done:
            continue
        sign = 1 if lower_is_better(done[0].metric or "") else -1
        best = min(done, key=lambda a: sign * a.mean)
        for a in done:
            if a is best:
                a.vs_best = "best"
            else:
                same = welch_within_noise(a, best)
                a.vs_best = "untested" if same is None else ("within_noise" if same else "worse")
    return rows, datasets, cells


# ----------------------------------------------------------------------------- tables


def _fmt(v: float, ref: float) -> str:
    return f"{v:.3f}" if abs(ref) < 10 else f"{v:.2f}"


def metric_text(a: Agg) -> str:
    if a.n == 0:
        return a.status
    text = _fmt(a.mean, a.mean)
    if a.n > 1:
        text += f" ± {_fmt(a.std, a.mean)}"
    return text


def markdown(rows: list[str], datasets: list[str], cells: dict, title: str = "") -> str:
    metrics = {ds: next((a.metric for (_, d), a in cells.items() if d == ds and a.metric), "?") for ds in datasets}
    head = ["method"] + [f"{ds} ({metrics[ds]} {'↓' if lower_is_better(metrics[ds]) else '↑'})" for ds in datasets]
    lines = [f"# {title}" if title else "# Sweep report", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        out = [row]
        for ds in datasets:
            a = cells.get((row, ds))
            if a is None:
                out.append("–")
                continue
            if a.n == 0:
                out.append(f"*{a.status}*")
                continue
            m = metric_text(a)
            m = f"**{m}**" if a.vs_best == "best" else (f"≈ {m}" if a.vs_best == "within_noise" else m)
            seeds = f" (n={a.n})" if a.n > 1 or a.n_expected > 1 else ""
            if a.n < a.n_expected:
                seeds = f" (n={a.n} of {a.n_expected})"
            info = []
            if a.trainable_pct is not None:
                info.append(f"{a.trainable_pct:.2f} % trainable")
            if a.peak_memory_mib is not None:
                info.append(f"{a.peak_memory_mib:,.0f} MiB")
            if a.wall_s is not None:
                info.append(f"{a.wall_s:,.0f} s" if a.wall_s >= 10 else f"{a.wall_s:.1f} s")
            out.append(f"{m}{seeds}<br>{' · '.join(info)}")
        lines.append("| " + " | ".join(out) + " |")
    max_n = max((a.n for a in cells.values()), default=0)
    lines += [
        "",
        "Each cell: main metric (mean ± sample std over seeds; n = seeds), trainable parameters, "
        "peak memory (CUDA max allocated, or on CPU the process's peak RSS after the model is loaded), training wall time.",
    ]
    if max_n > 1:
        lines.append(
            "**Bold**: best mean per dataset. ≈: not distinguishable from the best at 5 % (Welch's t-test over "
            "seeds); do not rank these. Cells with one seed are not tested."
        )
    elif max((a.n_expected for a in cells.values()), default=0) > 1:
        lines.append(
            "**Bold**: best mean per dataset. At most one seed per cell has completed: differences are untested "
            "against seed noise until the other seeds finish (re-run the sweep)."
        )
    else:
        lines.append(
            "**Bold**: best mean per dataset. One seed per cell: differences are untested against seed noise; "
            "run with seed=0,1,2 to mark them."
        )
    problems = [a for a in cells.values() if a.status != Status.completed.value]
    if problems:
        lines.append("")
        lines.append(
            "Incomplete: "
            + "; ".join(f"{a.row} × {a.dataset}: {a.status} ({a.n}/{a.n_expected} seeds)" for a in problems)
        )
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "metric",
    "status",
    "n",
    "mean",
    "std",
    "vs_best",
    "trainable_pct",
    "peak_memory_mib",
    "wall_s",
    "tokens_per_s",
)


def table_csv(rows: list[str], datasets: list[str], cells: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method"] + [f"{ds}/{f}" for ds in datasets for f in CSV_FIELDS])
    for row in rows:
        out: list[Any] = [row]
        for ds in datasets:
            a = cells.get((row, ds))
            for f in CSV_FIELDS:
                v = getattr(a, f) if a is not None else ""
                out.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
        w.writerow(out)
    return buf.getvalue()


def runs_csv(runs: list[Run]) -> str:
    buf = io.StringIO()
    cols = ["row", "method", "dataset", "model", "seed", "status", "metric", "value", "trainable_pct",
            "trainable_params", "peak_memory_mib", "wall_s", "tokens_per_s", "run_dir", "error"]  # fmt: skip
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in runs:
        w.writerow({c: getattr(getattr(r, c), "value", getattr(r, c)) for c in cols})
    return buf.getvalue()


# ----------------------------------------------------------------------------- plots


def figures(rows: list[str], datasets: list[str], cells: dict) -> dict:
    """The five figures as matplotlib Figure objects (Agg backend), keyed by PLOTS names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {row: plt.cm.tab10(i % 10) for i, row in enumerate(rows)}
    done = {k: a for k, a in cells.items() if a.n > 0}

    def metric_label(ds: str) -> str:
        m = next((a.metric for (_, d), a in cells.items() if d == ds and a.metric), "metric")
        return f"{m} ({'lower' if lower_is_better(m) else 'higher'} is better)"

    def per_dataset(title: str):
        fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(4.5 * max(1, len(datasets)), 4), squeeze=False)
        fig.suptitle(title)
        return fig, axes[0]

    out = {}
    # 1. metric per method x dataset (error bars: sample std over seeds)
    fig, axes = per_dataset("Main metric per method (error bars: std over seeds)")
    for ax, ds in zip(axes, datasets):
        present = [r for r in rows if (r, ds) in done]
        means = [done[(r, ds)].mean for r in present]
        errs = [0.0 if math.isnan(done[(r, ds)].std) else done[(r, ds)].std for r in present]
        ax.bar(range(len(present)), means, yerr=errs, capsize=4, color=[colors[r] for r in present], label=ds)
        ax.set_xticks(range(len(present)), present, rotation=30, ha="right")
        ax.set_title(ds)
        ax.set_xlabel("method")
        ax.set_ylabel(metric_label(ds))
    out["metric_by_method"] = fig

    # 2. metric vs trainable parameters
    fig, axes = per_dataset("Main metric vs trainable parameters")
    for ax, ds in zip(axes, datasets):
        for r in rows:
            a = done.get((r, ds))
            if a is not None and a.trainable_pct:
                ax.scatter([a.trainable_pct], [a.mean], color=colors[r], label=r, s=50)
        ax.set_xscale("log")
        ax.set_title(ds)
        ax.set_xlabel("trainable parameters (% of model, log scale)")
        ax.set_ylabel(metric_label(ds))
        ax.legend(fontsize="small")
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
        fig.tight_layout()
        return fig

    out["peak_memory"] = grouped("peak_memory_mib", "peak memory (MiB)", "Peak memory per method")
    out["throughput"] = grouped("tokens_per_s", "throughput (tokens/s)", "Training throughput per method")

    # 5. metric vs wall time, with the Pareto front (faster and better)
    fig, axes = per_dataset("Main metric vs training wall time (line: Pareto front)")
    for ax, ds in zip(axes, datasets):
        pts = [(done[(r, ds)].wall_s, done[(r, ds)].mean, r) for r in rows if (r, ds) in done and done[(r, ds)].wall_s]
        for x, y, r in pts:
            ax.scatter([x], [y], color=colors[r], label=r, s=50)
        sign = 1 if lower_is_better(next((a.metric for (_, d), a in done.items() if d == ds), "")) else -1
        front, best = [], math.inf
        for x, y, _ in sorted(pts):
            if sign * y < best:
                best = sign * y
                front.append((x, y))
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", linewidth=1, label="Pareto front")
        ax.set_title(ds)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel(metric_label(ds))
        ax.legend(fontsize="small")
    out["metric_vs_walltime"] = fig
    for fig in out.values():
        fig.tight_layout()
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
    """Write report.md / report.csv / runs.csv / PNGs; log them to W&B when a logger is given. Returns paths."""
    sweep_dir = Path(sweep_dir)
    runs = load_runs(sweep_dir)
    if not runs:
        from peft_lab.errors import UserError

        raise UserError(
            f"no runs found in {sweep_dir} (no */metrics.json and no .cells/manifest.json). "
            "Fix: pass the sweep dir itself (the folder holding one sub-folder per cell)"
        )
    rows, datasets, cells = aggregate(runs)
    out_dir = Path(out_dir) if out_dir else sweep_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, datasets, cells, title=f"Sweep report: {sweep_dir.name}")
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "report.csv", "runs_csv": out_dir / "runs.csv"}
    write_atomic(paths["markdown"], md)
    write_atomic(paths["csv"], table_csv(rows, datasets, cells))
    write_atomic(paths["runs_csv"], runs_csv(runs))
    import matplotlib.pyplot as plt

    for name, fig in figures(rows, datasets, cells).items():
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
            paths["wandb_run_id"] = log_to_wandb(sweep_dir, out_dir, logger, runs, rows, datasets, cells)
        except Exception as err:  # the files are the report; W&B is a copy of it
            log.warning(
                f"report: W&B logging failed ({type(err).__name__}: {err}); the files in {out_dir} are complete"
            )
    return paths


def log_to_wandb(sweep_dir: Path, out_dir: Path, lc: dict, runs, rows, datasets, cells) -> Optional[str]:
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
        cols = ["method", "dataset", "metric", "status", "n", "mean", "std", "vs_best", "trainable_pct",
                "peak_memory_mib", "wall_s", "tokens_per_s"]  # fmt: skip
        data = []
        for (row, ds), a in cells.items():
            data.append([row, ds, a.metric, a.status, a.n, None if math.isnan(a.mean) else a.mean,
                         None if math.isnan(a.std) else a.std, a.vs_best, a.trainable_pct, a.peak_memory_mib,
                         a.wall_s, a.tokens_per_s])  # fmt: skip
        payload = {"report/table": wandb.Table(columns=cols, data=data)}
        for name in PLOTS:
            payload[f"report/{name}"] = wandb.Image(str(out_dir / f"{name}.png"))
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
