"""The learning-rate selection protocol: ``python train.py -m ... +protocol=select_lr seed=0,1,2``.

A Hydra sweeper (``SelectLrSweeper`` in ``hydra_plugins/peft_lab_launcher``; this module holds its
logic) that drives whatever launcher the sweep uses (``cluster=local`` or ``cluster=slurm``), as
Hydra's Optuna and Ax sweepers do, in two stages:

1. **Stage 1, selection.** The command line is expanded as Hydra's basic sweeper does, the ``seed``
   values aside. Each resulting combination (an *arm*: a method on a dataset, with whatever else the
   user swept) runs once per learning rate of its method's ``method.lr_grid``, with the first seed.
   Each run scores its selection split (never the test split: ``dataset.select_split``).
2. **Stage 2, report.** Each arm's best learning rate (best selection metric; ties go to the first in
   the grid) runs with every seed; their test metrics are the table. The first seed's stage-2 run is
   the stage-1 run at that lr (same config, same folder), so it is reused, not recomputed.

Cost: sum over arms of the grid size + arms x (seeds - 1) runs. A method that trains nothing on the
task (``Method.trains()`` is False, e.g. ``head`` on WikiText-2) gets a single grid point.

A stage-1 run that *diverged* says that lr is too high: it is out of the running. Any other failure
(an error, an interrupted run) leaves that arm's grid incomplete, so nothing is chosen for it, its
stage 2 does not run, and the sweep exits 1 naming it: choosing among the lrs that happened to finish
would be a silent bias. Re-running the command finishes only what is missing (completed cells of
both stages are reused by their config fingerprint, ``peft_lab.runfiles.check_reusable``).

Everything the report needs is written to ``<sweep>/protocol.json`` (``runfiles.write_protocol``).
Reference: the selection / test separation and per-method tuning follow Hugging Face PEFT's
``method_comparison`` suite (validation for choices, test reported once) and Dodge et al., 2019
("Show your work"), on reporting the tuning budget.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from peft_lab import runfiles as rf
from peft_lab.runfiles import Status
from peft_lab.schemas import plain

log = logging.getLogger(__name__)

PROTOCOL = "select_lr"
LR_KEY = "method.lr"
SEED_KEY = "seed"
_NOT_ARM = ("protocol=", "logger", "cluster", "hydra.")


@dataclass
class Arm:
    """One method x dataset (x whatever else was swept) combination: its stage-1 grid and outcome."""

    overrides: list[str]
    method: str
    dataset: str
    metric: str
    lower_is_better: bool
    grid: list[float]
    stage1: list[dict] = field(default_factory=list)  # {"lr", "run_dir", "status", "failure", "select"}
    chosen_lr: Optional[float] = None
    at_edge: bool = False
    flat: bool = False  # every lr scored the same: the grid told nothing (the first lr is taken)
    trains: bool = True  # False: the method trains nothing here (one grid point; the zero-shot row)
    problem: str = ""  # why nothing was chosen
    stage2: list[str] = field(default_factory=list)  # run-dir names

    @property
    def name(self) -> str:
        return arm_name(self.overrides)

    def cell(self, lr: float, seed: Any) -> list[str]:
        return [*self.overrides, f"{LR_KEY}={lr!r}", f"{SEED_KEY}={seed}"]


def arm_name(overrides: list[str]) -> str:
    """An arm's overrides that can change a number (not the protocol, logger, cluster or hydra keys)."""
    return " ".join(o for o in overrides if not o.lstrip("+~").startswith(_NOT_ARM)) or "(defaults)"


def _refuse(problem: str, fix: str) -> None:
    print(f"peft_lab: error: {problem}\nFix: {fix}. Nothing was launched.", file=sys.stderr, flush=True)
    sys.exit(2)


def expand(parsed: list) -> tuple[list[list[str]], list[str]]:
    """Hydra ``Override`` objects -> (arms as override lists, the seed values as strings).

    Cartesian product in command-line order, as ``BasicSweeper.split_arguments`` does, with ``seed``
    taken out. Refuses (exit 2) a ``method.lr`` on the command line: the protocol chooses it.
    """
    axes: OrderedDict[str, list[str]] = OrderedDict()
    seeds: list[str] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override() and not o.is_discrete_sweep():
            _refuse(f"{key}: the select_lr protocol expands only lists (a,b,c), not {o.value_type.name}",
                    f"write {key} as a comma-separated list")  # fmt: skip
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        if key.lstrip("+~") == LR_KEY:
            _refuse(
                f"{LR_KEY} is set on the command line, but +protocol=select_lr chooses it from method.lr_grid",
                "drop method.lr=...; to try other learning rates, set method.lr_grid=[...]",
            )
        if key == SEED_KEY:
            seeds = values
            continue
        axes[key] = [f"{key}={v}" for v in values]
    arms = [list(x) for x in itertools.product(*axes.values())] if axes else [[]]
    return arms, seeds


def plan_arms(sweeper: Any, arms: list[list[str]]) -> list[Arm]:
    """Compose each arm's config (as its cells will be composed) to read its grid, metric and task.
    Refuses (exit 2) an arm whose config does not compose or whose method has no ``lr_grid``."""
    from peft_lab import data, models
    from peft_lab.errors import UserError
    from peft_lab.methods import get_method_class
    from peft_lab.run import main_metric_name

    planned = []
    for overrides in arms:
        try:
            cfg = sweeper.hydra_context.config_loader.load_sweep_config(sweeper.config, list(overrides))
        except Exception as err:
            _refuse(f"the arm '{' '.join(overrides)}' does not compose: {err}".replace("\n", " "),
                    "fix that override")  # fmt: skip
        where = f"arm '{arm_name(overrides)}'"
        try:  # the cells' own start-up checks, once per arm, before anything is launched
            data.check_config(cfg.dataset)
            models.check_config(cfg.model)
            task = models.resolve_task(cfg.model, plain(cfg.dataset.task))
            method = get_method_class(str(cfg.method.name))(cfg.method, cfg.model, task)
            method.validate()
        except UserError as err:
            problem, _, fix = str(err).partition(" Fix: ")
            _refuse(f"{where}: {problem}", fix.rstrip(".") or "fix that override")
        grid = [float(x) for x in (cfg.method.get("lr_grid") or [])]
        if not method.trains():
            grid = [float(cfg.method.lr)]  # nothing trains: the lr changes nothing
        if not grid:
            _refuse(
                f"{where}: method '{cfg.method.name}' has an empty method.lr_grid", "set method.lr_grid=[...] for it"
            )
        if len(set(grid)) < len(grid) or any(not lr > 0 for lr in grid):
            _refuse(f"{where}: method.lr_grid={grid} must list distinct positive learning rates",
                    "list each learning rate once, each > 0")  # fmt: skip
        metric = main_metric_name(cfg.dataset, task)
        planned.append(Arm(list(overrides), str(cfg.method.name), str(cfg.dataset.name), metric,
                           "perplexity" in metric, grid, trains=method.trains()))  # fmt: skip
    return planned


def choose(arm: Arm, sweep_dir: Path) -> None:
    """Read each stage-1 run's record and set ``arm.chosen_lr`` (or ``arm.problem``)."""
    missing = []
    for entry in arm.stage1:
        rec = rf.read_record(sweep_dir / entry["run_dir"])
        entry["status"] = rec.status.value if rec else Status.pending.value
        entry["failure"] = rec.failure if rec else None
        entry["select"] = rec.select_value if rec else None
        if entry["select"] is None and entry["failure"] != "diverged":
            missing.append(
                f"lr {entry['lr']:g}: {entry['status']}" + (f" ({entry['failure']})" if entry["failure"] else "")
            )
    scored = [e for e in arm.stage1 if e["select"] is not None]
    if missing:
        arm.problem = f"stage 1 is incomplete ({'; '.join(missing)}): no lr chosen"
        return
    if not scored:
        arm.problem = "every lr of the grid diverged: no lr chosen (lower method.lr_grid)"
        return
    sign = 1 if arm.lower_is_better else -1
    best = min(scored, key=lambda e: sign * e["select"])  # min keeps the first of equals: grid order
    arm.chosen_lr = best["lr"]
    arm.flat = len(scored) > 1 and len({e["select"] for e in scored}) == 1
    ordered = sorted(arm.grid)
    arm.at_edge = not arm.flat and len(ordered) > 1 and arm.chosen_lr in (ordered[0], ordered[-1])


def write(sweep_dir: Path, arms: list[Arm], seeds: list[str], stage: str) -> None:
    rf.write_protocol(
        sweep_dir,
        {
            "protocol": PROTOCOL,
            "stage": stage,
            "seeds": seeds,
            "arms": [
                {
                    "arm": a.name,
                    "overrides": a.overrides,
                    "method": a.method,
                    "dataset": a.dataset,
                    "metric": a.metric,
                    "lower_is_better": a.lower_is_better,
                    "grid": a.grid,
                    "stage1": a.stage1,
                    "chosen_lr": a.chosen_lr,
                    "at_edge": a.at_edge,
                    "flat": a.flat,
                    "trains": a.trains,
                    "problem": a.problem,
                    "stage2": a.stage2,
                }
                for a in arms
            ],
        },
    )


def _names(returns: list) -> list[str]:
    return [Path(r.working_dir).name for r in returns]


def sweep(sweeper: Any, arguments: list[str]) -> list:
    """The two stages; returns Hydra's JobReturns of both. Exits 1 when an arm got no lr or a stage-2
    run did not complete, naming them (a re-run finishes only what is missing)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config = sweeper.config
    sweep_dir = Path(str(config.hydra.sweep.dir))
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    arm_overrides, seeds = expand(parser.parse_overrides(list(arguments)))
    seeds = seeds or [str(config.seed)]
    arms = plan_arms(sweeper, arm_overrides)  # refuses (exit 2) before anything is written
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / rf.MULTIRUN_YAML)
    sweeper.launcher.driven_by_sweeper = True  # a diverged lr is a stage-1 result, not the sweep's end

    stage1 = [(a, lr) for a in arms for lr in a.grid]
    log.info(
        f"select_lr protocol: {len(arms)} arm(s) x their lr grids = {len(stage1)} stage-1 runs (seed {seeds[0]}, "
        f"selection split), then each arm's best lr x {len(seeds)} seed(s) (test split)"
    )
    write(sweep_dir, arms, seeds, "1")
    returns1 = sweeper.launcher.launch([a.cell(lr, seeds[0]) for a, lr in stage1], initial_job_idx=0)
    summary1 = _read_summary(sweep_dir)
    for (arm, lr), name in zip(stage1, _names(returns1)):
        arm.stage1.append({"lr": lr, "run_dir": name})
    for arm in arms:
        choose(arm, sweep_dir)
        if arm.chosen_lr is not None:
            edge = " (at the grid's edge: widen method.lr_grid)" if arm.at_edge else ""
            if arm.flat:
                edge = " (every lr scored the same on the selection split: the grid told nothing; the first is taken)"
            log.info(f"{arm.name}: chosen {LR_KEY}={arm.chosen_lr:g}{edge}")
        else:
            log.warning(f"{arm.name}: {arm.problem}")
    write(sweep_dir, arms, seeds, "2")

    ready = [a for a in arms if a.chosen_lr is not None]
    stage2 = [(a, s) for a in ready for s in seeds]
    returns2 = []
    if stage2:
        returns2 = sweeper.launcher.launch([a.cell(a.chosen_lr, s) for a, s in stage2], initial_job_idx=len(stage1))
        for (arm, _), name in zip(stage2, _names(returns2)):
            arm.stage2.append(name)
    write(sweep_dir, arms, seeds, "done")
    _join_summaries(sweep_dir, summary1, _read_summary(sweep_dir) if stage2 else None)
    _report(sweep_dir)

    from hydra.core.utils import JobStatus

    bad = [f"{a.name}: {a.problem}" for a in arms if a.problem]
    bad += [f"{' '.join(r.overrides)}: stage 2 did not complete" for r in returns2 if r.status != JobStatus.COMPLETED]
    if bad:
        print(
            "peft_lab: the select_lr protocol did not finish:\n  " + "\n  ".join(bad)
            + f"\nRe-run the same command with hydra.sweep.dir={sweep_dir} to finish only what is missing.",
            file=sys.stderr,
            flush=True,
        )  # fmt: skip
        sys.exit(1)
    return [returns1, returns2]


def _read_summary(sweep_dir: Path) -> tuple[str, str]:
    """The launcher's summary.md / summary.csv of the stage that just ran (each launch rewrites them)."""
    return tuple(
        (sweep_dir / name).read_text() if (sweep_dir / name).exists() else ""
        for name in (rf.SUMMARY_MD, rf.SUMMARY_CSV)
    )


def _join_summaries(sweep_dir: Path, stage1: tuple[str, str], stage2: Optional[tuple[str, str]]) -> None:
    """summary.md / summary.csv of both stages (a ``stage`` column in the CSV), not only the last launch's."""
    md = "# Stage 1: each lr of each grid, first seed\n\n" + stage1[0].lstrip("# ")
    md += "\n# Stage 2: the chosen lr, every seed\n\n" + (stage2[0].lstrip("# ") if stage2 else "nothing to run\n")
    rf.write_atomic(sweep_dir / rf.SUMMARY_MD, md)
    lines = []
    for stage, text in (("1", stage1[1]), ("2", stage2[1] if stage2 else "")):
        rows = text.splitlines()
        if rows and not lines:
            lines.append("stage," + rows[0])
        lines += [f"{stage},{row}" for row in rows[1:]]
    rf.write_atomic(sweep_dir / rf.SUMMARY_CSV, "\n".join(lines) + "\n")


def _report(sweep_dir: Path) -> None:
    from peft_lab.sweep import write_report

    write_report(sweep_dir)
