"""Fetch datasets and models on a machine with internet, for compute nodes without it.

    python -m peft_lab.prefetch dataset=sst2,imdb,wikitext2 model=smollm2-135m out=/shared/peft_lab_data

writes ``<out>/<dataset>/{train,validation,...}.parquet`` in the Hub's column layout and
``<out>/models/<model>/`` (a ``save_pretrained``-style folder). Then, on the compute
nodes: ``PEFT_LAB_DATA_ROOT=<out>`` (or ``dataset.data_dir=<out>/<dataset>``) and
``model.path=<out>/models/<model>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

USAGE = "usage: python -m peft_lab.prefetch [dataset=NAME[,NAME...]] [model=NAME] out=DIR [other overrides]"


def write_dataset_splits(splits: dict[str, Any], folder: Path) -> list[Path]:
    """Write each ``datasets.Dataset`` as ``<folder>/<split>.parquet`` (atomically, one file per split)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split, data in splits.items():
        if len(data) == 0:
            raise ValueError(f"split '{split}' is empty; nothing to write")
        path = folder / f"{split}.parquet"
        tmp = folder / f".{split}.parquet.tmp"
        data.to_parquet(str(tmp))
        os.replace(tmp, path)
        written.append(path)
    return written


def fetch_dataset(ds: Any, out: Path) -> list[Path]:
    from datasets import load_dataset

    names = [s for s in (ds.train_split, ds.select_split, ds.test_split) if s is not None]
    splits = {s: load_dataset(ds.hub_path, ds.hub_config, split=s) for s in dict.fromkeys(names)}
    return write_dataset_splits(splits, out / ds.name)


def fetch_model(mc: Any, out: Path) -> Path:
    from huggingface_hub import snapshot_download

    target = out / "models" / mc.name
    snapshot_download(
        mc.name_or_path,
        local_dir=str(target),
        allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"],
    )
    return target


def main(argv: list[str]) -> int:
    from hydra import compose, initialize_config_dir

    import peft_lab.config  # noqa: F401
    from peft_lab.data import hub_reachable

    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if "out" not in args or not ({"dataset", "model"} & set(args)):
        print(USAGE, file=sys.stderr)
        return 2
    out = Path(args.pop("out")).expanduser()
    if not hub_reachable():
        print(
            "peft_lab.prefetch: error: the Hugging Face Hub is unreachable from this machine. "
            "Fix: run prefetch on a machine with internet (a login node), then copy <out> over.",
            file=sys.stderr,
        )
        return 2
    datasets = args.pop("dataset", "").split(",") if "dataset" in args else []
    model = args.pop("model", None)
    extra = [f"{k}={v}" for k, v in args.items()]
    conf_dir = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        for name in filter(None, datasets):
            cfg = compose(config_name="config", overrides=[f"dataset={name}", *extra])
            for path in fetch_dataset(cfg.dataset, out):
                print(f"wrote {path}")
        if model:
            cfg = compose(config_name="config", overrides=[f"model={model}", *extra])
            print(f"wrote {fetch_model(cfg.model, out)}")
    print(f"On the compute nodes: PEFT_LAB_DATA_ROOT={out}  model.path={out}/models/<model>")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
