"""The SLURM launcher's plan without a cluster: the array limit (MaxArraySize), the split of a sweep into
array jobs, the executor's parameters and how a multi-process task's outcome is read.

The same code against a real SLURM is in test_slurm.py (marker ``slurm``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import train_cli

from peft_lab import sweep

SCONTROL = """Configuration data as of 2026-11-30T19:31:05
AccountingStorageType   = accounting_storage/slurmdbd
MailProg                = /bin/mail
MaxArraySize            = {size}
MaxBatchRequeue         = 5
MaxJobCount             = 50000

Slurmctld(primary) at vm is UP
"""


def test_max_array_size_read_from_scontrol_show_config(caplog):
    assert sweep.parse_max_array_size(SCONTROL.format(size=10001)) == 10001
    assert sweep.parse_max_array_size("MaxArraySizeX = 3\nMaxJobCount = 5\n") is None
    assert sweep.max_array_tasks(SCONTROL.format(size=1001)) == 1001  # indices 0..1000: 1001 tasks
    with caplog.at_level(logging.WARNING, logger="peft_lab.sweep"):
        assert sweep.max_array_tasks(SCONTROL.format(size=0)) == 1  # arrays disabled: one job per cell
        assert "job arrays are disabled" in caplog.text
        caplog.clear()
        assert sweep.max_array_tasks("slurm_load_ctl_conf error\n") == sweep.SLURM_DEFAULT_MAX_ARRAY_SIZE == 1001
        assert "could not read MaxArraySize" in caplog.text and "cluster.max_array_size" in caplog.text


def test_max_array_size_without_scontrol_falls_back_to_the_default(monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")
    with caplog.at_level(logging.WARNING, logger="peft_lab.sweep"):
        assert sweep.max_array_tasks() == 1001
    assert "FileNotFoundError" in caplog.text


def test_cells_split_into_arrays_of_at_most_the_limit():
    assert sweep.split_chunks(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert [len(c) for c in sweep.split_chunks(range(1002), 1001)] == [501, 501]  # not 1001 + 1
    assert sweep.split_chunks(list("abc"), 1001) == [["a", "b", "c"]]
    assert sweep.split_chunks([], 5) == []
    for n in range(1, 40):
        for limit in range(1, 12):
            chunks = sweep.split_chunks(list(range(n)), limit)
            sizes = [len(c) for c in chunks]
            assert [x for c in chunks for x in c] == list(range(n))  # every cell once, in order
            assert len(chunks) == -(-n // limit) and max(sizes) <= limit and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        sweep.split_chunks([1], 0)
    # array_parallelism shared between the arrays: the sweep's total stays the configured one
    assert sweep.split_sizes(256, 3) == [86, 85, 85] and sweep.split_sizes(2, 3) == [1, 1, 1]


def test_max_array_size_below_one_is_refused_before_anything_runs(tmp_path, cli_env):
    """cluster.max_array_size=0: exit 2 with a peft_lab error, no sweep dir written, nothing submitted
    (this test needs no SLURM: the check comes first)."""
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "cluster=slurm", "experiment=smoke", "logger=none", "seed=0,1", "cluster.max_array_size=0",
            f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    proc = train_cli(args, tmp_path, cli_env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "peft_lab: error: cluster.max_array_size=0" in proc.stderr and "Nothing was submitted" in proc.stderr
    assert not (sweep_dir / ".cells").exists() and not (sweep_dir / ".submitit").exists()
    for bad in (-3, True, "2"):
        with pytest.raises(SystemExit) as stop:
            sweep._configured_max_array_size({"max_array_size": bad})
        assert stop.value.code == 2
    assert sweep._configured_max_array_size({"max_array_size": None}) is None
    assert sweep._configured_max_array_size({"max_array_size": 7}) == 7


def _params(tmp_path: Path, **over) -> dict:
    """The launcher params Hydra passes (conf/cluster/slurm.yaml through PeftLabSlurmConf)."""
    params = dict(submitit_folder=str(tmp_path / ".submitit" / "%j"), timeout_min=60, cpus_per_task=None,
                  gpus_per_node=None, tasks_per_node=1, mem_gb=None, nodes=1, name="train", stderr_to_stdout=False,
                  partition="debug", qos=None, comment=None, constraint=None, exclude=None, gres=None,
                  cpus_per_gpu=None, gpus_per_task=None, mem_per_gpu=None, mem_per_cpu=None, account=None,
                  signal_delay_s=120, max_num_timeout=3, additional_parameters={"requeue": True},
                  array_parallelism=256, setup=["module load x"], max_array_size=2)  # fmt: skip
    params.update(over)
    return params


def test_executor_gets_no_max_array_size(tmp_path):
    """max_array_size is peft_lab's, not an sbatch option (submitit would refuse an unknown parameter)."""
    text = sweep._slurm_executor(_params(tmp_path))._executor._make_submission_file_text("python -m x", "uid")
    assert "max-array-size" not in text and "max_array_size" not in text
    assert "#SBATCH --partition=debug" in text and "module load x" in text and "SLURM_KILL_BAD_EXIT" not in text


def test_multi_process_cells_kill_on_bad_exit(tmp_path):
    two = sweep._slurm_executor(_params(tmp_path, tasks_per_node=2, cpus_per_task=1))
    text = two._executor._make_submission_file_text("python -m x", "uid")
    assert "#SBATCH --ntasks-per-node=2" in text
    lines = text.splitlines()
    assert lines.index("export SLURM_KILL_BAD_EXIT=1") < lines.index("module load x")  # the user's setup may undo it


class _Task:
    """A finished submitit task: ``result()`` returns or raises; its result file written at ``written``."""

    def __init__(self, folder: Path, name: str, outcome, written: float | None = None) -> None:
        self.outcome = outcome
        path = folder / f"{name}_result.pkl"
        if written is not None:
            path.write_bytes(b"x")
            os.utime(path, (written, written))
        self.paths = SimpleNamespace(result_pickle=path, stderr=folder / f"{name}_log.err")

    def result(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class _Job:
    def __init__(self, tasks: list) -> None:
        self.tasks = tasks
        self.num_tasks = len(tasks)

    def task(self, rank: int) -> _Task:
        return self.tasks[rank]


def test_multi_process_task_reports_the_rank_that_failed_first(tmp_path):
    """Rank 1 raised; srun then killed rank 0 (no result file): the cell's error is rank 1's, not
    'rank 0 has not produced any output' (what submitit's results()/exception() would give: the lowest rank)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from peft_lab.runfiles import Status

    trace = "Traceback (most recent call last):\n  File x\npeft_lab.errors.UserError: rank one broke. Fix: x\n"
    killed = UncompletedJobError("Job 7_3 (task: 0) with path /x\nhas not produced any output (state: FAILED)")
    job = _Job([_Task(tmp_path, "7_3_0", killed), _Task(tmp_path, "7_3_1", FailedJobError(trace), written=100.0)])
    err, rank = sweep._job_outcome(job)
    assert rank == 1 and sweep._short_error(err) == "rank 1: UserError: rank one broke. Fix: x"

    # both raised (rank 0 by a consequence of rank 1's failure): the earlier result file wins
    late = FailedJobError("Traceback (most recent call last):\nRuntimeError: Connection closed by peer\n")
    job = _Job([_Task(tmp_path, "8_0", late, written=200.0), _Task(tmp_path, "8_1", FailedJobError(trace), 100.0)])
    assert sweep._job_outcome(job)[1] == 1

    ok = SimpleNamespace(status=SimpleNamespace(name="COMPLETED"))
    assert sweep._job_outcome(_Job([_Task(tmp_path, "9_0", ok, 1.0), _Task(tmp_path, "9_1", ok, 1.0)])) == (None, None)
    # one process: the error as it was, no rank in front
    err, rank = sweep._job_outcome(_Job([_Task(tmp_path, "10_0", FailedJobError(trace), 1.0)]))
    assert rank == 0 and sweep._short_error(err) == "UserError: rank one broke. Fix: x"

    # _wait_slurm points the cell's log at the failing rank's
    cell = sweep.Cell(0, ["seed=0"], run_dir=tmp_path / "seed=0", job_id="7_3", log_path=tmp_path / "7_3_0_log.err")
    job = _Job([_Task(tmp_path, "7_3_0", killed), _Task(tmp_path, "7_3_1", FailedJobError(trace), written=100.0)])
    job.done = lambda: True
    sweep._wait_slurm([(cell, job)], poll_s=0.01)
    assert cell.status == Status.failed and cell.error.startswith("rank 1: UserError")
    assert cell.log_path == tmp_path / "7_3_1_log.err"


def test_one_process_task_drops_a_torch_distributed_environment_from_the_submitting_shell(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert sweep.torch_distributed_env() is None
    assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ
    assert "removed RANK, WORLD_SIZE" in capsys.readouterr().err
