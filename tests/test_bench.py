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
            "--no-memory", "--no-startup", "--out", str(out)]  # fmt: skip
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
    targets = {t["target"]: t["measured"] for t in data["targets"]}
    assert targets["framework LoRA steps/s vs bare loop"] == pytest.approx(paired("bare-lora", "lora"), rel=1e-12)
    assert targets["HiRA step time vs LoRA"] == pytest.approx(paired("hira", "lora"), rel=1e-12)
    assert data["machine"]["torch_threads"] == 1
