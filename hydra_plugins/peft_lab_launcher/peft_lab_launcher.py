"""Hydra launcher plugin: each cell of a sweep in its own process (cluster=local).

Hydra only instantiates launchers that live in the ``hydra_plugins`` package; the
logic is in ``peft_lab.sweep``. Plugin discovery imports this module, so it stays
light (no torch).
"""

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher


@dataclass
class PeftLabLocalConf:
    _target_: str = "hydra_plugins.peft_lab_launcher.peft_lab_launcher.LocalCellLauncher"
    parallel: Optional[int] = None  # null: cluster.parallel


ConfigStore.instance().store(group="hydra/launcher", name="peft_lab_local", node=PeftLabLocalConf, provider="peft_lab")


class LocalCellLauncher(Launcher):
    def __init__(self, parallel: Optional[int] = None) -> None:
        self.parallel = parallel
        self.config = self.task_function = self.hydra_context = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from peft_lab.sweep import launch_local

        return launch_local(self, job_overrides, initial_job_idx)
