"""A number the report shows belongs to exactly one configuration: distinct cells never share a run dir,
a changed config is never "already completed" nor resumed, a diverged run is failed, NaN is never ranked."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peft_lab import models, report, run, runfiles
from peft_lab.errors import DivergedError, UserError
from peft_lab.runfiles import Status


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(cache_dir))
    monkeypatch.setenv("PEFT_LAB_THREADS", "1")
    torch.set_num_threads(1)


def _strict_json(path):
    """Parse as RFC 8259 JSON: NaN / Infinity are errors."""

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=reject)


SMOKE = ("experiment=smoke", "logger=none", "method=lora", "dataset=sst2")


# ----------------------------------------------------------------------------- case 1: run-dir names


def test_run_dir_names_are_injective():
    a, b = runfiles.cell_dir_name("dataset.data_dir=/d/x/y"), runfiles.cell_dir_name("dataset.data_dir=/d/x_y")
    assert a != b and "/" not in a + b
    long = "dataset.data_dir=/" + "p" * 300
    s0, s1 = runfiles.cell_dir_name(f"{long},seed=0"), runfiles.cell_dir_name(f"{long},seed=1")
    assert s0 != s1 and len(s0) <= runfiles.MAX_DIR_NAME and len(s1) <= runfiles.MAX_DIR_NAME
    plain = "dataset=sst2,method=lora"
    assert runfiles.cell_dir_name(plain) == plain  # readable names stay as they are
    assert runfiles.cell_dir_name("") == "default"


# End to end: tests/test_tracking.py's sweep (2 methods x 2 seeds over a data_dir whose override string
# passes 200 characters: four run dirs, n=2 per method) and tests/test_sweep.py's two data folders.


# ----------------------------------------------------------------------------- case 2: fingerprints


def test_same_config_is_skipped_other_config_refused(compose, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("the run's own config\n")  # as Hydra writes it
    ctx = run.RunContext(run_dir)
    value = run.execute(compose(*SMOKE), ctx)
    first = (run_dir / "metrics.json").read_text()
    rec = runfiles.read_record(run_dir)
    assert rec.status == Status.completed and rec.final_train_loss is not None and rec.tokens_per_s > 0

    # the same config again: nothing runs, the completed record is untouched
    assert run.execute(compose(*SMOKE), ctx) == value
    assert (run_dir / "metrics.json").read_text() == first

    # keys that change no number (logging, threads) are not part of the identity
    assert run.execute(compose(*SMOKE, "train.log_every=1", "train.threads=2"), ctx) == value

    # another config into the same folder: refused, naming the differing key; nothing overwritten, and
    # .hydra/ (which Hydra rewrites for every launch, before the run can refuse) is put back as it was
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    hydra_cfg.write_text("method:\n  lr: 0.001\n")  # what Hydra writes for the refused launch
    with pytest.raises(UserError, match=r"method\.lr: 0\.0005 -> 0\.001"):
        run.execute(compose(*SMOKE, "method.lr=1e-3"), ctx)
    assert (run_dir / "metrics.json").read_text() == first
    assert hydra_cfg.read_text() == "the run's own config\n"


def test_checkpoint_of_another_config_is_never_resumed(compose, tmp_path):
    run_dir = tmp_path / "run"
    ctx = run.RunContext(run_dir)
    run.execute(compose(*SMOKE), ctx)
    rec = runfiles.read_record(run_dir)
    rec.status = Status.interrupted  # as if preempted after its last checkpoint
    rec.save(run_dir)
    with pytest.raises(UserError, match=r"a run and its checkpoint of a different config \(train\.max_steps: 6 -> 8"):
        run.execute(compose(*SMOKE, "train.max_steps=8"), ctx)
    # the same config resumes from the checkpoint (step 6 of 6: nothing left to train)
    run.execute(compose(*SMOKE), ctx)
    rec = runfiles.read_record(run_dir)
    assert rec.status == Status.completed and rec.resumed_from_step == 6


def test_record_without_fingerprint_is_a_conflict(compose, tmp_path):
    """A completed metrics.json written by an older peft_lab (no fingerprint) is not trusted as this config."""
    run_dir = tmp_path / "run"
    runfiles.write_json_atomic(run_dir / "metrics.json", {"status": "completed", "main_metric_value": 0.9})
    with pytest.raises(UserError, match="no fingerprint"):
        run.execute(compose(*SMOKE), run.RunContext(run_dir))


def test_experiment_preset_is_part_of_the_cell_identity():
    from conftest import CONF
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "config.yaml")
    assert "experiment" not in cfg.hydra.job.config.override_dirname.exclude_keys


# ----------------------------------------------------------------------------- case 3: divergence


def test_nan_loss_fails_the_run_with_strict_json(compose, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose(*SMOKE, "train.precision=fp16", "method.lr=1e12", "train.max_grad_norm=0")
    with pytest.raises(DivergedError) as err:
        run.execute(cfg, run.RunContext(run_dir))
    rec = _strict_json(run_dir / "metrics.json")
    assert rec["status"] == "failed" and rec["failure"] == "diverged"
    assert rec["diverged_at_step"] == err.value.step >= 1
    assert rec["main_metric_value"] is None and not (run_dir / "adapter").exists()


def test_report_never_ranks_a_non_finite_value(tmp_path):
    sweep = tmp_path / "sweep"
    for name, value in (("a", 0.6), ("b", float("nan")), ("c", float("inf"))):
        d = sweep / name
        d.mkdir(parents=True)
        rec = {"status": "completed", "method": name, "dataset": "sst2", "main_metric": "accuracy",
               "main_metric_value": value, "config": {"method": {"name": name}}}  # fmt: skip
        (d / "metrics.json").write_text(json.dumps(rec))  # Python writes a bare NaN / Infinity here
    rows, _, cells = report.aggregate(report.load_runs(sweep))
    assert cells[("a", "sst2")].vs_best == "best"
    for bad in ("b", "c"):
        assert cells[(bad, "sst2")].status == "failed" and cells[(bad, "sst2")].n == 0
        assert math.isnan(cells[(bad, "sst2")].mean)
    paths = report.build(sweep, quiet=True)
    md = paths["markdown"].read_text()
    assert "**0.600**" in md and "nan" not in md.lower().replace("n=", "")


def test_report_rows_separate_configs_and_name_the_key(tmp_path):
    """Runs of one method that computed different things are different rows, labelled by what differs;
    seeds of one config share a row."""
    sweep = tmp_path / "sweep"
    base = {"method": {"name": "lora", "r": 8, "lr": 5e-4}, "model": {"name": "smollm2", "arch": None},
            "dataset": {"name": "sst2"}, "train": {"max_steps": 100}}  # fmt: skip
    variants = {
        "a": ({}, 0, 0.8), "b": ({}, 1, 0.7), "c": ({"method": {"r": 16}}, 0, 0.9),
        "d": ({"model": {"name": "tiny", "arch": "llama"}, "train": {"max_steps": 6}}, 0, 0.5),
    }  # fmt: skip
    for name, (change, seed, value) in variants.items():
        cfg = json.loads(json.dumps(base))
        for group, keys in change.items():
            cfg[group].update(keys)
        cfg["seed"] = seed
        rec = runfiles.RunRecord(status=Status.completed, method="lora", dataset="sst2", seed=seed, config=cfg,
                                 main_metric="accuracy", main_metric_value=value)  # fmt: skip
        rec.save(sweep / name)
    rows, _, cells = report.aggregate(report.load_runs(sweep))
    by_row = {row: cells[(row, "sst2")] for row in rows}
    assert sorted(a.n for a in by_row.values()) == [1, 1, 2]
    labels = " | ".join(rows)
    assert "method.r=16" in labels and "model.name=tiny" in labels and "train.max_steps=6" in labels
    assert "model.arch" not in labels  # implied by model.name, left to the hash
    assert len(set(rows)) == 3


def test_strict_json_writer():
    text = runfiles.to_json({"a": float("nan"), "b": [float("inf"), 1.5], "s": Status.failed})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "s": "failed"}


# ----------------------------------------------------------------------------- case 11: devices


def test_local_cells_get_one_device_each(monkeypatch, caplog):
    from peft_lab import sweep

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    slots, _ = sweep.device_slots(2)
    assert slots == ["3", "5"]
    with caplog.at_level("WARNING"):
        slots, _ = sweep.device_slots(4)
    assert slots == ["3", "5"] and "only 2 CUDA device(s)" in caplog.text
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.device_slots(2)[0] == [None, None]  # no GPU: the environment is left alone


def test_multi_process_cells_get_a_device_per_rank(monkeypatch, caplog):
    """cluster.nproc_per_cell=2 on 5 GPUs: two cells at once on 0,1 and 2,3 (GPU 4 idle); 6 ranks on 5: refused."""
    from peft_lab import sweep
    from peft_lab.errors import UserError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4")
    with caplog.at_level("WARNING"):
        slots, note = sweep.device_slots(3, nproc=2)
    assert slots == ["0,1", "2,3"] and "running 2 cells at once" in caplog.text and "one per rank" in note
    with pytest.raises(UserError, match="nproc_per_cell=6 but only 5"):
        sweep.device_slots(1, nproc=6)


# ----------------------------------------------------------------------------- case 10: precision


@pytest.mark.parametrize(
    "extra, expected",
    [
        (("train.precision=bf16",), ("bf16", "bfloat16", "bfloat16", False)),
        (("train.precision=fp16",), ("fp16", "float16", "float16", True)),
        (("method=qlora",), ("fp32", "4bit-nf4", "float32", False)),
    ],
)
def test_precision_is_recorded_as_it_ran(extra, expected, compose, tmp_path):
    """metrics.json says the dtype of the frozen base weights and the dtype the matmuls ran in (autocast),
    and whether fp16's gradient scaler was on: not the fp32 of the weights for a bf16-autocast run."""
    run.execute(compose(*SMOKE, "train.max_steps=2", *extra), run.RunContext(tmp_path / "run"))
    rec = runfiles.read_record(tmp_path / "run")
    assert rec.status == Status.completed and math.isfinite(rec.final_train_loss)
    assert (rec.precision, rec.weight_dtype, rec.compute_dtype, rec.grad_scaler) == expected
    assert rec.trainable_dtype == "float32"  # master weights: the optimizer never updates bf16 / fp16 values
