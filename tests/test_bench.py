"""python -m peft_lab.bench on the tiny model: every method and the bare loop measured, interleaved,
with ratios against LoRA and a JSON file. Figures are printed, never asserted against a clock."""

from __future__ import annotations

import json
import math
import statistics

import pytest

# every layer sparse, every token context: exactly 75 % of the MLP work skipped
VARIANT = "sparselora:" + ";".join(
    ["method.mlp_sparsity=0-1:0.75", "method.dense_output_tokens=false", "method.warmup_frac=0"]
)  # fmt: skip


def test_bench_measures_each_method_and_the_bare_loop(cache_dir, tmp_path, monkeypatch, capsys):
    from peft_lab import bench

    monkeypatch.setenv("PEFT_LAB_CACHE", str(cache_dir))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    args = ["--model", "tiny", "--methods", "lora,hira," + VARIANT,
            "--steps", "2", "--warmup", "1", "--repeats", "2", "--threads", "1", "--seq", "32",
            "--no-memory", "--no-startup", "--peak-tflops", "0.5", "--out", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    proc = capsys.readouterr()
    data = json.loads(out.read_text())
    res = data["results"]
    variant = VARIANT
    assert list(res) == ["lora", "bare-lora", "hira", variant]  # bare right after LoRA: paired back to back
    batch, seq = data["settings"]["batch"], data["settings"]["seq"]
    assert (batch, seq) == (4, 32)
    for label, r in res.items():
        assert r["error"] == "", (label, r["error"])
        medians = r["block_medians_s"]
        assert len(medians) == 2 and all(math.isfinite(m) and m > 0 for m in medians), (label, medians)
        assert r["step_s"] == statistics.median(medians), label  # the median of the block medians
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] == pytest.approx(batch * seq / r["step_s"]), label
        assert 0 < r["trainable_params"] < r["total_params"] and r["footprint_mib"] > 0
        # fp32 on a CPU by default: the frozen base, the matmuls and the trained weights
        assert (r["weight_dtype"], r["compute_dtype"], r["trainable_dtype"]) == ("float32",) * 3, label
        # MFU = 6 N tokens/s / peak, N the whole model's parameters (frozen base included)
        assert r["mfu"] == pytest.approx(6 * r["total_params"] * r["tokens_per_s"] / 0.5e12), label
    assert data["peak_flops"] == 0.5e12 and data["peak_flops_source"] == "--peak-tflops"
    # the bare loop is a measurement of its own, not a copy of LoRA's
    assert res["bare-lora"]["block_medians_s"] != res["lora"]["block_medians_s"]
    # the variant's overrides reached the method: 75 % of the MLP work skipped in both layers
    assert res[variant]["overrides"][0] == "method.mlp_sparsity=0-1:0.75"
    assert res[variant]["method_metrics"]["sparselora_mlp_flops_skipped"] == pytest.approx(0.75)

    def paired(num: str, den: str) -> float:  # what bench documents: median over repeats of back-to-back ratios
        return statistics.median(a / b for a, b in zip(res[num]["block_medians_s"], res[den]["block_medians_s"]))

    # the printed table: one row per method; its ratios are each method's own blocks over LoRA's own blocks
    assert data["table_markdown"] in proc.out
    rows = {}
    for line in data["table_markdown"].splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    assert list(rows) == list(res)
    for label, cells in rows.items():
        assert cells[1] == f"{1000 * res[label]['step_s']:.0f}", (label, cells)
        assert cells[4] == f"{paired(label, 'lora'):.2f}×", (label, cells[4], paired(label, "lora"))
        assert cells[5] == f"{paired('lora', label):.2f}×", (label, cells[5], paired("lora", label))
        assert cells[9] == f"{100 * res[label]['mfu']:.1f} %", (label, cells[9])
        assert cells[10] == "float32 / float32 / float32", (label, cells[10])
    targets = {t["target"]: t["measured"] for t in data["targets"]}
    assert targets["framework LoRA steps/s vs bare loop"] == pytest.approx(paired("bare-lora", "lora"), rel=1e-12)
    assert targets["HiRA step time vs LoRA"] == pytest.approx(paired("hira", "lora"), rel=1e-12)
    assert data["machine"]["torch_threads"] == 1


def test_bench_bf16_records_the_dtypes_and_no_mfu_without_a_peak(cache_dir, tmp_path, monkeypatch, capsys):
    """--precision bf16 (autocast on a CPU): the frozen base in bf16 (QLoRA's 4-bit, bf16 compute), the
    trained weights fp32, in the framework's methods and in the bare loop alike. No peak on a CPU: no MFU."""
    from peft_lab import bench

    monkeypatch.setenv("PEFT_LAB_CACHE", str(cache_dir))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    args = ["--model", "tiny", "--methods", "lora,qlora", "--precision", "bf16", "--steps", "1", "--warmup", "1",
            "--repeats", "1", "--threads", "1", "--seq", "32", "--no-memory", "--no-startup", "--out", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    dtypes = {k: (r["weight_dtype"], r["compute_dtype"], r["trainable_dtype"]) for k, r in data["results"].items()}
    assert dtypes == {
        "lora": ("bfloat16", "bfloat16", "float32"),
        "bare-lora": ("bfloat16", "bfloat16", "float32"),
        "qlora": ("4bit-nf4", "bfloat16", "float32"),
    }
    assert all(r["mfu"] is None for r in data["results"].values())
    assert data["peak_flops"] is None and "--peak-tflops" in data["peak_flops_source"]
    rows = [line.split("|") for line in data["table_markdown"].splitlines()[2:]]
    assert [(r[1].strip(), r[10].strip(), r[11].strip()) for r in rows] == [
        ("lora", "–", "bfloat16 / bfloat16 / float32"),
        ("bare-lora", "–", "bfloat16 / bfloat16 / float32"),
        ("qlora", "–", "4bit-nf4 / bfloat16 / float32"),
    ]
    assert "none on a CPU (give --peak-tflops)" in capsys.readouterr().out


def test_bench_a_method_failing_mid_run_is_reported_and_the_others_measured(cache_dir, tmp_path, monkeypatch):
    from peft_lab import bench

    monkeypatch.setenv("PEFT_LAB_CACHE", str(cache_dir))
    monkeypatch.chdir(tmp_path)
    block = bench.Framework.block

    def failing(self):
        if self.method.name == "hira":
            raise RuntimeError("CUDA out of memory (simulated)")
        return block(self)

    monkeypatch.setattr(bench.Framework, "block", failing)
    out = tmp_path / "bench.json"
    args = ["--model", "tiny", "--methods", "lora,hira", "--steps", "1", "--warmup", "1", "--repeats", "2",
            "--threads", "1", "--seq", "32", "--no-bare", "--no-memory", "--no-startup", "--out", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    res = json.loads(out.read_text())["results"]
    assert res["hira"]["error"] == "RuntimeError in training: CUDA out of memory (simulated)"
    assert res["hira"]["step_s"] is None and res["hira"]["block_medians_s"] == []
    assert res["lora"]["error"] == "" and len(res["lora"]["block_medians_s"]) == 2


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA H100 NVL", None),  # other clocks: not guessed
        ("NVIDIA H200 NVL", None),
        ("NVIDIA A10G", None),
        ("NVIDIA L40", None),
        ("Tesla V100-SXM2-16GB", None),  # no bf16
    ],
)
def test_peak_bf16_flops_by_device_name(name, peak):
    from peft_lab.bench import mfu, peak_bf16_flops

    assert peak_bf16_flops(name) == peak
    assert mfu(1_000_000_000, 10_000.0, 989e12) == pytest.approx(6e13 / 989e12)
    assert mfu(1_000_000_000, 10_000.0, None) is None
