"""Features or head? A last-layer re-training probe: Deep Feature Reweighting (DFR; Kirichenko, Izmailov &
Wilson, "Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations", ICLR 2023).

The encoder is frozen; only a linear classifier is re-fitted on its features, on a *group-balanced* subsample
of held-out data. If the probe's worst-group accuracy is far above the model's own, the minority groups are
still linearly separable in the compressed encoder's features and compression only mis-set the head; if
the probe fails too, the features themselves lost them.

The recipe follows the authors' ``dfr_evaluate_spurious.py`` (DFR^Val_Tr: balanced held-out data, no
training data added, class weights 1):

1. features standardised with the mean and standard deviation of the whole held-out set;
2. regularisation chosen among DFR's grid ``C in (1, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)`` by worst-group
   accuracy: the held-out set is split in random halves, a classifier is fitted on a group-balanced
   subsample of one half and scored on the other half (all of it); the worst-group accuracies are summed
   over ``n_tune_splits`` = 5 random splits (the authors use 1; our held-out sets are small, and 5 makes
   the choice less a matter of one split) and the best C wins (the first in the grid on a tie);
3. with that C, ``n_retrains`` = 20 classifiers (the authors' number) are fitted on independent
   group-balanced subsamples of the whole held-out set — every group cut to the size of the smallest — and
   their weights and biases are averaged into one linear classifier, which is scored on the test set.

Departures, stated: the authors use scikit-learn's L1-penalised liblinear solver; this project has no
scikit-learn, so the classifier is a multinomial (softmax) logistic regression with an L2 penalty,
minimising ``mean cross-entropy + ||W||^2 / (2 C n)`` (scikit-learn's ``0.5 ||W||^2 + C * sum of losses``
divided by ``C n``; the bias is not penalised) with full-batch L-BFGS in float64 on the CPU, from zeros.
Balancing needs disjoint groups: pass the primary grouping's masks for the held-out data (the test masks may
overlap). Held-out examples in no group are not used for fitting; a group with no held-out example is left
out of the balancing and named in ``settings``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from subgroup_robustness.models.structure import HEAD_MODULES, model_inputs

C_OPTIONS = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # DFR's grid (WaterBirds), weakest penalty first
N_RETRAINS = 20      # balanced subsamples averaged for the final classifier (DFR's num_retrains)
N_TUNE_SPLITS = 5    # random half splits summed to choose C (DFR: 1)
MAX_ITER = 200       # L-BFGS iterations per fit (converges well before on standardised features)


# ---- the linear classifier ----------------------------------------------------------------------------
def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float,
                 max_iter: int = MAX_ITER) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with an L2 penalty (strength 1/C, as scikit-learn's C): (W (K, D), b (K,)).
    Full-batch L-BFGS with a strong-Wolfe line search from zeros: deterministic for given inputs."""
    n, d = x.shape
    w = torch.zeros(num_classes, d, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    reg = 1.0 / (2.0 * c * max(n, 1))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y) + reg * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _group_ids(masks: np.ndarray) -> np.ndarray:
    """Disjoint masks (N, G) -> group index per example, -1 for none."""
    per_row = masks.sum(1)
    if (per_row > 1).any():
        raise ValueError("the DFR probe balances disjoint groups, but some held-out examples are in several "
                         "groups: pass the primary grouping's masks for the held-out (training) features; "
                         "overlapping masks are fine for the test features")
    return np.where(per_row == 1, masks.argmax(1), -1)


def _balanced(gids: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A group-balanced subsample of ``rows``: every group present there cut to the smallest one's size."""
    groups = [rows[gids[rows] == g] for g in np.unique(gids[rows]) if g >= 0]
    if not groups:
        return rows[:0]
    k = min(len(r) for r in groups)
    return np.concatenate([rng.permutation(r)[:k] for r in groups])


def _worst_group(pred: np.ndarray, y: np.ndarray, masks: np.ndarray) -> float:
    counts = masks.sum(0)
    if not (counts > 0).any():
        return float("nan")
    hits = (pred == y).astype(np.float64) @ masks.astype(np.float64)
    return float((hits[counts > 0] / counts[counts > 0]).min())


def _predict(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (x @ w.T + b).argmax(1).numpy()


# ---- DFR ----------------------------------------------------------------------------------------------
def dfr_probe(features_train, labels_train, masks_train, features_test, labels_test, masks_test, seed: int,
              group_names: Sequence[str] | None = None, num_classes: int | None = None,
              c_options: Sequence[float] = C_OPTIONS, n_retrains: int = N_RETRAINS,
              n_tune_splits: int = N_TUNE_SPLITS, max_iter: int = MAX_ITER) -> dict[str, Any]:
    """DFR on frozen features (see the module docstring for the recipe and its numbers).

    ``features_*``: (N, D) float; ``labels_*``: (N,) int; ``masks_train``: (N, G) disjoint group membership of
    the held-out data (e.g. the validation split, held out from fine-tuning as in DFR^Val_Tr); ``masks_test``:
    (M, G') membership of the test examples, named by ``group_names`` (default ``g0, g1, ...``).

    Returns what ``GroupAccuracy.compute`` returns for the probe's test predictions — ``acc_avg``, ``acc_wg``,
    ``worst_group``, ``acc`` (per group, NaN for an empty test group), ``count``, ``n`` (so
    ``flatten_metrics("probe", ...)`` turns it into keys) — plus ``settings``: the chosen C, the tuning scores,
    the balanced subsample's size, seeds and timings.

    Runs on one CPU thread (restored after): the fits are a few hundred rows by a few hundred features, where
    thread hand-offs cost more than the maths (4,000 x 384 held-out features: ~1 s on one thread, ~25 s with
    two threads on a busy 2-core machine)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _dfr(features_train, labels_train, masks_train, features_test, labels_test, masks_test, seed,
                    group_names, num_classes, c_options, n_retrains, n_tune_splits, max_iter)
    finally:
        torch.set_num_threads(n_threads)


def _dfr(features_train, labels_train, masks_train, features_test, labels_test, masks_test, seed, group_names,
         num_classes, c_options, n_retrains, n_tune_splits, max_iter) -> dict[str, Any]:
    t0 = time.perf_counter()
    xtr = torch.as_tensor(np.asarray(features_train, dtype=np.float64))
    xte = torch.as_tensor(np.asarray(features_test, dtype=np.float64))
    ytr = np.asarray(labels_train).reshape(-1).astype(np.int64)
    yte = np.asarray(labels_test).reshape(-1).astype(np.int64)
    mtr, mte = np.asarray(masks_train, dtype=bool), np.asarray(masks_test, dtype=bool)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"features: {tuple(xtr.shape)} (held-out) and {tuple(xte.shape)} (test) must be "
                         "(N, D) with the same D")
    if len(ytr) != len(xtr) or mtr.shape[0] != len(xtr) or len(yte) != len(xte) or mte.shape[0] != len(xte):
        raise ValueError("features, labels and masks must have one row per example")
    names = list(group_names) if group_names is not None else [f"g{i}" for i in range(mte.shape[1])]
    if len(names) != mte.shape[1]:
        raise ValueError(f"{len(names)} group names for {mte.shape[1]} test groups")
    k = int(num_classes) if num_classes is not None else int(max(ytr.max(initial=0), yte.max(initial=0)) + 1)
    gids = _group_ids(mtr)
    used = np.flatnonzero(gids >= 0)
    if not len(used):
        raise ValueError("the DFR probe has no held-out example in any group")

    mean = xtr[used].mean(0)
    std = xtr[used].std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr_t = torch.as_tensor(ytr)
    rng = np.random.default_rng(seed)

    # 2. choose C by worst-group accuracy on random halves
    scores = {float(c): 0.0 for c in c_options}
    for _ in range(n_tune_splits):
        perm = rng.permutation(used)
        half = len(perm) // 2
        fit_rows = _balanced(gids, perm[half:], rng)
        eval_rows = perm[:half]
        for c in c_options:
            w, b = fit_logistic(xtr[fit_rows], ytr_t[fit_rows], k, float(c), max_iter)
            wg = _worst_group(_predict(xtr[eval_rows], w, b), ytr[eval_rows], mtr[eval_rows])
            scores[float(c)] += 0.0 if math.isnan(wg) else wg
    best_c = max(scores, key=lambda c: (scores[c], -list(scores).index(c)))
    t_tune = time.perf_counter() - t0

    # 3. average n_retrains balanced fits, score on test
    ws, bs, sizes = [], [], []
    for _ in range(n_retrains):
        rows = _balanced(gids, used, rng)
        w, b = fit_logistic(xtr[rows], ytr_t[rows], k, best_c, max_iter)
        ws.append(w)
        bs.append(b)
        sizes.append(len(rows))
    w, b = torch.stack(ws).mean(0), torch.stack(bs).mean(0)
    pred = _predict(xte, w, b)

    hit = pred == yte
    counts = mte.sum(0)
    correct = hit.astype(np.float64) @ mte.astype(np.float64)
    acc = {n: (float(cor / cnt) if cnt else math.nan) for n, cor, cnt in zip(names, correct, counts)}
    present = {n: a for n, a in acc.items() if not math.isnan(a)}
    worst = min(present, key=present.get) if present else None
    train_counts = {n: int((gids == g).sum()) for g, n in enumerate(names)} if mtr.shape[1] == len(names) \
        else {f"g{g}": int((gids == g).sum()) for g in range(mtr.shape[1])}
    return {
        "acc_avg": float(hit.mean()) if len(hit) else math.nan,
        "acc_wg": present[worst] if worst is not None else math.nan,
        "worst_group": worst,
        "acc": acc,
        "count": dict(zip(names, (int(c) for c in counts))),
        "n": int(len(hit)),
        "settings": {
            "method": "DFR (Kirichenko et al., ICLR 2023): last-layer re-training on group-balanced held-out data",
            "classifier": "multinomial logistic regression, L2 penalty, L-BFGS (float64)",
            "standardize": True,
            "C": best_c,
            "c_options": [float(c) for c in c_options],
            "tune_worst_group_acc": {str(c): s / max(n_tune_splits, 1) for c, s in scores.items()},
            "n_tune_splits": int(n_tune_splits),
            "n_retrains": int(n_retrains),
            "max_iter": int(max_iter),
            "per_group_balanced": int(sizes[0] // max(len(np.unique(gids[used])), 1)) if sizes else 0,
            "n_balanced": int(sizes[0]) if sizes else 0,
            "held_out_counts": train_counts,
            "groups_without_held_out_examples": [n for n, c in train_counts.items() if c == 0],
            "held_out_in_no_group": int((gids < 0).sum()),
            "seed": int(seed),
            "seconds": {"tune": round(t_tune, 3), "total": round(time.perf_counter() - t0, 3)},
        },
    }


# ---- features -----------------------------------------------------------------------------------------
def _head_entry(hf: nn.Module) -> list[nn.Module]:
    """The top-level head modules (``HEAD_MODULES``) the model has, e.g. DistilBERT's pre_classifier and
    classifier; the first one called in a forward is the head's entry."""
    return [m for name in HEAD_MODULES if isinstance(m := getattr(hf, name, None), nn.Module)]


def encoder_features(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], at: str = "head"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The frozen encoder's representation of every example, ``(features (N, D) float32, index (N,) int64)``.

    ``at="head"`` (default): exactly what the classification head receives — the input of the first head
    module (``structure.HEAD_MODULES``) to run, captured with a forward pre-hook. For BERT that is the pooler
    output (``BertForSequenceClassification`` applies dropout, the identity in eval mode, then the classifier
    to it), so "re-fit only the classifier" means what DFR means by the last layer; for a model without a
    pooler it is the first ([CLS]) token's last hidden state (DistilBERT's ``pre_classifier`` input); a head
    that takes the whole sequence (RoBERTa's) gets its first token.
    ``at="cls"``: the first token's last hidden state, before any pooler: when a compression zeroed the
    pooler (see ``degenerate``), the head input is a constant and only this says whether the encoder kept
    the groups apart.

    Runs in eval mode without gradients on the model's device (CPU for a model without parameters, e.g.
    dynamically quantized), restoring the training flag after. ``batches``: dicts with ``input_ids`` (and
    ``attention_mask``/``token_type_ids``) and ``index`` (example ids; positions when absent). Accepts the
    Hugging Face model or the LightningModule that wraps it (``.model``)."""
    if at not in ("head", "cls"):
        raise ValueError(f"encoder_features: at={at!r}; use 'head' (what the classifier sees) or 'cls'")
    inner = getattr(model, "model", None)
    hf = inner if not hasattr(model, "config") and isinstance(inner, nn.Module) else model
    param = next(hf.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    captured: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        if not captured:
            x = args[0] if args else next(iter(kwargs.values()))
            captured.append(x)

    def base_hook(_module, _args, output):
        if not captured:
            hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", None)
            if hidden is None:
                hidden = output[0]
            captured.append(hidden)

    if at == "head":
        modules = _head_entry(hf)
        if not modules:
            raise ValueError(f"{type(hf).__name__} has no classification head among {HEAD_MODULES}; use at='cls'")
        handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules]
    else:
        handles = [getattr(hf, "base_model", hf).register_forward_hook(base_hook)]
    was_training = hf.training
    hf.eval()
    feats, ids, seen = [], [], 0
    try:
        with torch.inference_mode():
            for batch in batches:
                captured.clear()
                hf(**model_inputs(batch, device))
                if not captured:
                    raise RuntimeError(f"{type(hf).__name__}: the head input was not captured")
                x = captured[0]
                if x.ndim == 3:  # a head fed the whole sequence: its first token
                    x = x[:, 0]
                feats.append(x.detach().float().cpu())
                n = x.shape[0]
                idx = batch.get("index") if hasattr(batch, "get") else None
                ids.append(torch.as_tensor(idx).reshape(-1).cpu().long() if idx is not None
                           else torch.arange(seen, seen + n))
                seen += n
    finally:
        for h in handles:
            h.remove()
        hf.train(was_training)
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(feats).numpy(), torch.cat(ids).numpy()
