"""Data parallelism for one cell: several processes (ranks), one global batch, rank 0 writes.

The processes are started by ``torchrun``-style launchers that set the standard
``torch.distributed`` environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``. peft_lab's local launcher sets them for ``cluster.nproc_per_cell=N``; on SLURM,
``submitit.helpers.TorchDistributedEnvironment().export()`` sets them in each task of a
``cluster.tasks_per_node=N`` job. One process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) is the
plain single-device path: every function here is then a no-op.

What is shared and how (``peft_lab.training``):

- every rank builds the same model (same seed) and rank 0's trainable weights are broadcast once;
- every rank collates each micro-batch of the global batch in the same order and keeps its own
  rows (``shard``), so the data order and the global batch are those of one process;
- gradients are summed over ranks once per optimizer step (one ``all_reduce`` of a flat buffer of
  the trainable gradients), each rank's loss already being weighted by its share of the global
  batch: the step is the one-process step up to floating-point reduction order;
- evaluation batches are dealt out whole and the rows gathered on every rank.

``torch.distributed`` is the engine (gloo on CPU, NCCL on CUDA). DistributedDataParallel is not
used: it averages gradients per backward (we need a sum of weighted shares, once per accumulated
step) and requires every rank to run the same backward passes, while a rank whose share of a
micro-batch has nothing to predict must skip its backward. See README, "Design notes".
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

# the torch.distributed environment of a rank (torchrun's names); launchers set it, and clear it for one process
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
REQUIRED_KEYS = ("RANK", "MASTER_ADDR", "MASTER_PORT")  # with WORLD_SIZE > 1


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` in 0..``size``-1, ``local_rank`` on its node (its CUDA device)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes metrics.json, checkpoints, the adapter and the W&B run."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(env: Optional[dict] = None) -> World:
    """The ``World`` that ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` describe (no torch import).

    Raises ValueError when they are inconsistent (a rank outside 0..WORLD_SIZE-1, MASTER_ADDR or
    MASTER_PORT missing with WORLD_SIZE > 1): a half-set environment must not train as one process."""
    env = os.environ if env is None else env
    try:
        size = int(env.get("WORLD_SIZE") or 1)
        if size <= 1:
            return World()
        rank = int(env.get("RANK", -1))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(
            f"WORLD_SIZE={env.get('WORLD_SIZE')!r} RANK={env.get('RANK')!r} LOCAL_RANK={env.get('LOCAL_RANK')!r}: "
            "not integers; unset them for one process, or start the ranks with torchrun or cluster.nproc_per_cell"
        ) from None
    missing = [k for k in REQUIRED_KEYS if not env.get(k)]
    if missing or not 0 <= rank < size:
        raise ValueError(
            f"WORLD_SIZE={size} but the torch.distributed environment is incomplete "
            f"(RANK={env.get('RANK')}, missing {missing or 'nothing'}): start the ranks with torchrun, "
            "cluster.nproc_per_cell or cluster.tasks_per_node, or unset WORLD_SIZE for one process"
        )
    return World(rank, size, local)


_WORLD = World()

# rank -> argv that runs this same cell as that rank (set by the entry point: ``peft_lab.cell`` or ``run.main``);
# ``cluster.nproc_per_cell`` > 1 needs it
rank_command: Optional[Any] = None


def current() -> World:
    """The world set by ``init`` (one process until then)."""
    return _WORLD


def init(device: str, timeout_s: float = 600.0) -> World:
    """Join the process group of this cell (gloo on CPU, NCCL on CUDA) when ``WORLD_SIZE`` > 1.

    ``device`` is the resolved device of this rank (``cpu`` or ``cuda:<local rank>``). Idempotent.
    Returns the World; raises ValueError on an incomplete environment."""
    global _WORLD
    world = world_from_env()
    if not world.distributed:
        _WORLD = world
        return world
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _WORLD = world
    return world


def shutdown() -> None:
    """Leave the process group (end of a run); the world is one process again."""
    global _WORLD
    if _WORLD.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _WORLD = World()


def barrier() -> None:
    if _WORLD.distributed:
        import torch.distributed as dist

        dist.barrier()


def shard(n: int, world: Optional[World] = None) -> list[int]:
    """The rows of an ``n``-row micro-batch this rank computes: contiguous blocks, the first ``n % size``
    ranks one row more (``[0..n)`` on one process; empty when ``n`` < the rank + 1)."""
    world = world or _WORLD
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return list(range(start, start + base + (world.rank < extra)))


def all_reduce_sum(tensor: Any) -> Any:
    """Sum ``tensor`` over ranks, in place; returns it (unchanged on one process)."""
    if _WORLD.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_gradients(params: list) -> None:
    """Sum the gradients of ``params`` over ranks, in place, with one all_reduce of a flat buffer.

    A parameter without a gradient on this rank (it computed nothing this step) counts as zeros, and
    gets the summed gradient (or stays None if no rank had one: its ``.grad`` is then set to None)."""
    if not _WORLD.distributed or not params:
        return
    import torch

    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    had = torch.tensor([float(p.grad is not None) for p in params], device=flat.device)
    all_reduce_sum(flat)
    all_reduce_sum(had)
    offset = 0
    for p, seen in zip(params, had.tolist()):
        n = p.numel()
        if seen:
            part = flat[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)
        else:
            p.grad = None
        offset += n


def broadcast_parameters(params: list) -> None:
    """Rank 0's values of ``params`` on every rank (the adapters start identical whatever each rank drew)."""
    if not _WORLD.distributed:
        return
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


def gather_objects(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` on one process)."""
    if not _WORLD.distributed:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * _WORLD.size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- local ranks


def free_port() -> int:
    """A TCP port free on this host now (the rendezvous of one cell's ranks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRanks:
    """Ranks 1..N-1 of a cell on this machine (``cluster.nproc_per_cell=N``), started by rank 0.

    The process that runs the cell becomes rank 0: it sets the ``torch.distributed`` environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``) in
    its own ``os.environ`` and starts ``command(rank)`` for every other rank with the same variables,
    as ``torchrun --standalone`` would. Each rank uses CUDA device ``LOCAL_RANK`` of those visible.

    A rank that dies fails the cell: a watcher thread in rank 0 waits ``grace_s`` for rank 0 to fail
    by itself (a collective with a dead peer raises), then calls ``on_lost(message)`` and ends rank 0
    with exit code 1 (a rendezvous or a collective may otherwise wait for its timeout). The other
    ranks watch rank 0 (``peft_lab.cell.watch_launcher``) and stop when it is gone.
    """

    def __init__(self, nproc: int, command: Any, on_lost: Any = None, grace_s: float = 20.0) -> None:
        import subprocess
        import threading

        self.port = free_port()
        env = {"WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.port)}
        os.environ.update(env, RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(nproc))
        from peft_lab.runfiles import LAUNCHER_PID_ENV

        self.procs = []
        for rank in range(1, nproc):
            rank_env = dict(os.environ, **env, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
            rank_env[LAUNCHER_PID_ENV] = str(os.getpid())
            self.procs.append(subprocess.Popen(command(rank), env=rank_env))
        self.finished = threading.Event()
        self.on_lost, self.grace_s = on_lost, grace_s
        threading.Thread(target=self._watch, name="peft_lab-ranks-watch", daemon=True).start()

    def _watch(self) -> None:
        import sys
        import time

        while not self.finished.is_set():
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code not in (None, 0):
                    if self.finished.wait(self.grace_s):
                        return
                    message = f"rank {rank} of {len(self.procs) + 1} exited with code {code} (see its lines in the log)"
                    print(f"peft_lab: error: {message}; stopping the cell", file=sys.stderr, flush=True)
                    if self.on_lost is not None:
                        try:
                            self.on_lost(message)
                        except Exception:  # noqa: BLE001  (the exit below must happen)
                            pass
                    self.stop(wait_s=5.0)
                    os._exit(1)
            time.sleep(0.5)

    def dead(self, wait_s: float = 0.0) -> list[str]:
        """The ranks that have ended with an error, e.g. ``["rank 1 of 2 exited with code -9"]``, waiting up to
        ``wait_s`` for one (a peer's socket can close a moment before its process is gone)."""
        import time

        deadline = time.monotonic() + wait_s
        while True:
            dead = [f"rank {r} of {len(self.procs) + 1} exited with code {p.poll()}"
                    for r, p in enumerate(self.procs, start=1) if p.poll() not in (None, 0)]  # fmt: skip
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.1)

    def stop(self, wait_s: float = 60.0) -> list:
        """Rank 0 is done (or failing): wait up to ``wait_s`` for the other ranks, then SIGTERM, then SIGKILL;
        returns their exit codes. Called by rank 0 in every case."""
        import signal
        import time

        self.finished.set()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.2)
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.procs if p.poll() is None]
            for p in alive:
                try:
                    p.send_signal(sig)
                except OSError:
                    pass
            end = time.monotonic() + wait
            while time.monotonic() < end and any(p.poll() is None for p in alive):
                time.sleep(0.2)
        for key in ENV_KEYS:
            os.environ.pop(key, None)
        return [p.poll() for p in self.procs]
