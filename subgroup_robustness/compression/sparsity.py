"""One-shot pruning of the fine-tuned model's Linear weights, with calibration data: Wanda, SparseGPT and
N:M magnitude pruning. One-shot is the point of these methods, so by default nothing is re-trained
(``refit=false``, ``trains=False``); ``refit=true`` re-fine-tunes with the masks kept on
(``torch.nn.utils.prune`` masks, baked in by ``finalize`` as ``MagnitudePruning`` does).

- ``Wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"): a
  weight's score is ``|W_ij| * ||X_j||_2``, the norm of its input feature over all calibration tokens
  (padding excluded); weights are compared within each output row (each row loses the same share), or
  within each group of M inputs for N:M. No weight update.
- ``SparseGPT`` (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot"): layer-wise optimal-brain-surgeon reconstruction with the calibration Hessian
  ``H = 2 X X^T / n`` (dampened by ``dampening`` x mean diag), its inverse's upper Cholesky factor,
  columns processed in blocks of ``blocksize`` with lazy batch updates of the later columns; the mask is
  chosen adaptively per block (the ``sparsity`` share of the block's lowest ``w^2 / [H^-1]_jj^2``; for
  N:M, per group of M columns of each row) and the remaining weights are updated to compensate.
- ``OneShotMagnitude``: the smallest ``|W|`` per row, or per group of M inputs (``mag24``): the
  calibration-free baseline of both.

Calibration (Wanda, SparseGPT): ``calibration: {source, examples, seed}`` draws training examples through
``data.calibration`` (natural | group_balanced | worst_group). The transformer layers are pruned in
order, each layer's statistics taken from the model whose earlier layers are already pruned, as both
references do (one forward pass per layer, stopped after that layer; the Linears outside the layers,
with ``scope=all``, come last).

Patterns: ``unstructured`` at ``sparsity``, or ``"N:M"``: in every group of M consecutive input weights
of a row exactly N are kept (``2:4``: sparsity 0.5). Scope: the encoder's Linears (default; pooler and
classifier untouched) or ``all``. The zeros are stored densely: on CPU (and in this experiment) a 2:4
model runs as a dense model with the mask applied; only a GPU with 2:4 kernels (``torch.sparse
.to_sparse_semi_structured``) would run it semi-structured, which this code does not do.
"""

from __future__ import annotations

import abc
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.context import CompressionContext, Compressed
from subgroup_robustness.models.structure import encoder, layer_stack, model_inputs
from subgroup_robustness.utils.errors import ConfigError

SCOPES = ("encoder", "all")
CPU_NOTE = ("zeros stored densely; evaluated as a dense model with the mask applied (no semi-structured "
            "sparse kernel is used, on CPU or GPU)")


# ---- patterns -------------------------------------------------------------------------------------------
def parse_pattern(pattern: Any, sparsity: Any, what: str) -> tuple[float, tuple[int, int] | None]:
    """(sparsity, (N, M) or None) from ``pattern`` ('unstructured' or 'N:M') and ``sparsity``; an N:M
    pattern fixes the sparsity at 1 - N/M (``sparsity`` may be null or must agree)."""
    text = str(pattern).strip().lower()
    if text == "unstructured":
        try:
            value = float(sparsity)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: sparsity={sparsity!r} is not a number; give a fraction in [0, 1)") from None
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{what}: sparsity={sparsity} must be in [0, 1), e.g. 0.5")
        return value, None
    parts = text.split(":")
    try:
        n, m = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: pattern={pattern!r}; use 'unstructured' or 'N:M' (keep N of every M "
                          "consecutive input weights), e.g. '2:4'") from None
    if not 0 < n < m:
        raise ConfigError(f"{what}: pattern={pattern!r} must keep 0 < N < M weights of every M")
    implied = 1.0 - n / m
    if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
        raise ConfigError(f"{what}: pattern {n}:{m} means sparsity {implied:g}, but sparsity={sparsity}; "
                          f"set sparsity={implied:g} (or null)")
    return implied, (n, m)


def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the ``int(in_features * sparsity)`` lowest scores of every output row."""
    rows, cols = scores.shape
    k = int(cols * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    return keep


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly the ``n`` highest scores of every group of ``m`` consecutive inputs of a row."""
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"N:M pruning: {cols} input features are not a multiple of M={m}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of ``m`` consecutive input weights of a row with more than ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return rows * -(-cols // m)
    return int(((weight.reshape(rows, cols // m, m) != 0).sum(-1) > n).sum())


# ---- the three criteria ---------------------------------------------------------------------------------
Pattern = tuple[int, int] | None  # (N, M) of an N:M pattern, None for unstructured


def magnitude_prune(weight: torch.Tensor, sparsity: float, nm: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    scores = weight.detach().abs().float()
    keep = nm_keep_mask(scores, *nm) if nm else row_keep_mask(scores, sparsity)
    return weight.detach() * keep, keep


def wanda_prune(weight: torch.Tensor, sq_norms: torch.Tensor, sparsity: float,
                nm: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda: scores ``|W_ij| * ||X_j||_2`` (``sq_norms``: the squared input norm of every input feature),
    compared per output row (or per N:M group); the kept weights are unchanged."""
    scores = weight.detach().abs().float() * sq_norms.float().to(weight.device).sqrt().reshape(1, -1)
    keep = nm_keep_mask(scores, *nm) if nm else row_keep_mask(scores, sparsity)
    return weight.detach() * keep, keep


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: Pattern,
                    blocksize: int = 128, dampening: float = 0.01
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """SparseGPT on one Linear: the pruned and reconstructed weight, its keep-mask, and figures (the
    damping used, the relative reconstruction error ``tr(D H D^T) / tr(W H W^T)`` with ``D = W - W'``)."""
    W = weight.detach().clone().float()
    rows, cols = W.shape
    H = hessian.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    base = H.clone()
    damp = float(dampening) * float(torch.mean(torch.diag(H)))
    for attempt in range(6):  # not positive definite after dampening: dampen 10x more
        try:
            L = torch.linalg.cholesky(H + damp * torch.eye(cols, device=H.device))
            U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            break
        except RuntimeError:
            if attempt == 5:
                raise
            damp = max(damp * 10.0, 1e-8)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        P1 = torch.zeros_like(W1, dtype=torch.bool)
        Err1 = torch.zeros_like(W1)
        if nm is None:
            k = int(W1.numel() * sparsity)
            if k:  # the block's lowest saliencies w^2 / [H^-1]_jj^2, over all its rows
                P1.view(-1)[(W1 ** 2 / d.reshape(1, -1) ** 2).flatten().topk(k, largest=False).indices] = True
        for i in range(count):
            if nm is not None and i % nm[1] == 0:
                span = slice(i, i + nm[1])
                score = W1[:, span] ** 2 / d[span].reshape(1, -1) ** 2
                P1[:, span].scatter_(1, score.topk(nm[1] - nm[0], dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(P1[:, i], torch.zeros_like(w), w)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W1[P1] = 0.0
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        pruned[:, i1:i2] = P1
    W[pruned] = 0.0
    original = weight.detach().float().to(W.device)
    delta = original - W
    denom = float(torch.einsum("ij,jk,ik->", original, base, original))
    rel = float(torch.einsum("ij,jk,ik->", delta, base, delta)) / denom if denom > 0 else 0.0
    return W.to(weight.dtype), ~pruned, {"damping": damp, "relative_error": rel}


# ---- targets and calibration passes ------------------------------------------------------------------
def prunable_linears(model: nn.Module, scope: str = "encoder") -> list[tuple[str, nn.Linear]]:
    """(fqn, Linear) pruned: the transformer layers' Linears (``encoder``) or every Linear (``all``)."""
    if scope not in SCOPES:
        raise ConfigError(f"one-shot pruning: scope={scope!r}; use one of {list(SCOPES)}")
    inside = {id(m) for m in encoder(model).modules()} if scope == "encoder" else None
    return [(fqn, m) for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear) and (inside is None or id(m) in inside)]


Targets = list[tuple[str, nn.Linear]]


def layer_groups(model: nn.Module, targets: Sequence[tuple[str, nn.Linear]]) -> list[tuple[nn.Module | None, Targets]]:
    """The targets per transformer layer in layer order, then those outside every layer (layer None)."""
    layers = list(layer_stack(model)[2])
    owner: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for m in layer.modules():
            owner[id(m)] = i
    groups: list[list[tuple[str, nn.Linear]]] = [[] for _ in layers]
    rest = []
    for fqn, m in targets:
        (groups[owner[id(m)]] if id(m) in owner else rest).append((fqn, m))
    out: list[tuple[nn.Module | None, list]] = [(layers[i], g) for i, g in enumerate(groups) if g]
    if rest:
        out.append((None, rest))
    return out


class _Stop(Exception):
    """Raised after the layer being calibrated: the rest of the forward pass is not needed."""


def observe_inputs(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                   modules: Sequence[tuple[str, nn.Module]],
                   observe: Callable[[str, torch.Tensor], None], stop_after: nn.Module | None = None) -> int:
    """Run ``batches`` through ``model`` (eval, no grad) and call ``observe(fqn, rows)`` with each module's
    input as (tokens, features) rows, padding tokens left out; stop each pass after ``stop_after``.
    Returns the number of examples seen. Hooks are removed whatever happens."""
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(fqn):
        def pre(mod, args):
            x = args[0].detach()
            mask = state["mask"]
            if x.ndim == 3 and mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
                rows = x[mask]
            else:
                rows = x.reshape(-1, x.shape[-1])
            observe(fqn, rows)
        return pre

    def stop(mod, args, output):
        raise _Stop

    handles = [m.register_forward_pre_hook(hook(fqn)) for fqn, m in modules]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = model_inputs(batch, device)
                state["mask"] = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
                try:
                    model(**inputs)
                except _Stop:
                    pass
                seen += int(batch["input_ids"].shape[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def sparsity_of(targets: Sequence[tuple[str, nn.Module]]) -> float:
    zeros = sum(int((m.weight == 0).sum()) for _, m in targets)
    total = sum(m.weight.numel() for _, m in targets)
    return zeros / total if total else 0.0


# ---- compressors ------------------------------------------------------------------------------------
class _OneShot(Compressor, abc.ABC):
    """Shared by the one-shot pruners: targets, masks, refit, finalize, report."""

    family = "pruning"
    stage = "after"
    start_from = "finetuned"
    quantizes = False
    eval_on_cpu = False
    calibrates: bool = True
    criterion: str = ""

    def __init__(self, sparsity: float | None = 0.5, pattern: str = "unstructured", scope: str = "encoder",
                 refit: bool = False, calibration: Mapping[str, Any] | None = None):
        what = self.name
        self.sparsity, self._nm = parse_pattern(pattern, sparsity, what)
        self.pattern = "unstructured" if self._nm is None else f"{self._nm[0]}:{self._nm[1]}"
        if scope not in SCOPES:
            raise ConfigError(f"{what}: scope={scope!r}; use one of {list(SCOPES)}")
        self.scope = scope
        if not isinstance(refit, bool):
            raise ConfigError(f"{what}: refit={refit!r} must be true or false")
        self.refit = refit
        if self.calibrates:
            from subgroup_robustness.data.calibration import check_calibration

            self.calibration = check_calibration(calibration, what)
        self._pruned: list[tuple[str, nn.Linear]] = []
        self._extra: dict[str, Any] = {}

    @property
    def trains(self) -> bool:  # type: ignore[override]
        """Re-fine-tune after pruning only with ``refit=true`` (the masks stay on)."""
        return self.refit

    # -- the method ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def prune_group(self, group: list[tuple[str, nn.Linear]], stats: dict[str, Any]) -> dict[str, Any]:
        """Prune the Linears of one group in place (from ``statistics``' calibration figures); return what
        the report records of them. Each method (magnitude, Wanda, SparseGPT) defines its own."""

    def statistics(self, model, batches, group, stop_after) -> dict[str, Any]:
        return {}

    def apply(self, ctx: CompressionContext) -> Compressed:
        model = ctx.model
        targets = prunable_linears(model, self.scope)
        if self._nm is not None:
            bad = [fqn for fqn, m in targets if m.in_features % self._nm[1]]
            if bad:
                raise ConfigError(f"{self.name}: {self.pattern} needs input features divisible by {self._nm[1]}; "
                                  f"{', '.join(bad[:3])} are not")
        t0 = time.perf_counter()
        figures: dict[str, Any] = {}
        if self.calibrates:
            from subgroup_robustness.data.calibration import calibration_from_spec

            batches, record = calibration_from_spec(ctx.data, self.calibration, int(ctx.seed))
            if not batches:
                raise ConfigError(f"{self.name}: no calibration examples were drawn ({record})")
            self._extra["calibration"] = record
            for layer, group in layer_groups(model, targets):
                stats = self.statistics(model, batches, group, layer)
                figures.update(self.prune_group(group, stats))
        else:
            figures.update(self.prune_group(targets, {}))
        self._extra["calibration_s" if self.calibrates else "prune_s"] = time.perf_counter() - t0
        if figures:
            self._extra["per_linear"] = figures
        self._pruned = list(targets)
        return Compressed(model)

    def _set(self, module: nn.Linear, weight: torch.Tensor, keep: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_((weight * keep).to(module.weight.dtype))
        if self.refit:  # the masks stay on while re-fine-tuning (weight = weight_orig * mask)
            prune.custom_from_mask(module, "weight", keep.to(module.weight.device))

    def finalize(self, ctx: CompressionContext) -> None:
        """Bake the masks (refit=true) into the weights: a plain model again."""
        for _, module in self._pruned:
            if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
                prune.remove(module, "weight")
        return None

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        targets = prunable_linears(ctx.model, self.scope)
        out: dict[str, Any] = {
            "criterion": self.criterion,
            "pattern": self.pattern,
            "sparsity_target": self.sparsity,
            "sparsity": sparsity_of(targets),
            "pruned_linears": len(targets),
            "pruned_weights": sum(m.weight.numel() for _, m in targets),
            "refit": self.refit,
            "storage": CPU_NOTE,
        }
        if self._nm is not None:
            out["nm_violations"] = sum(nm_violations(m.weight.detach(), *self._nm) for _, m in targets)
        out.update({k: v for k, v in self._extra.items() if k != "per_linear"})
        per = self._extra.get("per_linear") or {}
        errors = [v["relative_error"] for v in per.values() if isinstance(v, dict) and "relative_error" in v]
        if errors:
            out["relative_reconstruction_error_mean"] = sum(errors) / len(errors)
            out["per_linear"] = per
        return out


class OneShotMagnitude(_OneShot):
    """Smallest |W| per output row, or per group of M inputs (mag24): the calibration-free baseline."""

    name = "magnitude_oneshot"
    calibrates = False
    criterion = "|W| (per output row; per group of M inputs for N:M)"

    def __init__(self, sparsity: float | None = 0.5, pattern: str = "2:4", scope: str = "encoder",
                 refit: bool = False):
        super().__init__(sparsity, pattern, scope, refit, None)

    def prune_group(self, group, stats):
        for _, m in group:
            w, keep = magnitude_prune(m.weight, self.sparsity, self._nm)
            self._set(m, w, keep)
        return {}


class Wanda(_OneShot):
    """Wanda (Sun et al. 2023): |W| x ||X||_2 per output row (or N:M group), no weight update."""

    name = "wanda"
    criterion = "|W_ij| * ||X_j||_2 over calibration tokens (Sun et al. 2023), per output row / N:M group"

    def statistics(self, model, batches, group, stop_after):
        sums: dict[str, torch.Tensor] = {}

        def observe(fqn, rows):
            v = rows.float().pow(2).sum(0)
            sums[fqn] = sums[fqn] + v if fqn in sums else v

        observe_inputs(model, batches, group, observe, stop_after)
        return sums

    def prune_group(self, group, stats):
        for fqn, m in group:
            norms = stats.get(fqn)
            if norms is None:  # never called in the calibration pass: magnitude
                norms = torch.ones(m.in_features)
            w, keep = wanda_prune(m.weight, norms, self.sparsity, self._nm)
            self._set(m, w, keep)
        return {}


class SparseGPT(_OneShot):
    """SparseGPT (Frantar & Alistarh 2023): OBS reconstruction with the calibration Hessian."""

    name = "sparsegpt"
    criterion = ("SparseGPT (Frantar & Alistarh 2023): w^2/[H^-1]_jj^2 per block, OBS weight update, "
                 "H = 2XX^T/n dampened")

    def __init__(self, sparsity: float | None = 0.5, pattern: str = "unstructured", scope: str = "encoder",
                 refit: bool = False, calibration: Mapping[str, Any] | None = None, blocksize: int = 128,
                 dampening: float = 0.01):
        super().__init__(sparsity, pattern, scope, refit, calibration)
        try:
            self.blocksize = int(blocksize)
            self.dampening = float(dampening)
        except (TypeError, ValueError):
            raise ConfigError(f"sparsegpt: blocksize={blocksize!r} / dampening={dampening!r} must be numbers") from None
        if self.blocksize < 1 or (self._nm is not None and self.blocksize % self._nm[1]):
            raise ConfigError(f"sparsegpt: blocksize={blocksize} must be >= 1"
                              + (f" and a multiple of M={self._nm[1]}" if self._nm else ""))
        if not self.dampening > 0:
            raise ConfigError(f"sparsegpt: dampening={dampening} must be > 0 "
                              "(a share of the mean Hessian diagonal, e.g. 0.01)")

    def statistics(self, model, batches, group, stop_after):
        hs: dict[str, list] = {}

        def observe(fqn, rows):
            x = rows.float()
            if fqn not in hs:
                hs[fqn] = [torch.zeros(x.shape[1], x.shape[1], device=x.device), 0]
            hs[fqn][0] += x.t() @ x
            hs[fqn][1] += x.shape[0]

        observe_inputs(model, batches, group, observe, stop_after)
        return {fqn: 2.0 * h / max(1, n) for fqn, (h, n) in hs.items()}

    def prune_group(self, group, stats):
        figures = {}
        for fqn, m in group:
            H = stats.get(fqn)
            if H is None:  # never called in the calibration pass: magnitude
                w, keep = magnitude_prune(m.weight, self.sparsity, self._nm)
                figures[fqn] = {"note": "no calibration input reached it: magnitude"}
            else:
                w, keep, fig = sparsegpt_prune(m.weight, H, self.sparsity, self._nm, self.blocksize, self.dampening)
                figures[fqn] = fig
            self._set(m, w, keep)
        return figures
