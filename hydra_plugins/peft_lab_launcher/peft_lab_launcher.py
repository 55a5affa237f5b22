"""Hydra plugins: the launchers (each sweep cell in its own process with cluster=local, or a SLURM array task
with cluster=slurm) and the select_lr sweeper (``+protocol=select_lr``: learning rate chosen per method).

Hydra only instantiates plugins that live in the ``hydra_plugins`` package; the
logic is in ``peft_lab.sweep`` and ``peft_lab.protocol``. Plugin discovery imports this module, so it stays
light (no torch, no submitit: hydra-submitit-launcher imports submitit lazily too).
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher
from hydra_plugins.hydra_submitit_launcher import config as submitit_config
from hydra_plugins.hydra_submitit_launcher import submitit_launcher


@dataclass
class PeftLabLocalConf:
    _target_: str = "hydra_plugins.peft_lab_launcher.peft_lab_launcher.LocalCellLauncher"
    parallel: Optional[int] = None  # null: cluster.parallel


@dataclass
class PeftLabSlurmConf(submitit_config.SlurmQueueConf):
    """hydra-submitit-launcher 1.2.0's SLURM schema (no ``srun_args``: use ``additional_parameters``)."""

    _target_: str = "hydra_plugins.peft_lab_launcher.peft_lab_launcher.SlurmCellLauncher"
    max_num_timeout: int = 3  # runs resume from their checkpoint, so a timed-out task may be requeued
    # tasks per array job (a sweep with more cells goes out as several arrays); null: the cluster's MaxArraySize
    # (`scontrol show config`; an array holds MaxArraySize tasks, indices 0..MaxArraySize-1). Not an sbatch option.
    max_array_size: Optional[int] = None


@dataclass
class SelectLrSweeperConf:
    """``+protocol=select_lr`` (conf/protocol/select_lr.yaml) selects this sweeper; it has no options of its own."""

    _target_: str = "hydra_plugins.peft_lab_launcher.peft_lab_launcher.SelectLrSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


cs = ConfigStore.instance()
cs.store(group="hydra/launcher", name="peft_lab_local", node=PeftLabLocalConf, provider="peft_lab")
cs.store(group="hydra/launcher", name="peft_lab_slurm", node=PeftLabSlurmConf, provider="peft_lab")
cs.store(group="hydra/sweeper", name="peft_lab_select_lr", node=SelectLrSweeperConf, provider="peft_lab")


class SelectLrSweeper(BasicSweeper):
    """Stage 1: every lr of each method's ``method.lr_grid`` with the first seed, scored on the selection
    split; stage 2: each method's best lr with every seed. Both stages go through the configured launcher
    (local or SLURM). Hydra's ``BasicSweeper`` supplies ``setup`` (the launcher); ``peft_lab.protocol`` the rest."""

    def sweep(self, arguments: List[str]) -> Any:
        from peft_lab.protocol import sweep

        return sweep(self, list(self._parse_config()) + list(arguments))


class LocalCellLauncher(Launcher):
    def __init__(self, parallel: Optional[int] = None) -> None:
        self.parallel = parallel
        self.config = self.task_function = self.hydra_context = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from peft_lab.sweep import launch_local

        return launch_local(self, job_overrides, initial_job_idx)


class SlurmCellLauncher(submitit_launcher.SlurmLauncher):
    """The grid as one array job (several past ``max_array_size``); completed cells skipped; failures
    collected, never raised.

    ``__call__`` is what each array task runs (and what submitit's ``checkpoint`` resubmits
    after a preemption or timeout); ``launch`` runs in the submitting process. A cell of several
    processes (``nodes`` x ``tasks_per_node`` > 1) runs ``__call__`` in each of them, one rank each
    (``peft_lab.sweep.torch_distributed_env``); only rank 0 writes ``.hydra/``.

    Hydra's plugin scan re-executes this module inside a task after the task has unpickled
    its launcher, so the class object of ``self`` is no longer the module's: no ``super()``
    here, and ``checkpoint`` rebuilds the launcher from the module's current class so the
    requeued call is pickled by reference (not as a copy of the class's code).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from peft_lab.sweep import run_slurm_task

        return run_slurm_task(lambda: _run_cell(self, *args, **kwargs))

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import sys

        import submitit

        cls = getattr(sys.modules[__name__], type(self).__name__)
        fresh = cls.__new__(cls)
        fresh.__dict__.update(self.__dict__)
        return submitit.helpers.DelayedSubmission(fresh, *args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from peft_lab.sweep import launch_slurm

        return launch_slurm(self, job_overrides, initial_job_idx)


def _run_cell(
    launcher: Any, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str, singleton_state: Any
) -> Any:
    """``BaseSubmititLauncher.__call__`` (hydra-submitit-launcher 1.2.0), except that a rank other than 0 of a
    multi-process cell does not write the run dir's ``.hydra/`` (rank 0 does; as ``peft_lab.cell`` does locally)."""
    import os

    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals
    from omegaconf import open_dict

    Singleton.set_state(singleton_state)
    setup_globals()
    sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, sweep_overrides)
    with open_dict(sweep_config.hydra.job) as job:
        job.id = submitit.JobEnvironment().job_id
        sweep_config.hydra.job.num = job_num
    if int(os.environ.get("RANK") or 0) > 0:
        with open_dict(sweep_config.hydra):
            sweep_config.hydra.output_subdir = None
    return run_job(
        hydra_context=launcher.hydra_context,
        task_function=launcher.task_function,
        config=sweep_config,
        job_dir_key=job_dir_key,
        job_subdir_key="hydra.sweep.subdir",
    )
