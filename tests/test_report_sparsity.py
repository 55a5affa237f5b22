"""The report's sparsity study on sweeps with known numbers: the table's means, Δ and speed-up vs LoRA, the two
plots' points and LoRA band, what is left out (failed runs, records without a sparsity), and no study without
sparse methods."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_report import _md_row, save_run

from peft_lab import report

LORA = {0: (0.80, 0.20), 1: (0.82, 0.21), 2: (0.84, 0.22)}  # seed -> (test accuracy, median step time s)
SPARSE = {  # target sparsity -> seed -> (accuracy, sparsity_achieved, step time s); None: a failed run
    0.25: {0: (0.79, 0.24, 0.30), 1: (0.81, 0.26, 0.30)},
    0.5: {0: (0.75, 0.49, 0.25), 1: (0.77, 0.51, 0.25), 2: None},
}
SPARSELORA = {0: (0.83, 0.70, 0.30, 0.15), 1: (0.85, 0.72, 0.34, 0.15)}  # (dense acc, sparse acc, flops skipped, s)


def _study_sweep(sweep: Path, lm: bool = False) -> Path:
    """lora × 3 seeds, sparse at sparsity 0.25 / 0.5 × 2 seeds (and a failed third seed at 0.5), sparselora × 2 seeds
    (dense evaluation the main metric, the sparse one recorded too); ``lm``: the same numbers × 40 as perplexity."""
    ds, metric, k = ("wikitext2", "perplexity", 40.0) if lm else ("sst2", "accuracy", 1.0)
    common = {"dataset": ds, "main_metric": metric, "device": "cpu"}
    for seed, (acc, step) in LORA.items():
        save_run(sweep, "lora", seed, acc * k, config={"method": {"name": "lora"}, "seed": seed},
                 step_time_median_s=step, test={metric: acc * k}, **common)  # fmt: skip
    for target, seeds in SPARSE.items():
        for seed, run in seeds.items():
            acc, achieved, step = run or (None, None, None)
            save_run(sweep, "sparse", seed, acc and acc * k, prefix=f"sparsity={target},",
                     config={"method": {"name": "sparse", "sparsity": target}, "seed": seed},
                     method_metrics={"sparsity_achieved": achieved} if run else {}, step_time_median_s=step,
                     **common)  # fmt: skip
    for seed, (dense, sparse, skipped, step) in SPARSELORA.items():
        test = {metric: dense * k} if lm else {"accuracy": dense, "accuracy_dense": dense, "accuracy_sparse": sparse}
        save_run(sweep, "sparselora", seed, dense * k, config={"method": {"name": "sparselora"}, "seed": seed},
                 method_metrics={"sparselora_flops_skipped": skipped, "sparselora_mlp_flops_skipped": 0.5},
                 step_time_median_s=step, test=test, **common)  # fmt: skip
    return sweep


def _section(md: str) -> str:
    assert md.count("## Sparsity study") == 1
    return md.split("## Sparsity study")[1]


def test_sparsity_table_has_exact_means_deltas_and_speedups(tmp_path):
    paths = report.build(_study_sweep(tmp_path / "s"), quiet=True)
    study = _section(paths["markdown"].read_text())
    assert "### sst2 (accuracy on the test split ↑)" in study
    assert (
        "| method | variant | seeds | sparsity | accuracy (mean ± std) | Δ vs LoRA (higher is better) | step time (s) "
        "| speed-up vs LoRA | accuracy, dense eval | accuracy, sparse eval |"
    ) in study
    # lora: 0.80/0.82/0.84 → 0.820 ± 0.020; step times 0.20/0.21/0.22 → 0.210
    assert _md_row(study, "lora") == "| lora | – | 3 | – | 0.820 ± 0.020 | reference | 0.210 | reference | – | – |"
    rows = [line for line in study.splitlines() if line.startswith("| sparse |")]
    # sparsity 0.24/0.26 → 0.250; 0.79/0.81 → 0.800 ± 0.014 (sample std √2·0.01); 0.210 / 0.300 = 0.70×
    assert rows[0] == "| sparse | method.sparsity=0.25 | 2 | 0.250 | 0.800 ± 0.014 | −0.020 | 0.300 | 0.70× | – | – |"
    # the failed third seed is in no mean; 0.210 / 0.250 = 0.84×
    assert (
        rows[1] == "| sparse | method.sparsity=0.5 | 2 of 3 | 0.500 | 0.760 ± 0.014 | −0.060 | 0.250 | 0.84× | – | – |"
    )
    # FLOPs skipped 0.30/0.34 → 0.320; dense 0.83/0.85 → 0.840 (+0.020); 0.210 / 0.150 = 1.40×; sparse eval 0.710
    assert _md_row(study, "sparselora") == (
        "| sparselora | – | 2 | 0.320 | 0.840 ± 0.014 | +0.020 | 0.150 | 1.40× | 0.840 | 0.710 |"
    )
    assert (
        "Failed or not completed, left out of the means: sparse [method.sparsity=0.5] × sst2: 1 of 3 (1 failed)."
        in study
    )
    assert "no sparsity recorded" not in study and "⚠" not in study

    points = {p.row: p for p in report.sparsity_study(report.load_runs(tmp_path / "s"))["sst2"]}
    sp = points["sparse [method.sparsity=0.5]"]
    assert (sp.x, sp.mean, sp.n, sp.n_runs) == (pytest.approx(0.5), pytest.approx(0.76), 2, 3)
    assert sp.speedup == pytest.approx(0.21 / 0.25) and sp.delta == pytest.approx(-0.06)
    assert points["sparselora"].speedup == pytest.approx(1.4) and points["lora"].reference

    for name in report.SPARSITY_PLOTS:
        assert paths[name] == tmp_path / "s" / "report" / f"{name}.png"
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sparsity_plots_draw_one_line_per_method_and_lora_as_a_band(tmp_path):
    study = report.sparsity_study(report.load_runs(_study_sweep(tmp_path / "s")))
    figs = report.sparsity_figures(study)
    assert set(figs) == set(report.SPARSITY_PLOTS)

    ax = figs["sparsity_metric"].axes[0]
    assert ax.get_title() == "sst2" and ax.get_ylabel() == "accuracy (higher is better)"
    assert ax.get_xlabel().replace("\n", " ") == report.SPARSITY_XLABEL
    series = {c.get_label(): c for c in ax.containers}  # errorbar containers: line, caps, bars
    assert list(series) == ["sparse", "sparselora", "sparselora (sparse eval)"]
    sparse = series["sparse"].lines[0]
    assert list(sparse.get_xdata()) == pytest.approx([0.25, 0.5]) and list(sparse.get_ydata()) == pytest.approx(
        [0.80, 0.76]
    )
    bars = series["sparse"].lines[2][0].get_segments()  # error bar of the 0.25 point: 0.80 ± √2·0.01
    assert bars[0].ravel().tolist() == pytest.approx(
        [0.25, 0.80 - math.sqrt(2) * 0.01, 0.25, 0.80 + math.sqrt(2) * 0.01]
    )
    dashed = series["sparselora (sparse eval)"].lines[0]
    assert dashed.get_linestyle() == "--" and list(dashed.get_ydata()) == pytest.approx([0.71])
    assert list(dashed.get_xdata()) == pytest.approx([0.32])
    lora = next(ln for ln in ax.get_lines() if ln.get_label() == "lora (mean ± std)")
    assert list(lora.get_ydata()) == pytest.approx([0.82, 0.82])
    band = ax.patches[0]  # the shaded ± std band: 0.82 ± 0.02
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((0.80, 0.84))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["lora (mean ± std)", "sparse", "sparselora", "sparselora (sparse eval)"]

    ax = figs["sparsity_step_time"].axes[0]
    assert ax.get_ylabel() == "median training step time (s)"
    series = {c.get_label(): c.lines[0] for c in ax.containers}
    assert list(series) == ["sparse", "sparselora"]  # no eval-mode line for step time
    assert list(series["sparse"].get_ydata()) == pytest.approx([0.30, 0.25])
    assert list(series["sparselora"].get_ydata()) == pytest.approx([0.15])
    lora = next(ln for ln in ax.get_lines() if ln.get_label() == "lora (mean ± std)")
    assert list(lora.get_ydata()) == pytest.approx([0.21, 0.21])


def test_perplexity_study_signs_the_delta_and_says_lower_is_better(tmp_path):
    md = report.build(_study_sweep(tmp_path / "lm", lm=True), quiet=True)["markdown"].read_text()
    study = _section(md)
    assert "### wikitext2 (perplexity on the test split ↓)" in study and "Δ vs LoRA (lower is better)" in study
    assert "accuracy, dense eval" not in study  # no eval-mode columns without the fields
    assert _md_row(study, "lora").startswith("| lora | – | 3 | – | 32.80 ± 0.80 | reference |")
    rows = [line for line in study.splitlines() if line.startswith("| sparse |")]
    assert rows[0].startswith("| sparse | method.sparsity=0.25 | 2 | 0.250 | 32.00 ± 0.57 | −0.80 |")
    assert _md_row(study, "sparselora").startswith("| sparselora | – | 2 | 0.320 | 33.60 ± 0.57 | +0.80 |")


def test_records_without_sparsity_get_a_footnote_and_no_points(tmp_path):
    """An older sweep: sparse runs whose records hold no method_metrics and no step time."""
    sweep = tmp_path / "old"
    for seed, acc in enumerate((0.80, 0.82)):
        save_run(sweep, "lora", seed, acc)
        save_run(sweep, "sparse", seed, acc - 0.1)
    paths = report.build(sweep, quiet=True)
    study = _section(paths["markdown"].read_text())
    assert _md_row(study, "sparse") == "| sparse | – | 2 | not recorded | 0.710 ± 0.014 | −0.100 | – | – |"
    assert (
        "Left out of the plots, no sparsity recorded (method_metrics.sparsity_achieved / "
        "method_metrics.sparselora_flops_skipped; runs of an older peft_lab): sparse × sst2 (2 of 2 runs)."
    ) in study
    assert "No step time recorded (step_time_median_s), left out of the step-time means and plot: lora × sst2" in study
    assert all(paths[name].exists() for name in report.SPARSITY_PLOTS)
    ax = report.sparsity_figures(report.sparsity_study(report.load_runs(sweep)))["sparsity_metric"].axes[0]
    assert not ax.containers and [t.get_text() for t in ax.texts] == ["no completed run with a sparsity recorded"]


def test_step_times_from_different_devices_are_flagged(tmp_path):
    sweep = tmp_path / "dev"
    save_run(sweep, "lora", 0, 0.8, step_time_median_s=0.2, device="cuda:0")
    save_run(sweep, "sparse", 0, 0.7, step_time_median_s=0.4, device="cpu", method_metrics={"sparsity_achieved": 0.5})
    study = _section(report.build(sweep, quiet=True)["markdown"].read_text())
    assert "⚠ Step times were measured on different devices (cpu, cuda): a speed-up between them" in study


def test_sweep_without_sparse_methods_has_no_sparsity_study(tmp_path):
    sweep = tmp_path / "plain"
    for seed in range(2):
        for method in ("lora", "hira"):
            save_run(sweep, method, seed, 0.8, step_time_median_s=0.2)
    paths = report.build(sweep, quiet=True)
    assert not set(report.SPARSITY_PLOTS) & set(paths)
    assert not list((sweep / "report").glob("sparsity_*.png"))
    assert "Sparsity study" not in paths["markdown"].read_text()
    assert report.sparsity_study(report.load_runs(sweep)) == {}


def test_study_points_are_labelled_by_their_variant_name(tmp_path):
    """conf/variant/ points set many method keys (a whole per-layer map): the row says which point it is."""
    sweep = tmp_path / "sweep"
    maps = {"sparselora": {"53%-95%": 0.75}, "sparselora_f15": {"22": 0.9, "24-28": 0.9}}
    for name, mlp in maps.items():
        for seed in (0, 1):
            cfg = {"method": {"name": "sparselora", "mlp_sparsity": mlp}, "seed": seed}
            save_run(sweep, "sparselora", seed, 0.8, prefix=f"+variant={name},", config=cfg,
                     overrides=[f"+variant={name}", f"seed={seed}"],
                     method_metrics={"sparselora_flops_skipped": 0.2})  # fmt: skip
    runs = report.load_runs(sweep)
    assert sorted({r.row for r in runs}) == ["sparselora [variant=sparselora]", "sparselora [variant=sparselora_f15]"]
