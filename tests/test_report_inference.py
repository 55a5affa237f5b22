"""The report's row order for every shipped method, and its inference cost (metrics.json "inference") on sweeps with
known numbers: the "Inference cost" table's means over seeds, the marks and footnotes for merged outputs that differ
and for failed merges, the CSV columns, the latency plot's bars, and nothing of it for a sweep without the data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_report import _md_row, _table, _write_sweep, save_run

from peft_lab import report

MIB = 2**20
EXAMPLES, BATCH, REPEATS = 64, 32, 3


def inference(latency: float, merged: float | None = None, merge: str = "merged", match: bool | None = True,
              diff: float | None = 2e-6, agree: float | None = 1.0, error: str | None = None,
              footprint: int = 100 * MIB, merged_footprint: int | None = 99 * MIB) -> dict:  # fmt: skip
    """An ``inference`` record as peft_lab.inference.measure writes it (ms per example, bytes)."""
    merged_run = merge == "merged"
    return {
        "examples": EXAMPLES,
        "batch_size": BATCH,
        "repeats": REPEATS,
        "latency_ms": latency,
        "merged_latency_ms": merged if merged_run else None,
        "merge": merge,
        "merge_error": error,
        "max_abs_diff": diff if merged_run else None,
        "tolerance": 1e-4 if merged_run else None,
        "outputs_match": match if merged_run else None,
        "pred_agreement": agree if merged_run else None,
        "footprint_bytes": footprint,
        "merged_footprint_bytes": merged_footprint if merged_run else None,
    }


def add_run(sweep: Path, method: str, seed: int, inf: dict | None, dataset: str = "sst2") -> Path:
    """A completed run (``save_run``) whose metrics.json holds ``inf`` as its "inference" (none for None)."""
    metric, value = ("accuracy", 0.8) if dataset == "sst2" else ("perplexity", 30.0)
    run = save_run(sweep, method, seed, value, prefix=f"dataset={dataset},", dataset=dataset, main_metric=metric,
                   device="cpu")  # fmt: skip
    if inf is not None:
        path = run / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "inference": inf}))
    return run


def _inference_sweep(sweep: Path) -> Path:
    """sst2: lora (3 seeds, merged, outputs match), dora (2 seeds, seed 1's merged outputs differ), vera (merge
    failed), full (nothing to merge), hira (an older run: no inference record); wikitext2: lora (1 seed)."""
    for seed, (lat, merged) in enumerate([(1.0, 0.9), (1.2, 1.0), (1.4, 1.1)]):
        add_run(sweep, "lora", seed, inference(lat, merged))
    add_run(sweep, "dora", 0, inference(2.0, 1.4))
    add_run(sweep, "dora", 1, inference(2.5, 1.6, match=False, diff=0.31, agree=0.95))
    add_run(sweep, "vera", 0, inference(4.0, merge="failed", error="ValueError: cannot merge VeRA here"))
    for seed, lat in enumerate([3.0, 3.5]):
        add_run(sweep, "full", seed, inference(lat, merge="not_applicable", footprint=500 * MIB))
    add_run(sweep, "hira", 0, None)
    add_run(sweep, "lora", 0, inference(12.5, 11.0), dataset="wikitext2")
    return sweep


def _inference_section(md: str) -> str:
    assert md.count("## Inference cost") == 1
    return md.split("## Inference cost")[1]


# ----------------------------------------------------------------------------- row order


def test_rows_follow_the_method_families_then_unknown_methods_alphabetically(tmp_path):
    sweep = tmp_path / "order"
    for method in ("head", "zeta", "full", "dora", "lora", "alpha", "sparselora", "vera", "rslora", "qlora", "ia3"):
        add_run(sweep, method, 0, None)
    t = _table(report.build(sweep, quiet=True)["csv"])
    assert list(t) == ["lora", "rslora", "dora", "qlora", "vera", "ia3", "sparselora", "full", "head", "alpha", "zeta"]
    every = [p.stem for p in (Path(report.__file__).parent.parent / "conf" / "method").glob("*.yaml")]
    assert set(every) <= set(report.METHOD_ORDER)  # every shipped method has its place
    # unknown methods sort by name whatever order they come in, variants of one method by their label
    names = ["zeta", "lora [method.r=8]", "mid", "alpha", "lora [method.r=16]", "head"]
    for given in (names, names[::-1]):
        assert sorted(given, key=report._row_order) == [
            "lora [method.r=16]", "lora [method.r=8]", "head", "alpha", "mid", "zeta"
        ]  # fmt: skip


# ----------------------------------------------------------------------------- the inference table


def test_inference_table_has_means_over_seeds_and_merge_states(tmp_path):
    paths = report.build(_inference_sweep(tmp_path / "s"), quiet=True)
    md = paths["markdown"].read_text()
    section = _inference_section(md)
    assert f"on the first {EXAMPLES} test examples (batch size {BATCH}; the median of {REPEATS} timed passes" in section
    assert "| method | sst2 (ms per example; MiB) | wikitext2 (ms per example; MiB) |" in section
    # lora: (1.0 + 1.2 + 1.4) / 3 = 1.20 unmerged, (0.9 + 1.0 + 1.1) / 3 = 1.00 merged; 100 / 99 MiB
    assert _md_row(section, "lora") == "| lora | 1.20 / 1.00 ms<br>100 / 99 MiB | 12.5 / 11.0 ms<br>100 / 99 MiB |"
    # dora: (2.0 + 2.5) / 2 = 2.25, (1.4 + 1.6) / 2 = 1.50; seed 1's merged outputs differ
    assert _md_row(section, "dora") == "| dora | 2.25 / 1.50 ms †<br>100 / 99 MiB | – |"
    assert _md_row(section, "vera") == "| vera | 4.00 ms / merge failed ‡<br>100 MiB | – |"
    assert _md_row(section, "full") == "| full | 3.25 ms / n/a<br>500 MiB | – |"  # (3.0 + 3.5) / 2
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| method", "| lora", "| dora", "| vera", "| full"]  # table order; hira recorded nothing
    assert (
        "† dora × sst2: the merged model's outputs differ from the unmerged ones by up to 0.31 (tolerance 0.0001): "
        "the merged numbers are not those of the trained adapter (1 of 2 runs; predictions agree on 97.5 % of "
        "examples)."
    ) in section
    assert (
        "‡ vera × sst2: merge_and_unload failed (ValueError: cannot merge VeRA here): no merged latency (1 of 1 "
        in section
    )
    assert (
        "No inference cost recorded (runs of an older peft_lab, or train.inference.measure=false): hira × sst2."
        in section
    )
    assert "⚠" not in section  # one device, one setting
    main = md.split("## Inference cost")[0]
    assert "ms" not in _md_row(main, "lora") and "†" not in main  # the main table's cells are as before

    t = _table(paths["csv"])
    assert float(t["lora"]["sst2/latency_ms"]) == pytest.approx(1.2)
    assert float(t["lora"]["sst2/merged_latency_ms"]) == pytest.approx(1.0)
    assert t["lora"]["sst2/outputs_match"] == "True" and int(t["lora"]["sst2/inference_n"]) == 3
    assert (
        float(t["dora"]["sst2/merged_latency_ms"]) == pytest.approx(1.5) and t["dora"]["sst2/outputs_match"] == "False"
    )
    assert float(t["dora"]["sst2/max_abs_diff"]) == 0.31 and float(t["dora"]["sst2/pred_agreement"]) == pytest.approx(
        0.975
    )
    assert t["full"]["sst2/merge"] == "not_applicable" and t["full"]["sst2/merged_latency_ms"] == ""
    assert float(t["full"]["sst2/footprint_bytes"]) == 500 * MIB
    assert t["vera"]["sst2/merge"] == "failed" and t["hira"]["sst2/latency_ms"] == ""
    runs = {(r["method"], r["dataset"], r["seed"]): r for r in csv.DictReader(open(paths["runs_csv"]))}
    dora1 = runs[("dora", "sst2", "1")]
    assert (dora1["inference.latency_ms"], dora1["inference.merged_latency_ms"]) == ("2.5", "1.6")
    assert (dora1["inference.outputs_match"], dora1["inference.max_abs_diff"]) == ("False", "0.31")
    assert runs[("vera", "sst2", "0")]["inference.merge_error"] == "ValueError: cannot merge VeRA here"
    assert runs[("hira", "sst2", "0")]["inference.latency_ms"] == ""


def test_no_mismatch_mark_when_merged_outputs_match(tmp_path):
    sweep = tmp_path / "ok"
    for seed in range(2):
        add_run(sweep, "lora", seed, inference(1.0, 0.8, diff=5e-5))  # within the tolerance 1e-4
        add_run(sweep, "dora", seed, inference(2.0, 1.0, diff=0.0))
    section = _inference_section(report.build(sweep, quiet=True)["markdown"].read_text())
    assert _md_row(section, "lora") == "| lora | 1.00 / 0.800 ms<br>100 / 99 MiB |"
    assert _md_row(section, "dora") == "| dora | 2.00 / 1.00 ms<br>100 / 99 MiB |"
    assert "differ from the unmerged ones by" not in section and "merge_and_unload failed" not in section
    assert "No inference cost recorded" not in section


def test_partial_and_mixed_cells_say_how_many_runs(tmp_path):
    sweep = tmp_path / "mixed"
    add_run(sweep, "lora", 0, inference(1.0, 0.5))
    add_run(sweep, "lora", 1, inference(3.0, merge="failed", error="RuntimeError: boom"))
    add_run(sweep, "lora", 2, None)  # train.inference.measure=false
    paths = report.build(sweep, quiet=True)
    section = _inference_section(paths["markdown"].read_text())
    # unmerged: (1.0 + 3.0) / 2 over the two runs that measured; merged: the one run that merged
    assert (
        _md_row(section, "lora") == "| lora | 2.00 / 0.500 ms (merged in 1 of 2 runs) ‡ (2 of 3 runs)<br>100 / 99 MiB |"
    )
    assert "lora × sst2 (1 of 3 runs)" in section and "(RuntimeError: boom)" in section
    assert _table(paths["csv"])["lora"]["sst2/merge"] == "failed 1, merged 1"


def test_a_sweep_without_inference_data_has_no_section_plot_or_values(tmp_path):
    sweep = tmp_path / "old"
    _write_sweep(sweep)  # metrics.json as an older peft_lab wrote it
    paths = report.build(sweep, quiet=True)
    md = paths["markdown"].read_text()
    assert "Inference cost" not in md and "latency" not in md
    assert "latency" not in paths and not (sweep / "report" / "latency.png").exists()
    rows, datasets, cells = report.aggregate(report.load_runs(sweep))
    assert report.inference_figures(rows, datasets, cells) == {}
    assert report.inference_markdown(rows, datasets, cells, report.load_runs(sweep)) == ""
    t = _table(paths["csv"])
    assert t["lora"]["sst2/latency_ms"] == "" and t["lora"]["sst2/inference_n"] == "0"
    assert {r["inference.latency_ms"] for r in csv.DictReader(open(paths["runs_csv"]))} == {""}


# ----------------------------------------------------------------------------- the latency plot


def test_latency_plot_bars_are_the_table_means(tmp_path):
    sweep = _inference_sweep(tmp_path / "p")
    paths = report.build(sweep, quiet=True)
    assert paths["latency"] == sweep / "report" / "latency.png"
    assert paths["latency"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows, datasets, cells = report.aggregate(report.load_runs(sweep))
    fig = report.inference_figures(rows, datasets, cells)["latency"]
    assert set(report.inference_figures(rows, datasets, cells)) == set(report.INFERENCE_PLOTS)
    assert "hatched: merged outputs differ" in fig._suptitle.get_text()
    ax = fig.axes[0]
    assert [a.get_title() for a in fig.axes] == ["sst2", "wikitext2"]
    assert ax.get_ylabel() == "latency per example (ms)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["lora", "dora", "vera", "full"]
    unmerged, merged = ax.containers
    assert (unmerged.get_label(), merged.get_label()) == ("unmerged", "merged")
    assert [b.get_height() for b in unmerged] == pytest.approx([1.2, 2.25, 4.0, 3.25])
    assert [b.get_height() for b in merged] == pytest.approx([1.0, 1.5])  # lora, dora: vera failed, full has none
    assert [b.get_hatch() for b in merged] == [None, "//"]  # dora's merged outputs differ
    assert sorted(t.get_text() for t in ax.texts) == ["merge failed", "n/a"]
    assert [b.get_height() for b in fig.axes[1].containers[1]] == pytest.approx([11.0])
