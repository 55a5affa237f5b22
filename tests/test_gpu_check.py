"""scripts/gpu_check.sh without a GPU: it refuses clearly, reports failures per part, and (slow) its whole
logic runs on CPU with tiny shapes under GPU_CHECK_ALLOW_CPU=1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
SMOKE_METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))  # every shipped method


def bin_dir(tmp_path: Path, tools: list[str], fake_nvidia_smi: bool) -> Path:
    """A PATH of its own: symlinks to ``tools`` and, if asked, an nvidia-smi that lists one GPU."""
    d = tmp_path / "bin"
    d.mkdir()
    for tool in tools:
        (d / tool).symlink_to(shutil.which(tool))
    if fake_nvidia_smi:
        (d / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
        (d / "nvidia-smi").chmod(0o755)
    return d


def gpu_check(tmp_path: Path, env: dict, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [shutil.which("bash"), str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_gpu_check_refuses_without_nvidia_smi(tmp_path):
    env = {"PATH": str(bin_dir(tmp_path, ["dirname"], fake_nvidia_smi=False)), "OUT": str(tmp_path / "out")}
    proc = gpu_check(tmp_path, env)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device visible: nvidia-smi is not on PATH" in proc.stderr
    assert "GPU_CHECK_ALLOW_CPU=1" in proc.stderr and "srun --gres=gpu:1" in proc.stderr  # the fixes, named
    assert not (tmp_path / "out").exists()  # refused before doing anything


def test_gpu_check_refuses_when_torch_sees_no_cuda(tmp_path):
    """nvidia-smi answers, but torch sees no device (a CPU build of torch, or no device given to the job)."""
    env = {
        "PATH": str(bin_dir(tmp_path, ["dirname", "timeout"], fake_nvidia_smi=True)),
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",  # no device for torch, also where there is one
        "OUT": str(tmp_path / "out"),
    }
    proc = gpu_check(tmp_path, env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "CUDA available False" in proc.stdout
    assert "no usable CUDA device for torch" in proc.stderr
    assert "Install a CUDA build of torch" in proc.stderr and "GPU_CHECK_ALLOW_CPU=1" in proc.stderr


def cpu_env(tmp_path: Path, cache_dir: Path, **extra: str) -> dict:
    env = dict(os.environ, GPU_CHECK_ALLOW_CPU="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    env.update(PEFT_LAB_CACHE=str(cache_dir), OMP_NUM_THREADS="1", **extra)
    env.pop("PEFT_LAB_DATA_ROOT", None)
    return env


def test_gpu_check_reports_each_part_that_fails(tmp_path, cache_dir):
    """Every part past its limit (1 s here): the bench and each method's smoke reported as failed, exit 1."""
    env = cpu_env(tmp_path, cache_dir, GPU_CHECK_BENCH_TIMEOUT="1", GPU_CHECK_SMOKE_TIMEOUT="1")
    proc = gpu_check(tmp_path, env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["bench.log", "gpu_check.json", "smoke.log", "summary.txt"]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["ok"] is False and summary["bench"] is None and summary["bench_exit"] == 124
    assert list(summary["smoke"]) == SMOKE_METHODS
    assert all(not s["ok"] and s["exit"] == "124" for s in summary["smoke"].values())
    assert "bench exit 124 (timed out)" in summary["failures"]
    assert f"RESULT: FAIL ({len(SMOKE_METHODS) + 1})" in proc.stdout  # the bench and every smoke
    for m in SMOKE_METHODS:
        assert f"  {m:<12} FAIL" in proc.stdout


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path, cache_dir):
    """The whole script on CPU with tiny shapes (about 2 minutes on 2 cores): the bench's four methods with
    their dtypes, every method's 2-step smoke through train.py, the summary block and its JSON."""
    proc = gpu_check(tmp_path, cpu_env(tmp_path, cache_dir), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.json",
        "bench.log",
        "gpu_check.json",
        "smoke.log",
        "summary.txt",
    ]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["ok"] and summary["cpu_dry_run"] and summary["failures"] == []
    methods = summary["bench"]["methods"]
    assert [m["method"] for m in methods.values()] == ["lora", "qlora", "hira", "sparselora"]
    for m in methods.values():
        assert m["error"] == "" and m["step_s"] > 0 and m["tokens_per_s"] > 0 and m["mfu"] is None
        assert m["compute_dtype"] == "bfloat16" and m["trainable_dtype"] == "float32"
    assert methods["lora"]["weight_dtype"] == "bfloat16" and methods["qlora"]["weight_dtype"] == "4bit-nf4"
    assert summary["bench"]["sparselora_speedup_vs_lora"] > 0
    assert list(summary["smoke"]) == SMOKE_METHODS
    assert all(s["ok"] and s["device"] == "cpu" and s["steps"] == 2 for s in summary["smoke"].values())
    text = (out / "summary.txt").read_text()
    assert text in proc.stdout and "RESULT: PASS" in text
    assert "SparseLoRA speed-up over LoRA (paired, per step)" in text
