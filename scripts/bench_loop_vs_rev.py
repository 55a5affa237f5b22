"""Is this commit's training loop slower than another revision's? A paired, interleaved timing.

    python scripts/bench_loop_vs_rev.py --rev HEAD~1 [--model smollm2-135m-shape] [--repeats 5]

Loads ``peft_lab/training.py`` as it is at ``--rev`` (``git show``) next to the current one and
times both on the same model, method and batches (``peft_lab.bench.Framework``: the composed
config, the method class, the real loop), in interleaved blocks of ``--warmup`` + ``--steps``
steps, alternating which goes first. Prints each block pair's ratio (current / rev) and their
median: > 1 means the current loop is slower. One process, so both loops share the machine state.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_rev(rev: str):
    """The module ``peft_lab/training.py`` of revision ``rev``, imported under another name."""
    text = subprocess.run(["git", "show", f"{rev}:peft_lab/training.py"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "training_rev.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("peft_lab.training_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", default="HEAD~1")
    p.add_argument("--model", default="smollm2-135m-shape")
    p.add_argument("--method", default="lora")
    p.add_argument("--task", default="classification")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    args = p.parse_args()

    import torch

    from peft_lab import bench, training

    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(model=args.model, task=args.task, batch=args.batch, seq=args.seq, steps=args.steps,
                            warmup=args.warmup, precision=args.precision, device="cpu")  # fmt: skip
    old = load_rev(args.rev)
    runner = bench.Framework(args.method, args.method, [], ns, "cpu")

    def block(module) -> float:
        result = module.train(runner.model, runner.method, runner.examples, cfg=runner.cfg, task=runner.task,
                              tokenizer=runner.tokenizer, device="cpu", autocast=runner.autocast, run_dir=runner.tmp,
                              on_log=lambda *a: None, on_eval=lambda s: None)  # fmt: skip
        return statistics.median(result.step_times[args.warmup :])

    ratios = []
    for rep in range(args.repeats):
        pair = [("current", training), (args.rev, old)]
        times = {}
        for name, module in pair if rep % 2 == 0 else pair[::-1]:
            times[name] = block(module)
        ratios.append(times["current"] / times[args.rev])
        print(f"block {rep + 1}: current {times['current'] * 1e3:.0f} ms/step, {args.rev} "
              f"{times[args.rev] * 1e3:.0f} ms/step, ratio {ratios[-1]:.3f}", flush=True)  # fmt: skip
    print(f"median step-time ratio current / {args.rev}: {statistics.median(ratios):.3f} "
          f"(pairs {min(ratios):.3f}-{max(ratios):.3f}; > 1: the current loop is slower)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
