"""The report's row order for every shipped method."""

from __future__ import annotations

from pathlib import Path

from test_report import _table, save_run

from peft_lab import report


def add_run(sweep: Path, method: str, seed: int, inf: None, dataset: str = "sst2") -> Path:
    metric, value = ("accuracy", 0.8) if dataset == "sst2" else ("perplexity", 30.0)
    return save_run(sweep, method, seed, value, prefix=f"dataset={dataset},", dataset=dataset, main_metric=metric,
                    device="cpu")  # fmt: skip


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
