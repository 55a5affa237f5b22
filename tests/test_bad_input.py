"""Bad input, as a user types it: a clear error naming problem and fix, non-zero exit, no completed run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import TINY, read_metrics, sentiment_rows, write_parquet

# Hydra rejects these at composition, with its own message, before the task runs.
COMPOSITION_CASES = {
    "unknown_key": (["method.foo=1"], "Key 'foo' not in"),
    "misspelt_key": (["train.batchsize=4"], "Key 'batchsize' not in 'TrainConfig'"),
    "wrong_type_int": (["method.r=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    "wrong_type_float": (["method.lr=fast"], "could not be converted to Float"),
    "unknown_group_option": (["dataset=sst3"], "Could not find 'dataset/sst3'"),
    "unknown_method": (["method=dorra"], "Could not find 'method/dorra'"),
    "bad_enum": (["dataset.task=regression"], "Invalid value 'regression'"),
}


@pytest.mark.parametrize("case", sorted(COMPOSITION_CASES))
def test_composition_errors(case, compose):
    """Hydra's compose API, in-process: the same composition `train.py` runs."""
    args, expected = COMPOSITION_CASES[case]
    with pytest.raises(Exception) as err:
        compose(*TINY, *args)
    text = f"{err.value} {err.value.__cause__ or ''}"
    assert expected in text, text


def test_composition_error_from_the_command_line(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "method.r=abc", f"hydra.run.dir={run_dir}")
    assert proc.returncode != 0
    assert "Value 'abc' of type 'str' could not be converted to Integer" in proc.stderr, proc.stderr
    assert not run_dir.exists(), "composition errors must not create a run dir"


def _data_case(name: str, tmp: Path, sst2_dir: Path) -> tuple[list[str], str]:
    """(overrides, expected message fragment) for data and model problems found by the task."""
    d = tmp / name
    if name == "data_dir_missing":
        return [f"dataset.data_dir={tmp}/nope"], "does not exist"
    if name == "data_dir_empty":
        d.mkdir()
        return [f"dataset.data_dir={d}"], "holds no data files"
    if name == "split_missing":
        write_parquet(d, "train", sentiment_rows(8))
        return [f"dataset.data_dir={d}"], "split 'validation' not found"
    if name == "text_column_missing":
        for split in ("train", "validation"):
            write_parquet(d, split, sentiment_rows(8, text_col="review"))
        return [f"dataset.data_dir={d}"], "no text column 'sentence'"
    if name == "label_column_missing":
        for split in ("train", "validation"):
            write_parquet(d, split, sentiment_rows(8, label_col="target"))
        return [f"dataset.data_dir={d}"], "no label column 'label'"
    if name == "labels_out_of_range":
        rows = sentiment_rows(8)
        rows["label"][3] = 5
        write_parquet(d, "train", rows)
        write_parquet(d, "validation", sentiment_rows(8))
        return [f"dataset.data_dir={d}"], "labels [5] outside 0..1"
    if name == "unlabelled_test_split":
        write_parquet(d, "train", sentiment_rows(8))
        write_parquet(d, "test", {"sentence": ["a b"] * 4, "label": [-1] * 4})
        return [f"dataset.data_dir={d}", "dataset.test_split=test"], "unlabelled rows"
    if name == "empty_after_filtering":
        write_parquet(d, "train", {"sentence": ["", "  ", ""], "label": [0, 1, 0]})
        write_parquet(d, "validation", sentiment_rows(8))
        return [f"dataset.data_dir={d}"], "empty after dropping empty texts"
    if name == "malformed_file":
        d.mkdir()
        (d / "train.parquet").write_bytes(b"this is not parquet")
        write_parquet(d, "validation", sentiment_rows(8))
        return [f"dataset.data_dir={d}"], "could not read"
    if name == "max_train_samples_zero":
        return [f"dataset.data_dir={sst2_dir}", "dataset.max_train_samples=0"], "max_train_samples=0"
    if name == "max_train_samples_negative":
        return [f"dataset.data_dir={sst2_dir}", "dataset.max_train_samples=-5"], "max_train_samples=-5"
    if name == "model_path_missing":
        return [f"dataset.data_dir={sst2_dir}", f"model.path={tmp}/no_model"], "model.path"
    if name == "model_without_task_head":
        return [f"dataset.data_dir={sst2_dir}", "model.tasks=[causal_lm]"], "no head for task 'classification'"
    if name == "no_target_modules":
        return [f"dataset.data_dir={sst2_dir}", "model.target_modules=[]"], "no target modules"
    if name == "unknown_target_modules":
        return [f"dataset.data_dir={sst2_dir}", "model.target_modules=[nope_proj]"], "not found in the model"
    if name == "model_offline_not_cached":
        return [f"dataset.data_dir={sst2_dir}", "model=hf", "model.name_or_path=some-org/not-cached-model"], (
            "not in the Hub cache and the Hub is unreachable"
        )
    if name == "sparselora_on_an_encoder":
        return [f"dataset.data_dir={sst2_dir}", "model=tiny-distilbert", "method=sparselora"], "is an encoder"
    if name == "device_not_a_device":
        return [f"dataset.data_dir={sst2_dir}", "train.device=gpu"], "train.device=gpu is not a device"
    if name == "hub_offline_no_local_copy":
        return [], "Hugging Face Hub is unreachable"
    if name == "plus_key_nothing_reads":  # Hydra's + bypasses the schema: stored, read by nothing
        return [f"dataset.data_dir={sst2_dir}", "+method.quantize=nf4", "+train.inference.foo=1"], (
            "method.quantize, train.inference.foo: not a key of this config (method=lora)"
        )
    if name == "batch_size_zero":
        return [f"dataset.data_dir={sst2_dir}", "train.batch_size=0"], "train.batch_size=0 is not a number of rows"
    if name == "grad_accum_negative":
        return [f"dataset.data_dir={sst2_dir}", "train.grad_accum=-1"], "train.grad_accum=-1"
    if name == "nothing_to_train":
        return [f"dataset.data_dir={sst2_dir}", "train.max_steps=-1", "train.epochs=0"], "trains nothing"
    if name == "warmup_ratio_one":
        return [f"dataset.data_dir={sst2_dir}", "train.warmup_ratio=1.5"], "train.warmup_ratio=1.5 is outside"
    if name == "inference_examples_zero":
        return [f"dataset.data_dir={sst2_dir}", "train.inference.examples=0"], "train.inference.examples=0"
    if name == "inference_repeats_zero":
        return [f"dataset.data_dir={sst2_dir}", "train.inference.repeats=0"], "train.inference.repeats=0"
    raise KeyError(name)


DATA_CASES = [
    "data_dir_missing",
    "data_dir_empty",
    "split_missing",
    "text_column_missing",
    "label_column_missing",
    "labels_out_of_range",
    "unlabelled_test_split",
    "empty_after_filtering",
    "malformed_file",
    "max_train_samples_zero",
    "max_train_samples_negative",
    "model_path_missing",
    "model_without_task_head",
    "no_target_modules",
    "unknown_target_modules",
    "hub_offline_no_local_copy",
    "model_offline_not_cached",
    "sparselora_on_an_encoder",
    "device_not_a_device",
    "plus_key_nothing_reads",
    "batch_size_zero",
    "grad_accum_negative",
    "nothing_to_train",
    "warmup_ratio_one",
    "inference_examples_zero",
    "inference_repeats_zero",
]


def _check_failed_cleanly(run_dir: Path, expected: str) -> None:
    metrics = read_metrics(run_dir)
    assert metrics.get("status") == "failed" and expected in metrics["error"], metrics
    assert metrics.get("failure") == "user_error"
    assert not (run_dir / "adapter").exists() and not (run_dir / "checkpoint").exists()


@pytest.mark.parametrize("case", DATA_CASES)
def test_task_errors(case, compose, tmp_path, sst2_dir, cache_dir, monkeypatch):
    """Each case through the run pipeline in-process: a UserError naming problem and fix, a failed record."""
    from peft_lab import run
    from peft_lab.errors import UserError

    monkeypatch.setenv("PEFT_LAB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("PEFT_LAB_DATA_ROOT", raising=False)
    args, expected = _data_case(case, tmp_path, sst2_dir)
    run_dir = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        run.execute(compose(*TINY, *args), run.RunContext(run_dir))
    # "fails fast": no 23 s of Hub retries, no 46 s tokenizer look-up (generous bound for a loaded CI box)
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert expected in message and "Fix:" in message and "\n" not in message, message
    _check_failed_cleanly(run_dir, expected)


@pytest.mark.parametrize("case", ["hub_offline_no_local_copy"])
def test_task_errors_from_the_command_line(case, run_cli, tmp_path, sst2_dir):
    """As a user sees it: exit 2, one `peft_lab: error:` line with the fix, no traceback, fast."""
    args, expected = _data_case(case, tmp_path, sst2_dir)
    run_dir = tmp_path / "run"
    start = time.monotonic()
    proc = run_cli(*TINY, *args, f"hydra.run.dir={run_dir}")
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("peft_lab: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert expected in errors[0] and "Fix:" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    _check_failed_cleanly(run_dir, expected)
    # "fails fast": no 23 s of Hub retries, no 46 s tokenizer look-up (generous bound for a loaded CI box)
    assert elapsed < 60
