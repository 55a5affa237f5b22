"""SparseLoRA (Khaki et al., ICML 2025): contextual sparsity in the frozen base computation.

LoRA stays dense; what shrinks is the frozen base weights' work, chosen per batch:

* A training-free estimator per layer: a rank-r truncated SVD of each frozen weight
  (W ~ B_est A_est with A_est = V sqrt(S), B_est = sqrt(S) U^T), computed once per
  model and cached on disk.
* MLP: gate/up estimated from the layer input; each intermediate channel scored by the
  L2 norm over the batch's context tokens of SiLU(gate_hat) * up_hat; the top (1 - s)
  channels kept: gate/up compute only those output rows, down only those input columns.
* Attention: Q/K channels scored by |q_hat| * |k_hat| (averaged over the query heads of
  each KV group; RoPE pairs kept together), V/O channels by |v_hat|.
* One channel set per batch and layer; early and last layers dense; the first
  ``warmup_frac`` of the steps dense; output tokens (labels != -100 for causal LM, the
  pooled last token for classification) computed densely, context tokens sparsely.

The MLP of each adapted layer gets its own forward (on that instance only): context tokens go
through the selected channels compactly (gate/up compute k rows, the k-wide activation feeds
down's k columns, base and LoRA alike), so the smaller matmuls are all that run. Attention
projections are wrapped in a ``SparseLinear`` sharing the frozen weight. No library class is
patched. Evaluation is dense by default (SparseLoRA accelerates fine-tuning). The share
of base-linear FLOPs skipped is measured while training and reported.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, Optional

from peft_lab.errors import fail
from peft_lab.methods import lora
from peft_lab.schemas import plain

log = logging.getLogger(__name__)
NAME = "sparselora"


@dataclass
class Config(lora.Config):
    """SparseLoRA's own keys; the LoRA keys and their defaults come from ``lora.Config``."""

    name: str = NAME
    mlp_sparsity: float = 0.5  # fraction of MLP intermediate channels skipped in sparse layers
    attn_sparsity: float = 0.0  # fraction of Q/K and V/O channels skipped in sparse layers (see the yaml)
    layer_sparsity: Dict[str, float] = field(default_factory=dict)  # per-layer MLP override {"5": 0.9}
    dense_first_layers: int = 2
    dense_last_layers: int = 1
    estimator_rank: int = 8
    warmup_frac: float = 0.05  # the first steps run dense
    dense_output_tokens: bool = True
    sparse_eval: bool = False


class Method(lora.Method):
    name = NAME

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.controller = Controller()
        self.layer_counts: Optional[tuple[int, int]] = None  # (sparse layers, all layers), set by adapt
        self.warnings: list[str] = []

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        for key in ("mlp_sparsity", "attn_sparsity", "warmup_frac"):
            if not 0.0 <= getattr(c, key) < 1.0:
                raise fail(f"method.{key}={getattr(c, key)} is outside [0, 1)", "give a fraction such as 0.5")
        tasks = {plain(t) for t in self.model_cfg.tasks}
        if self.task == "masked_lm" or ("masked_lm" in tasks and "causal_lm" not in tasks):
            raise fail(
                f"SparseLoRA serves Llama-style decoders; model '{self.model_cfg.name}' is an encoder",
                "use method=lora (or hira/qlora/sparse) on this model, or a Llama-family model",
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
        config = model.get_base_model().config
        estimators = build_estimators(layers, self.cfg.estimator_rank)
        n = len(layers)
        for i, layer in enumerate(layers):
            dense = i < self.cfg.dense_first_layers or i >= n - self.cfg.dense_last_layers
            mlp_s = 0.0 if dense else float(self.cfg.layer_sparsity.get(str(i), self.cfg.mlp_sparsity))
            attn_s = 0.0 if dense else self.cfg.attn_sparsity
            wrap_layer(layer, estimators[i], self.controller, mlp_s, attn_s, config)
        log.info(
            f"SparseLoRA: {n} layers, dense {self.cfg.dense_first_layers} first / "
            f"{self.cfg.dense_last_layers} last; MLP sparsity {self.cfg.mlp_sparsity}, "
            f"attention {self.cfg.attn_sparsity}"
        )
        self._check_sparse_layers(n)
        return model

    def _check_sparse_layers(self, n: int) -> None:
        """Record how many layers run sparse; warn when the dense-layer settings leave none."""
        first, last = self.cfg.dense_first_layers, self.cfg.dense_last_layers
        sparse = sum(1 for i in range(n) if not (i < first or i >= n - last))
        self.layer_counts, self.warnings = (sparse, n), []
        if sparse == 0:
            msg = (
                f"SparseLoRA has no sparse layer: method.dense_first_layers={first} + "
                f"method.dense_last_layers={last} cover all {n} layers of model '{self.model_cfg.name}', "
                f"so it runs as plain dense LoRA. Fix: lower them so that dense_first_layers + "
                f"dense_last_layers < {n} (e.g. method.dense_first_layers=0 method.dense_last_layers=0)"
            )
            log.warning(msg)
            self.warnings.append(msg)

    def before_forward(self, batch: dict, step: int, total: int, training: bool) -> None:
        active = (training or self.cfg.sparse_eval) and step >= int(self.cfg.warmup_frac * total)
        self.controller.begin(batch, self.task, active, self.cfg.dense_output_tokens, count=training)

    def metrics(self, model: Any) -> dict[str, Any]:
        """FLOP shares skipped (fractions 0..1); after ``adapt`` also the sparse / total layer counts
        and ``sparselora_warnings`` (a list of messages, empty when none)."""
        out = self.controller.report()
        if self.layer_counts is not None:
            out["sparselora_sparse_layers"], out["sparselora_layers"] = self.layer_counts
            out["sparselora_warnings"] = list(self.warnings)
        return out


# ----------------------------------------------------------------------------- per-batch state


class Controller:
    """Which tokens are dense in this batch, whether sparsity is on, and the FLOP tally."""

    def __init__(self) -> None:
        self.active = False
        self.count = False
        self.sparse_rows: Optional[Any] = None
        self.dense_rows: Optional[Any] = None
        self.flops = {"mlp": [0, 0], "attn": [0, 0]}  # kind -> [dense-equivalent, computed]

    def begin(self, batch: dict, task: str, active: bool, dense_outputs: bool, count: bool) -> None:
        import torch

        self.active, self.count = active, count
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

    def tally(self, kind: str, dense_flops: int, done_flops: int) -> None:
        if self.count:
            self.flops[kind][0] += dense_flops
            self.flops[kind][1] += done_flops

    def report(self) -> dict[str, Any]:
        def skipped(kinds):
            total = sum(self.flops[k][0] for k in kinds)
            return 1.0 - sum(self.flops[k][1] for k in kinds) / total if total else 0.0

        return {
            "sparselora_flops_skipped": skipped(["mlp", "attn"]),
            "sparselora_mlp_flops_skipped": skipped(["mlp"]),
            "sparselora_attn_flops_skipped": skipped(["attn"]),
        }


# ----------------------------------------------------------------------------- sparse linear


@lru_cache(maxsize=1)
def sparse_linear_class() -> type:
    """Defined on first use, so importing this module (to compose configs) needs no torch."""
    import torch.nn as nn
    import torch.nn.functional as F

    class SparseLinear(nn.Linear):
        """A frozen linear layer that computes only the selected output rows (``rows``) or
        input columns (``cols``) for context tokens; output tokens stay dense."""

        def forward(self, x):
            sel, ctl = self.sel, self.controller
            shape = x.shape[:-1]
            n = x[..., 0].numel()
            dense_flops = n * self.in_features * self.out_features
            if sel is None or not ctl.active:
                ctl.tally(self.kind, dense_flops, dense_flops)
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
            ctl.tally(self.kind, dense_flops, done)
            return out.view(*shape, self.out_features)

    return SparseLinear


def _new_sparse_linear(linear: Any, controller: Controller, mode: str, kind: str) -> Any:
    import torch.nn as nn

    cls = sparse_linear_class()
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.in_features, new.out_features = linear.in_features, linear.out_features
    new.weight, new.bias = linear.weight, linear.bias
    new.controller, new.mode, new.kind, new.sel = controller, mode, kind, None
    return new


def _swap_base(parent: Any, attr: str, controller: Controller, mode: str, kind: str) -> Any:
    """Replace parent.attr's frozen linear (or a LoRA layer's base_layer) by a SparseLinear."""
    _check_plain_base(parent, attr)
    module = getattr(parent, attr)
    owner, name = (module, "base_layer") if hasattr(module, "base_layer") else (parent, attr)
    sparse = _new_sparse_linear(getattr(owner, name), controller, mode, kind)
    setattr(owner, name, sparse)
    return sparse


def _base(module: Any) -> Any:
    return module.base_layer if hasattr(module, "base_layer") else module


def _base_weight(module: Any) -> Any:
    return _base(module).weight


def _check_plain_base(parent: Any, attr: str) -> None:
    import torch.nn as nn

    base = _base(getattr(parent, attr))
    if type(base) is not nn.Linear:
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
    for module in model.get_base_model().modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if attn is None or mlp is None:
            continue
        if all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
            hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")
        ):
            found.append(module)
    return found


def build_estimators(layers: list, rank: int) -> list[dict]:
    """Rank-r SVD factors (A_est, B_est) of gate, up, q, k, v per layer; cached on disk per model."""
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


def wrap_layer(layer: Any, est: dict, ctl: Controller, mlp_s: float, attn_s: float, config: Any) -> None:
    """SparseLinear on the layer's seven projections, and the per-batch channel selection hooks."""
    import torch
    import torch.nn.functional as F

    mlp, attn = layer.mlp, layer.self_attn
    for proj in ("gate_proj", "up_proj", "down_proj"):
        _check_plain_base(mlp, proj)
    q, k = _swap_base(attn, "q_proj", ctl, "rows", "attn"), _swap_base(attn, "k_proj", ctl, "rows", "attn")
    v, o = _swap_base(attn, "v_proj", ctl, "rows", "attn"), _swap_base(attn, "o_proj", ctl, "cols", "attn")
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    group = n_heads // n_kv
    hidden, inter = config.hidden_size, _base(mlp.gate_proj).out_features
    keep_mlp = max(1, round((1.0 - mlp_s) * inter))
    keep_pairs = max(1, round((1.0 - attn_s) * head_dim / 2))
    keep_v = max(1, round((1.0 - attn_s) * head_dim))

    def context(x):
        xf = x.reshape(-1, x.shape[-1])
        return xf if ctl.sparse_rows.numel() == xf.shape[0] else xf.index_select(0, ctl.sparse_rows)

    def est_out(xs, key):
        a, b = est[key]
        return (xs @ a.to(xs)) @ b.to(xs)

    dense_mlp = mlp.forward  # the model's own (bound) forward: dense steps, dense tokens

    def sparse_mlp(x):
        """Context tokens through only the selected channels, compactly: gate/up compute k rows,
        the k-wide activation goes straight into down's k columns (no full-width scatter/gather)."""
        xf = x.reshape(-1, hidden)
        n = xf.shape[0]
        dense_cost = 3 * n * hidden * inter
        if not ctl.active or mlp_s <= 0:
            ctl.tally("mlp", dense_cost, dense_cost)
            return dense_mlp(x)
        all_sparse = ctl.sparse_rows.numel() == n
        xs = xf if all_sparse else xf.index_select(0, ctl.sparse_rows)
        if xs.shape[0] == 0:
            ctl.tally("mlp", dense_cost, dense_cost)
            return dense_mlp(x)
        with torch.no_grad():
            score = (F.silu(est_out(xs, "gate")) * est_out(xs, "up")).norm(dim=0)
            sel = score.topk(keep_mlp).indices.sort().values
        act = mlp.act_fn(_linear_rows(mlp.gate_proj, xs, sel)) * _linear_rows(mlp.up_proj, xs, sel)
        ys = _linear_cols(mlp.down_proj, act, sel)
        done = 3 * xs.shape[0] * hidden * keep_mlp
        if all_sparse:
            ctl.tally("mlp", dense_cost, done)
            return ys.view(x.shape)
        yd = dense_mlp(xf.index_select(0, ctl.dense_rows))
        ctl.tally("mlp", dense_cost, done + 3 * yd.shape[0] * hidden * inter)
        out = ys.new_empty(n, hidden).index_copy(0, ctl.sparse_rows, ys).index_copy(0, ctl.dense_rows, yd)
        return out.view(x.shape)

    def attn_hook(module, args, kwargs):
        q.sel = k.sel = v.sel = o.sel = None
        if not ctl.active or attn_s <= 0:
            return
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with torch.no_grad():
            xs = context(x)
            if xs.shape[0] == 0:
                return
            qn = est_out(xs, "q").norm(dim=0).view(n_kv, group, head_dim).mean(1)
            kn = est_out(xs, "k").norm(dim=0).view(n_kv, head_dim)
            qk = qn * kn
            half = head_dim // 2
            pairs = (qk[:, :half] + qk[:, half:]).topk(keep_pairs, dim=1).indices  # RoPE rotates d with d+half
            dims_qk = torch.cat([pairs, pairs + half], dim=1).sort(dim=1).values  # [n_kv, 2*keep_pairs]
            dims_v = est_out(xs, "v").norm(dim=0).view(n_kv, head_dim).topk(keep_v, dim=1).indices.sort(dim=1).values
            kv_base = (torch.arange(n_kv, device=x.device) * head_dim)[:, None]
            q_heads = torch.arange(n_heads, device=x.device).view(n_kv, group)  # query heads per KV head
            q_base = (q_heads * head_dim)[:, :, None]  # [n_kv, group, 1]
            k.sel = (kv_base + dims_qk).flatten()
            v.sel = (kv_base + dims_v).flatten()
            q.sel = (q_base + dims_qk[:, None, :]).flatten().sort().values
            o.sel = (q_base + dims_v[:, None, :]).flatten().sort().values

    mlp.forward = sparse_mlp  # this instance only; the class is untouched
    attn.register_forward_pre_hook(attn_hook, with_kwargs=True)
