"""SparseLoRA (Khaki et al., ICML 2025, arXiv 2506.16500): contextual sparsity in the frozen base computation.

LoRA stays dense; what shrinks is the frozen base weights' work, chosen per batch and per layer:

* **Which layers, how sparse** (``method.mlp_sparsity`` / ``method.attn_sparsity``): maps from
  layers to the share of channels skipped, in the shape of the official per-layer configs
  (``configs/sparsity/*.yaml`` in z-lab/sparselora, where ``layers.17.mlp: 0.95``). A key is a
  layer index (``"17"``), an inclusive range (``"17-30"``) or a range of depth in per cent
  (``"53%-95%"``: the layers i with 0.53 n <= i < 0.95 n of n layers). Layers not named are dense.
  Presets in ``conf/method/sparsity/`` (``method/sparsity=...``): the official Llama-3-8B /
  Llama-2-7B recipes, and ``deep_band`` (the default): MLP 0.75 in 53 %-95 % of the depth, i.e.
  layers 16-28 of SmolLM2-135M's 30 and 17-30 of an 8B Llama's 32, the band the official recipes use.
* **Selector** (``method.selector``): ``svd`` is the paper's training-free estimator, a rank-r
  truncated SVD of each frozen weight (W ~ B_est A_est with A_est = V sqrt(S), B_est =
  sqrt(S) U^T; computed once per model and cached on disk). ``oracle`` chooses from the true
  activations of the adapted layers (dense compute first: no speed-up; a diagnostic that separates
  the estimator's error from the damage of the sparsity itself).
* MLP: each intermediate channel scored by the L2 norm over the batch's context tokens of
  SiLU(gate) * up (estimated or true); the top (1 - s) channels kept: gate/up compute only those
  output rows, down only those input columns, base and LoRA alike (``SparseLlamaMLP``).
* Attention: Q/K channels scored by |q| * |k| (averaged over the query heads of each KV group;
  RoPE pairs kept together), V/O channels by |v| (``SparseLinear`` on the four projections).
* One channel set per batch and layer. The first ``warmup_frac`` of the steps dense, optionally the
  last ``cooldown_frac`` too (the official ``end_step``); output tokens (labels != -100 for causal
  LM, the pooled last token for classification) dense unless ``dense_output_tokens=false``.

Both replacements are ``nn.Module`` classes that hold what they compute with (the projections as
children, the estimator factors as non-persistent buffers, one ``Controller`` per model), so a
``copy.deepcopy`` of the model computes with its own weights, and the module names (and so the
saved adapter) are those of plain LoRA. No library class is patched. Evaluation is dense by
default (SparseLoRA accelerates fine-tuning); on classification every run also evaluates the
test split the other way and reports ``accuracy_dense`` and ``accuracy_sparse``. The share of
base-linear FLOPs skipped is measured while training and reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator, Optional

from peft_lab.errors import fail
from peft_lab.methods import lora
from peft_lab.schemas import Choice, plain

log = logging.getLogger(__name__)
NAME = "sparselora"


class Selector(Choice):
    """``method.selector``: how each batch's channels are chosen."""

    svd = "svd"  # the paper's rank-r SVD estimator of the frozen weights (fast)
    oracle = "oracle"  # the true activations (dense compute first: a diagnostic, no speed-up)


@dataclass
class Config(lora.Config):
    """SparseLoRA's own keys; the LoRA keys and their defaults come from ``lora.Config``."""

    name: str = NAME
    # layer -> share of MLP intermediate channels skipped; keys "17", "17-30" or "53%-95%" (see the module
    # doc). A mapping (YAML presets) or, on the command line, the string "16-28:0.75,29:0.5": a mapping
    # given there would be merged into the preset's, so the string form replaces it instead.
    mlp_sparsity: Any = field(default_factory=dict)
    # layer -> share of Q/K and V/O channels skipped (same forms)
    attn_sparsity: Any = field(default_factory=dict)
    selector: Selector = Selector.svd
    estimator_rank: int = 8
    warmup_frac: float = 0.05  # the first steps run dense
    cooldown_frac: float = 0.0  # the last steps run dense (the official end_step); 0: off
    dense_output_tokens: bool = True
    sparse_eval: bool = False  # the main test metric from sparse evaluation (the other is reported too)


KEY = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
PCT_KEY = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s*-\s*(\d+(?:\.\d+)?)%\s*$")


def layer_map_items(name: str, spec: Any) -> list[tuple[str, Any]]:
    """The (key, value) pairs of a per-layer map given as a mapping (YAML) or as the command-line string
    ``"16-28:0.75,29:0.5"`` (entries split by commas or spaces; ``""``: no layer). Raises UserError for
    anything else (e.g. a bare number)."""
    if spec is None:
        return []
    if hasattr(spec, "items"):
        return [(str(k), v) for k, v in spec.items()]
    if isinstance(spec, str):
        out = []
        for entry in spec.replace(",", " ").split():
            key, sep, value = entry.rpartition(":")
            try:
                out.append((key, float(value)))
            except ValueError:
                sep = ""
            if not sep:
                raise fail(
                    f"method.{name}='{spec}': the entry '{entry}' is not layers:sparsity",
                    f"write e.g. method.{name}=16-28:0.75 or '16-28:0.75,29:0.5' (quoted when it has a comma)",
                )
        return out
    raise fail(
        f"method.{name}={spec} is not a per-layer map",
        f"name the layers: method.{name}=16-28:0.75 (or '53%-95%:0.75' for a share of the depth), "
        "or pick a preset: method/sparsity=deep_band",
    )


def check_layer_map(name: str, spec: Any) -> None:
    """Start-up check of a per-layer map (no layer count needed): key syntax, values in [0, 1), no layer index
    named twice. Raises UserError naming the key and the fix."""
    seen: set[int] = set()
    for key, value in layer_map_items(name, spec):
        if not (KEY.match(key) or PCT_KEY.match(key)):
            raise fail(
                f"method.{name} has the key '{key}', which is not a layer",
                'use a layer index ("17"), an inclusive range ("17-30") or a share of the depth ("53%-95%")',
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(
                f"method.{name}['{key}']={value!r} is not a number", "give the share of channels skipped, e.g. 0.75"
            )
        if not 0.0 <= float(value) < 1.0:
            raise fail(
                f"method.{name}['{key}']={value} is outside [0, 1)", "give the share of channels skipped, e.g. 0.75"
            )
        m, p = KEY.match(key), PCT_KEY.match(key)
        lo, hi = (int(m[1]), int(m[2] or m[1])) if m else (float(p[1]), float(p[2]))
        if hi < lo or (p and hi > 100):
            raise fail(f"method.{name} has the empty or reversed range '{key}'", "write it low-high, e.g. 17-30")
        if m:  # layer indices: a layer named twice is an error before any model is loaded
            for i in range(lo, hi + 1):
                if i in seen:
                    raise fail(f"method.{name} names layer {i} twice (again in '{key}')", "give each layer once")
                seen.add(i)


def resolve_layer_map(name: str, spec: Any, n_layers: int) -> dict[int, float]:
    """{layer index: sparsity} of a per-layer map for a model of ``n_layers`` layers (0-based).

    Raises UserError for a layer index past the model's last layer or a layer named twice."""
    check_layer_map(name, spec)
    out: dict[int, float] = {}
    for key, value in layer_map_items(name, spec):
        m = KEY.match(key)
        if m:
            lo, hi = int(m[1]), int(m[2] or m[1])
            if hi >= n_layers:
                raise fail(
                    f"method.{name} names layer {hi} ('{key}'), but the model has {n_layers} layers (0-{n_layers - 1}): "
                    "this map (or method/sparsity preset) is for a deeper model",
                    f"use method/sparsity=deep_band (a share of the depth, fits any model), run python -m "
                    f"peft_lab.calibrate for this model, or name layers 0-{n_layers - 1}",
                )
            layers = range(lo, hi + 1)
        else:
            p = PCT_KEY.match(key)
            a, b = float(p[1]) / 100 * n_layers, float(p[2]) / 100 * n_layers
            layers = [i for i in range(n_layers) if a <= i < b]
        for i in layers:
            if i in out:
                raise fail(f"method.{name} names layer {i} twice (again in '{key}')", "give each layer once")
            out[i] = float(value)
    return {i: s for i, s in sorted(out.items()) if s > 0}


class Method(lora.Method):
    name = NAME

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.controller = Controller()
        self.layer_counts: Optional[tuple[int, int]] = None  # (sparse layers, all layers), set by adapt
        self.layer_sparsity: dict[str, dict[int, float]] = {}  # {"mlp": {i: s}, "attn": {i: s}}, set by adapt
        self.warnings: list[str] = []
        self.eval_sparse = bool(self.cfg.sparse_eval)

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        for key in ("warmup_frac", "cooldown_frac"):
            if not 0.0 <= getattr(c, key) < 1.0:
                raise fail(f"method.{key}={getattr(c, key)} is outside [0, 1)", "give a fraction such as 0.05")
        if c.warmup_frac + c.cooldown_frac >= 1.0:
            raise fail(
                f"method.warmup_frac={c.warmup_frac} + method.cooldown_frac={c.cooldown_frac} leave no sparse step",
                "keep their sum below 1",
            )
        for key in ("mlp_sparsity", "attn_sparsity"):
            check_layer_map(key, getattr(c, key))
        if c.estimator_rank < 1:
            raise fail(f"method.estimator_rank={c.estimator_rank}", "give a rank >= 1, e.g. 8")
        tasks = {plain(t) for t in self.model_cfg.tasks}
        if self.task == "masked_lm" or ("masked_lm" in tasks and "causal_lm" not in tasks):
            raise fail(
                f"SparseLoRA serves Llama-style decoders; model '{self.model_cfg.name}' is an encoder",
                "use method=lora (or hira/qlora/sparse) on this model, or a Llama-family model",
            )

    def check_overrides(self, overrides: list[str]) -> None:
        for o in overrides:
            key, _, value = o.lstrip("+~").partition("=")
            if (
                key.startswith("method.")
                and key.split(".")[1] in ("mlp_sparsity", "attn_sparsity")
                and (value.lstrip().startswith("{") or key.count(".") > 1)
            ):
                name = key.split(".")[1]
                raise fail(
                    f"'{o}': Hydra merges a mapping given on the command line into the preset's map "
                    f"({_show(getattr(self.cfg, name))}) instead of replacing it",
                    f"give the whole map as a string, e.g. method.{name}=16-28:0.75 or "
                    f"\"method.{name}='16-28:0.75,29:0.5'\" ('' for none), or pick another method/sparsity preset",
                )

    def adapt(self, model: Any) -> Any:
        model = super().adapt(model)
        layers = decoder_layers(model)
        if not layers:
            raise fail(
                f"SparseLoRA found no Llama-style decoder layers (self_attn.q/k/v/o_proj and mlp.gate/up/down_proj) "
                f"in {type(model.get_base_model()).__name__}",
                "use a Llama-family model (SmolLM2, Llama, Mistral, Qwen2) or another method",
            )
        n = len(layers)
        mlp = resolve_layer_map("mlp_sparsity", self.cfg.mlp_sparsity, n)
        attn = resolve_layer_map("attn_sparsity", self.cfg.attn_sparsity, n)
        self.layer_sparsity = {"mlp": mlp, "attn": attn}
        config = model.get_base_model().config
        self.controller.per_token = {kind: n * cost for kind, cost in layer_costs(config).items()}
        svd = self.cfg.selector == "svd"
        estimators = build_estimators(layers, self.cfg.estimator_rank) if svd else [None] * n
        for i, layer in enumerate(layers):
            wrap_layer(layer, estimators[i], self.controller, mlp.get(i, 0.0), attn.get(i, 0.0), config)
        log.info(
            f"SparseLoRA ({plain(self.cfg.selector)} selector): {n} layers; MLP sparse in {_ranges(mlp)}, "
            f"attention sparse in {_ranges(attn)}"
        )
        self._check_sparse_layers(n, set(mlp) | set(attn))
        return model

    def _check_sparse_layers(self, n: int, sparse: set) -> None:
        """Record how many layers run sparse; warn when the maps leave none."""
        self.layer_counts, self.warnings = (len(sparse), n), []
        if not sparse:
            msg = (
                f"SparseLoRA has no sparse layer: method.mlp_sparsity={_show(self.cfg.mlp_sparsity)} and "
                f"method.attn_sparsity={_show(self.cfg.attn_sparsity)} select none of the {n} layers of model "
                f"'{self.model_cfg.name}', so it runs as plain dense LoRA. Fix: name layers that exist, e.g. "
                f"method.mlp_sparsity=0-{n - 1}:0.5"
            )
            log.warning(msg)
            self.warnings.append(msg)

    def before_forward(
        self, batch: dict, step: int, total: int, training: bool, shared: bool = False, padding: bool = False
    ) -> None:
        c = self.cfg
        self.controller.shared, self.controller.padding = shared, padding
        cool = c.cooldown_frac > 0 and step >= total - int(c.cooldown_frac * total)
        in_window = step >= int(c.warmup_frac * total) and not cool
        active = in_window if training else self.eval_sparse
        self.controller.begin(batch, self.task, active, c.dense_output_tokens, count=training)

    def eval_modes(self) -> list[str]:
        """Evaluation modes of a classification run: the main one first (``sparse_eval``), then the other."""
        if self.task != "classification":
            return []
        return ["sparse", "dense"] if self.cfg.sparse_eval else ["dense", "sparse"]

    @contextlib.contextmanager
    def eval_mode(self, mode: str) -> Iterator[None]:
        """Evaluate sparse (``"sparse"``: the training-time channel selection on every batch) or dense."""
        before, self.eval_sparse = self.eval_sparse, mode == "sparse"
        try:
            yield
        finally:
            self.eval_sparse = before

    def metrics(self, model: Any) -> dict[str, Any]:
        """FLOP shares skipped (fractions 0..1); after ``adapt`` also the sparse / total layer counts,
        the per-layer sparsities in force and ``sparselora_warnings`` (a list of messages, empty when none)."""
        out = self.controller.report()
        out["sparselora_selector"] = plain(self.cfg.selector)
        ctl = self.controller
        msg = None
        if self.layer_counts and self.layer_counts[0] and ctl.flops["mlp"][0] and ctl.sparse_seen == 0:
            msg = (
                "SparseLoRA ran no step sparse: the dense warm-up (method.warmup_frac) and cool-down "
                "(method.cooldown_frac) covered every training step, so it trained as dense LoRA. Fix: lower them"
                if ctl.active_batches == 0
                else "SparseLoRA ran no token sparse: every token of every training batch was an output token "
                "(method.dense_output_tokens=true on plain language-modelling data), so it trained as dense LoRA. "
                "Fix: prompt-masked data (labels -100 on the prompt), or method.dense_output_tokens=false"
            )
        if msg is not None and msg not in self.warnings:
            log.warning(msg)
            self.warnings.append(msg)
        if self.layer_counts is not None:
            out["sparselora_sparse_layers"], out["sparselora_layers"] = self.layer_counts
            out["sparselora_mlp_layers"] = {str(i): s for i, s in self.layer_sparsity["mlp"].items()}
            out["sparselora_attn_layers"] = {str(i): s for i, s in self.layer_sparsity["attn"].items()}
            out["sparselora_warnings"] = list(self.warnings)
        return out


def _show(spec: Any) -> str:
    return str(dict(spec)) if hasattr(spec, "items") else repr(spec)


def layer_ranges(layers: dict[int, float]) -> list[tuple[str, float]]:
    """A resolved map written back with runs of consecutive layers at equal sparsity merged:
    {16: 0.75, ..., 28: 0.75, 31: 0.5} -> [("16-28", 0.75), ("31", 0.5)] (keys as the maps take them)."""
    runs: list[list] = []  # [first, last, sparsity]
    for i, s in sorted(layers.items()):
        if runs and i == runs[-1][1] + 1 and s == runs[-1][2]:
            runs[-1][1] = i
        else:
            runs.append([i, i, s])
    return [(f"{lo}" if lo == hi else f"{lo}-{hi}", s) for lo, hi, s in runs]


def _ranges(layers: dict[int, float]) -> str:
    """'16-28 at 0.75, 31 at 0.5' for {16: 0.75, ..., 28: 0.75, 31: 0.5}; 'none' when empty."""
    return ", ".join(f"{key} at {s:g}" for key, s in layer_ranges(layers)) or "none"


# ----------------------------------------------------------------------------- per-batch state


class Controller:
    """Which tokens are dense in this batch, whether sparsity is on, and the FLOP tally (one per model)."""

    def __init__(self) -> None:
        self.active = False
        self.count = False
        self.batch = 0  # bumped per batch: a layer's channel choice is made once per batch
        self.sparse_rows: Optional[Any] = None
        self.dense_rows: Optional[Any] = None
        self.flops = {"mlp": [0, 0], "attn": [0, 0]}  # kind -> [dense-equivalent, computed], all layers
        self.per_token = {"mlp": 0, "attn": 0}  # base-linear multiply-adds per token over all layers (set by adapt)
        self.sparse_seen = 0  # context tokens in counted (training) batches while sparsity was on
        self.active_batches = 0  # counted (training) batches with sparsity on
        self.shared = False  # ranks compute rows of one batch: channel scores are summed over ranks
        self.padding = False  # this rank's rows are a stand-in: they score nothing and count nothing

    def scores(self, sq: Any) -> Any:
        """Per-channel sums of squares over this batch's context tokens -> over the global batch (several
        ranks share it: one all_reduce; a stand-in rank adds zeros). Every rank then chooses the same
        channels, those one process would choose from the whole batch."""
        if self.shared:
            from peft_lab import distributed

            distributed.all_reduce_sum(sq.mul_(0.0) if self.padding else sq)
        return sq

    def begin(self, batch: dict, task: str, active: bool, dense_outputs: bool, count: bool) -> None:
        import torch

        self.active, self.count = active, count and not self.padding
        count = self.count
        self.batch += 1
        ids = batch["input_ids"]
        dense = torch.zeros_like(ids, dtype=torch.bool)
        if dense_outputs and task == "causal_lm" and "labels" in batch:
            dense = batch["labels"] != -100
        elif dense_outputs and task == "classification":
            last = batch["attention_mask"].sum(1) - 1  # right padding: the pooled token
            dense[torch.arange(ids.shape[0], device=ids.device), last] = True
        flat = dense.flatten()
        self.dense_rows = flat.nonzero().squeeze(1)
        self.sparse_rows = (~flat).nonzero().squeeze(1)
        if count and active:
            self.active_batches += 1
            self.sparse_seen += self.sparse_rows.numel()
        if count:  # every layer's dense cost; the sparse modules take off what they skip (``tally``)
            for kind, cost in self.per_token.items():
                self.flops[kind][0] += flat.numel() * cost
                self.flops[kind][1] += flat.numel() * cost

    def context(self, x: Any) -> Any:
        """The context (sparse) tokens of ``x`` [batch, seq, d] as [tokens, d]."""
        xf = x.reshape(-1, x.shape[-1])
        return xf if self.sparse_rows.numel() == xf.shape[0] else xf.index_select(0, self.sparse_rows)

    def tally(self, kind: str, dense_flops: int, done_flops: int) -> None:
        """A sparse module computed ``done_flops`` where the dense layer costs ``dense_flops``."""
        if self.count:
            self.flops[kind][1] -= dense_flops - done_flops

    def report(self) -> dict[str, Any]:
        """The share of base-linear FLOPs skipped, over every rank's rows (a collective with several ranks:
        every rank calls it at the same point, as ``Method.metrics`` is)."""
        from peft_lab import distributed

        flops = self.flops
        if distributed.current().distributed:
            parts = distributed.gather_objects(self.flops)
            flops = {k: [sum(p[k][i] for p in parts) for i in (0, 1)] for k in self.flops}

        def skipped(kinds):
            total = sum(flops[k][0] for k in kinds)
            return 1.0 - sum(flops[k][1] for k in kinds) / total if total else 0.0

        return {
            "sparselora_flops_skipped": skipped(["mlp", "attn"]),
            "sparselora_mlp_flops_skipped": skipped(["mlp"]),
            "sparselora_attn_flops_skipped": skipped(["attn"]),
        }


# ----------------------------------------------------------------------------- modules


@lru_cache(maxsize=1)
def module_classes() -> tuple[type, type, type]:
    """(SparseLinear, AttentionChannels, SparseLlamaMLP), defined on first use so that importing this
    module (to compose configs) needs no torch."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class SparseLinear(nn.Linear):
        """A frozen attention projection that computes only the selected output rows (``rows``: q, k, v)
        or input columns (``cols``: o) for context tokens; output tokens stay dense. The channels come
        from the layer's ``AttentionChannels``, chosen once per batch from the projection's input."""

        def __init__(self, linear: nn.Linear, channels: Any, controller: Controller, mode: str, role: str):
            nn.Module.__init__(self)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight, self.bias = linear.weight, linear.bias
            self.channels, self.controller, self.mode, self.role = channels, controller, mode, role

        def forward(self, x):
            ctl = self.controller
            shape = x.shape[:-1]
            n = x[..., 0].numel()
            dense_flops = n * self.in_features * self.out_features
            sel = None  # o's channels were chosen from q/k/v's input, earlier in the same batch
            if ctl.active:
                sel = self.channels.current("o") if self.role == "o" else self.channels.select(x, self.role)
            if sel is None:
                ctl.tally("attn", dense_flops, dense_flops)
                return F.linear(x, self.weight, self.bias)
            xf = x.reshape(n, self.in_features)
            k = sel.numel()
            if self.mode == "rows":
                w, b = self.weight.index_select(0, sel), None if self.bias is None else self.bias[sel]
            else:
                w, b = self.weight.index_select(1, sel), self.bias
            all_sparse = ctl.dense_rows.numel() == 0 and ctl.sparse_rows.numel() == n
            xs = xf if all_sparse else xf.index_select(0, ctl.sparse_rows)
            if self.mode == "rows":
                ys = xs.new_zeros(xs.shape[0], self.out_features).index_copy(1, sel, F.linear(xs, w, b))
                done = xs.shape[0] * self.in_features * k
            else:
                ys = F.linear(xs.index_select(1, sel), w, b)
                done = xs.shape[0] * k * self.out_features
            if all_sparse:
                out = ys
            else:
                yd = F.linear(xf.index_select(0, ctl.dense_rows), self.weight, self.bias)
                out = xf.new_zeros(n, self.out_features).index_copy(0, ctl.sparse_rows, ys)
                out = out.index_copy(0, ctl.dense_rows, yd)
                done += ctl.dense_rows.numel() * self.in_features * self.out_features
            ctl.tally("attn", dense_flops, done)
            return out.view(*shape, self.out_features)

    class AttentionChannels(nn.Module):
        """One layer's attention channel choice, made on the first projection call of each batch.

        Holds the SVD factors of q/k/v as non-persistent buffers (``svd``), or the attention module's
        projections to compute true q/k/v from (``oracle``; kept out of the module tree)."""

        def __init__(self, est: Optional[dict], attn: nn.Module, controller: Controller, sparsity: float, config):
            super().__init__()
            self.controller, self.sparsity = controller, sparsity
            self.oracle = est is None
            self._projections = [attn]  # a list, so the projections stay registered only under self_attn
            if est is not None:
                for key in ("q", "k", "v"):
                    a, b = est[key]
                    self.register_buffer(f"{key}_a", a, persistent=False)
                    self.register_buffer(f"{key}_b", b, persistent=False)
            self.n_heads = config.num_attention_heads
            self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
            self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
            self.keep_pairs = max(1, round((1.0 - sparsity) * self.head_dim / 2))
            self.keep_v = max(1, round((1.0 - sparsity) * self.head_dim))
            self.batch, self.sel = -1, {}

        def current(self, role: str) -> Optional[Any]:
            return self.sel.get(role) if self.batch == self.controller.batch else None

        def select(self, x: Any, role: str) -> Optional[Any]:
            """Channel indices of ``role`` (q, k, v) for this batch; None when nothing is sparse."""
            if self.sparsity <= 0:
                return None
            if self.batch != self.controller.batch:
                self.batch, self.sel = self.controller.batch, self._choose(x)
            return self.sel.get(role)

        def _out(self, xs: Any, key: str) -> Any:
            if self.oracle:  # the true projection (base + LoRA), all channels
                attn = self._projections[0]
                proj = getattr(attn, f"{key}_proj")
                return _dense_call(proj, xs)
            return (xs @ getattr(self, f"{key}_a").to(xs)) @ getattr(self, f"{key}_b").to(xs)

        @torch.no_grad()
        def _choose(self, x: Any) -> dict:
            xs = self.controller.context(x)
            if xs.shape[0] == 0 and not self.controller.shared:
                return {}
            n_kv, group, hd = self.n_kv, self.n_heads // self.n_kv, self.head_dim
            # per-channel L2 norms over the batch's context tokens (summed squares, over ranks when shared)
            sq = torch.cat([self._out(xs, key).float().pow(2).sum(0) for key in ("q", "k", "v")])
            qn, kn, vn = self.controller.scores(sq).sqrt().split([self.n_heads * hd, n_kv * hd, n_kv * hd])
            qn = qn.view(n_kv, group, hd).mean(1)
            qk = qn * kn.view(n_kv, hd)
            half = hd // 2
            pairs = (qk[:, :half] + qk[:, half:]).topk(self.keep_pairs, dim=1).indices  # RoPE rotates d with d+half
            dims_qk = torch.cat([pairs, pairs + half], dim=1).sort(dim=1).values  # [n_kv, 2*keep_pairs]
            vn = vn.view(n_kv, hd)
            dims_v = vn.topk(self.keep_v, dim=1).indices.sort(dim=1).values
            kv_base = (torch.arange(n_kv, device=x.device) * hd)[:, None]
            q_heads = torch.arange(self.n_heads, device=x.device).view(n_kv, group)  # query heads per KV head
            q_base = (q_heads * hd)[:, :, None]  # [n_kv, group, 1]
            return {
                "k": (kv_base + dims_qk).flatten(),
                "v": (kv_base + dims_v).flatten(),
                "q": (q_base + dims_qk[:, None, :]).flatten().sort().values,
                "o": (q_base + dims_v[:, None, :]).flatten().sort().values,
            }

    class SparseLlamaMLP(nn.Module):
        """A Llama MLP (down(act(gate(x)) * up(x))) whose context tokens go through the selected channels
        only, compactly: gate/up compute k rows, the k-wide activation feeds down's k columns (base and
        LoRA alike). Holds the original's gate_proj / up_proj / down_proj / act_fn as its own children
        (same names, so the adapter's keys are unchanged) and the SVD factors of gate and up as
        non-persistent buffers. Input and output: [batch, seq, hidden]."""

        def __init__(self, mlp: nn.Module, est: Optional[dict], controller: Controller, sparsity: float):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
                mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
            )  # fmt: skip
            self.controller, self.sparsity, self.oracle = controller, sparsity, est is None
            if est is not None:
                for key in ("gate", "up"):
                    a, b = est[key]
                    self.register_buffer(f"{key}_a", a, persistent=False)
                    self.register_buffer(f"{key}_b", b, persistent=False)
            self.hidden = _base(mlp.gate_proj).in_features
            self.inter = _base(mlp.gate_proj).out_features
            self.keep = max(1, round((1.0 - sparsity) * self.inter))

        def dense(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

        @torch.no_grad()
        def channels(self, xs: Any) -> Any:
            """The kept intermediate channels (sorted indices, [keep]) for context tokens ``xs`` [tokens, hidden]."""
            if self.oracle:
                act = F.silu(_dense_call(self.gate_proj, xs)) * _dense_call(self.up_proj, xs)
            else:
                gate = (xs @ self.gate_a.to(xs)) @ self.gate_b.to(xs)
                act = F.silu(gate) * ((xs @ self.up_a.to(xs)) @ self.up_b.to(xs))
            sq = self.controller.scores(act.float().pow(2).sum(0))  # squared L2 norms (global batch if shared)
            return sq.topk(self.keep).indices.sort().values

        def forward(self, x):
            ctl = self.controller
            xf = x.reshape(-1, self.hidden)
            n = xf.shape[0]
            dense_cost = 3 * n * self.hidden * self.inter
            if not ctl.active or self.sparsity <= 0:
                ctl.tally("mlp", dense_cost, dense_cost)
                return self.dense(x)
            all_sparse = ctl.sparse_rows.numel() == n
            xs = xf if all_sparse else xf.index_select(0, ctl.sparse_rows)
            if xs.shape[0] == 0 and not ctl.shared:
                ctl.tally("mlp", dense_cost, dense_cost)
                return self.dense(x)
            sel = self.channels(xs)  # shared: every rank chooses (and joins the all_reduce), even with no token
            act = self.act_fn(_linear_rows(self.gate_proj, xs, sel)) * _linear_rows(self.up_proj, xs, sel)
            ys = _linear_cols(self.down_proj, act, sel)
            done = 3 * xs.shape[0] * self.hidden * self.keep
            if all_sparse:
                ctl.tally("mlp", dense_cost, done)
                return ys.view(x.shape)
            yd = self.dense(xf.index_select(0, ctl.dense_rows))
            ctl.tally("mlp", dense_cost, done + 3 * yd.shape[0] * self.hidden * self.inter)
            out = ys.new_empty(n, self.hidden).index_copy(0, ctl.sparse_rows, ys).index_copy(0, ctl.dense_rows, yd)
            return out.view(x.shape)

    return SparseLinear, AttentionChannels, SparseLlamaMLP


def layer_costs(config: Any) -> dict[str, int]:
    """Multiply-adds per token of one decoder layer's base linears: {"mlp": 3 h I, "attn": h (2 q + 2 kv)}
    (h hidden size, I intermediate size, q / kv the query / key-value widths)."""
    h, inter = config.hidden_size, config.intermediate_size
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    hd = getattr(config, "head_dim", None) or h // n_heads
    return {"mlp": 3 * h * inter, "attn": h * (2 * n_heads * hd + 2 * n_kv * hd)}


def _dense_call(module: Any, x: Any) -> Any:
    """``module(x)`` for a projection whose base may be a ``SparseLinear``: computed dense."""
    import torch.nn.functional as F

    base = _base(module)
    y = F.linear(x, base.weight, base.bias)
    for a, b, scale, _ in _lora_parts(module):  # no dropout: what the layer computes, for choosing channels
        y = y + F.linear(F.linear(x, a), b) * scale
    return y


def _swap_base(parent: Any, attr: str, channels: Any, controller: Controller, mode: str, role: str) -> Any:
    """Replace parent.attr's frozen linear (or a LoRA layer's base_layer) by a SparseLinear."""
    _check_plain_base(parent, attr)
    module = getattr(parent, attr)
    owner, name = (module, "base_layer") if hasattr(module, "base_layer") else (parent, attr)
    sparse = module_classes()[0](getattr(owner, name), channels, controller, mode, role)
    setattr(owner, name, sparse)
    return sparse


def _base(module: Any) -> Any:
    return module.base_layer if hasattr(module, "base_layer") else module


def _base_weight(module: Any) -> Any:
    return _base(module).weight


def _check_plain_base(parent: Any, attr: str) -> None:
    import torch.nn as nn

    base = _base(getattr(parent, attr))
    if not isinstance(base, nn.Linear) or type(base).__name__ not in ("Linear", "SparseLinear"):
        raise fail(
            f"SparseLoRA needs plain linear base layers, got {type(base).__name__} at {attr}",
            "do not combine SparseLoRA with quantisation or other adapters on the same layer",
        )


def _lora_parts(module: Any) -> list:
    """(A weight, B weight, scaling, dropout) of each active plain-LoRA adapter on ``module`` (none if untargeted)."""
    if not hasattr(module, "lora_A") or getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return []
    return [
        (module.lora_A[a].weight, module.lora_B[a].weight, module.scaling[a], module.lora_dropout[a])
        for a in module.active_adapters
        if a in module.lora_A
    ]


def _linear_rows(module: Any, x: Any, sel: Any) -> Any:
    """module(x)[:, sel], computing only those output rows (base and LoRA)."""
    import torch.nn.functional as F

    base = _base(module)
    y = F.linear(x, base.weight.index_select(0, sel), None if base.bias is None else base.bias[sel])
    for a, b, scale, drop in _lora_parts(module):
        y = y + F.linear(F.linear(drop(x), a), b.index_select(0, sel)) * scale
    return y


def _linear_cols(module: Any, x: Any, sel: Any) -> Any:
    """module(z) where z is zero outside the input columns ``sel`` and ``x`` holds those columns."""
    import torch.nn.functional as F

    base = _base(module)
    y = F.linear(x, base.weight.index_select(1, sel), base.bias)
    for a, b, scale, drop in _lora_parts(module):
        y = y + F.linear(F.linear(drop(x), a.index_select(1, sel)), b) * scale
    return y


# ----------------------------------------------------------------------------- model structure


def decoder_layers(model: Any) -> list:
    """Llama-style decoder layers, in order: modules with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj."""
    found = []
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in root.modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if attn is None or mlp is None:
            continue
        if all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
            hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")
        ):
            found.append(module)
    return found


def build_estimators(layers: list, rank: int) -> list[dict]:
    """Rank-r SVD factors (A_est [in, r], B_est [r, out]) of gate, up, q, k, v per layer, so that
    x @ A_est @ B_est ~ x @ W^T; cached on disk per model (a digest of the weights)."""
    import torch

    from peft_lab.models import cache_root

    names = {
        "gate": ("mlp", "gate_proj"),
        "up": ("mlp", "up_proj"),
        "q": ("self_attn", "q_proj"),
        "k": ("self_attn", "k_proj"),
        "v": ("self_attn", "v_proj"),
    }
    weights = [{k: _base_weight(getattr(getattr(layer, a), p)) for k, (a, p) in names.items()} for layer in layers]
    digest = hashlib.sha1(str(rank).encode())
    for w in weights:
        for t in w.values():
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    path = cache_root() / "sparselora" / f"svd-r{rank}-{digest.hexdigest()[:16]}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    estimators = []
    with torch.no_grad():
        for w in weights:
            est = {}
            for key, t in w.items():
                u, s, vh = torch.linalg.svd(t.detach().float().cpu(), full_matrices=False)
                root = s[:rank].sqrt()
                est[key] = ((vh[:rank].T * root).contiguous(), (root[:, None] * u[:, :rank].T).contiguous())
            estimators.append(est)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{id(estimators)}.tmp")
    torch.save(estimators, tmp)
    tmp.replace(path)
    return estimators


def wrap_layer(layer: Any, est: Optional[dict], ctl: Controller, mlp_s: float, attn_s: float, config: Any) -> None:
    """Give one decoder layer its sparse modules: ``SparseLlamaMLP`` in place of ``layer.mlp`` when
    ``mlp_s`` > 0, ``SparseLinear`` bases on q/k/v/o sharing one ``AttentionChannels`` when ``attn_s`` > 0.
    ``est``: the layer's SVD factors, or None for the oracle selector. Dense layers stay untouched."""
    sparse_linear, attention_channels, sparse_mlp = module_classes()
    mlp, attn = layer.mlp, layer.self_attn
    for proj in ("gate_proj", "up_proj", "down_proj"):
        _check_plain_base(mlp, proj)
    if attn_s > 0:
        channels = attention_channels(est, attn, ctl, attn_s, config)
        attn.sparselora_channels = channels  # a child of the attention: moved and copied with it
        for proj, mode in (("q_proj", "rows"), ("k_proj", "rows"), ("v_proj", "rows"), ("o_proj", "cols")):
            _swap_base(attn, proj, channels, ctl, mode, proj[0])
    if mlp_s > 0:
        layer.mlp = sparse_mlp(mlp, est, ctl, mlp_s)
