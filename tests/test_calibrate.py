"""python -m peft_lab.calibrate on the tiny model (4 layers): it measures every layer, grows the band from the
deepest layer but the last, writes a preset that composes and loads, and refuses what it cannot do."""

from __future__ import annotations

import json

import pytest
import torch

from peft_lab import calibrate, models

BASE = ["model=tiny", "experiment=smoke", "dataset=sst2", "model.config_kwargs.num_hidden_layers=4"]
ARGS = ["--batches", "2", "--batch-size", "4", "--threads", "1", "--sparsities", "0.5,0.9"]


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(cache_dir))
    torch.set_num_threads(1)


def test_calibration_writes_a_preset_that_composes_and_loads(tmp_path, compose, capsys):
    out = tmp_path / "conf" / "method" / "sparsity" / "mine.yaml"
    measured = tmp_path / "measured.json"
    code = calibrate.main(
        [*BASE, "--target", "0.1", "--budget", "10", "--out", str(out), "--json", str(measured), *ARGS]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    # the command it prints runs the preset on the same model and data, from wherever the file is
    use = next(line for line in printed.splitlines() if line.startswith("use it: "))
    assert "method/sparsity=mine" in use and "model.config_kwargs.num_hidden_layers=4" in use
    assert f"hydra.searchpath=[file://{tmp_path / 'conf'}]" in use
    record = json.loads(measured.read_text())
    layers = record["measured"]["layers"]
    assert [layer["layer"] for layer in layers] == [0, 1, 2, 3]
    for layer in layers:  # overlaps are shares, errors non-negative
        assert all(0 <= v <= 1 for v in layer["overlap"].values())
        assert all(v >= 0 for v in layer["error"].values())
    # an unbounded budget: the deepest layer but the last takes the highest candidate, and one layer is enough
    assert record["chosen"] == {"2": 0.9}
    assert 0.1 <= record["share"] < 0.2
    # the preset composes through Hydra's search path and adapts the model as written
    cfg = compose(
        "experiment=smoke", "method=sparselora", "dataset=sst2", "logger=none", "model.config_kwargs.num_hidden_layers=4",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "method/sparsity=mine",
    )  # fmt: skip
    assert dict(cfg.method.mlp_sparsity) == {"2": 0.9} and dict(cfg.method.attn_sparsity) == {}
    # the keys the measurement depends on travel with the map
    assert (cfg.method.selector, cfg.method.estimator_rank, cfg.method.dense_output_tokens) == ("svd", 8, True)
    from conftest import build_model

    loaded, method, _ = build_model(cfg)
    model = method.adapt(loaded.model)
    assert method.metrics(model)["sparselora_mlp_layers"] == {"2": 0.9}
    assert "# Written by: python -m peft_lab.calibrate" in out.read_text()


def test_calibration_refuses_an_unreachable_target_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never.yaml"
    code = calibrate.main([*BASE, "--target", "0.9", "--budget", "10", "--out", str(out), *ARGS])
    assert code == 1 and not out.exists()
    assert "short of --target 0.9; nothing written" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "1.5"], "--target 1.5 is outside"),
        (["--sparsities", "0.5,1.2"], "each must be in"),
        (["--budget", "0"], "--budget 0.0 is not positive"),
        (["method=lora"], "calibration is for SparseLoRA"),
    ],
)
def test_calibration_rejects_bad_arguments(args, message, tmp_path, capsys):
    assert calibrate.main([*BASE, *args, "--out", str(tmp_path / "x.yaml")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()
