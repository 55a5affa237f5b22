"""python -m peft_lab.bench on the tiny model: every method and the bare loop measured, interleaved,
with ratios against LoRA and a JSON file. Figures are printed, never asserted against a clock."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# every layer sparse, every token context: exactly 75 % of the MLP work skipped
VARIANT = "sparselora:" + ";".join(
    ["method.mlp_sparsity=0.75", "method.dense_first_layers=0", "method.dense_last_layers=0",
     "method.dense_output_tokens=false", "method.warmup_frac=0"]
)  # fmt: skip


def test_bench_measures_each_method_and_the_bare_loop(cli_env, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--model", "tiny", "--methods", "lora,hira," + VARIANT,
            "--steps", "2", "--warmup", "1", "--repeats", "2", "--threads", "1", "--seq", "32",
            "--no-memory", "--no-startup", "--out", str(out)]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "peft_lab.bench", *args], cwd=tmp_path, env=cli_env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    res = data["results"]
    variant = VARIANT
    assert list(res) == ["lora", "bare-lora", "hira", variant]  # bare right after LoRA: paired back to back
    for label, r in res.items():
        assert len(r["block_medians_s"]) == 2 and r["step_s"] > 0 and r["tokens_per_s"] > 0, label
        assert 0 < r["trainable_params"] < r["total_params"] and r["footprint_mib"] > 0
    # the variant's overrides reached the method: 75 % of the MLP work skipped in every layer but the last
    assert res[variant]["overrides"][0] == "method.mlp_sparsity=0.75"
    assert res[variant]["method_metrics"]["sparselora_mlp_flops_skipped"] == pytest.approx(0.75)
    # the printed table: one row per method, ratios against LoRA
    assert "| lora |" in proc.stdout and "| bare-lora |" in proc.stdout and "1.00×" in proc.stdout
    names = [t["target"] for t in data["targets"]]
    assert "framework LoRA steps/s vs bare loop" in names and "HiRA step time vs LoRA" in names
    assert data["machine"]["torch_threads"] == 1 and data["settings"]["batch"] == 4
