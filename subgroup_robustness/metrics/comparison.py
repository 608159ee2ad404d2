"""More than accuracy, from saved predictions: prediction flips against the base, and per-group macro-F1 and
calibration. All numpy, per group through boolean masks (N, G), so overlapping and empty groups are exact.

Key names follow ``flatten_metrics``: the primary grouping's keys are ``<split>/<metric>/<group>``, a
secondary grouping's carry its name (``test/wilds16/flip/<group>``); metrics that do not depend on the
grouping (``test/flip_rate``, ``test/acc_worst_class``, ...) come with the primary grouping only. A group with
no example gets **no key** (never 0 or 1); its ``count`` key (from ``flatten_metrics``) says it is empty.

Flips (Hooker et al., "What do compressed deep neural networks forget?", 2019 — compression-identified
exemplars; Dutta et al., NeurIPS 2024, "Accuracy is not all you need"): a run and its base are compared
example by example on the same test set, aligned by example id with ``align``.

Quality (SubpopBench, Yang et al., ICML 2023, "Change is Hard"): worst-class accuracy, balanced accuracy,
the unweighted mean of group accuracies, macro-F1 and expected calibration error.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from subgroup_robustness.data.groups import PRIMARY  # the primary grouping: its keys carry no grouping prefix

ECE_BINS = 10
# float16 (how predictions.npz stores probabilities) flushes anything below 2**-25 to zero: a stored 0 means
# "below what was kept", so the run's probabilities are floored here before the logarithm of KL
PROB_FLOOR = 2.0 ** -24


# ---- alignment ----------------------------------------------------------------------------------------
def align(index_a: np.ndarray, index_b: np.ndarray, names: tuple[str, str] = ("run", "base")
          ) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(pos_a, pos_b)`` with ``index_a[pos_a] == index_b[pos_b]``, ordered by example id.

    Two runs are only comparable example by example when they scored the same test set: a ValueError says
    so (with counts and a few example ids) when the sets of ids differ, e.g. another subsample or split, or
    when a run lists an id twice."""
    a, b = np.asarray(index_a).reshape(-1), np.asarray(index_b).reshape(-1)
    for name, idx in zip(names, (a, b)):
        uniq, counts = np.unique(idx, return_counts=True)
        if len(uniq) != len(idx):
            raise ValueError(f"the {name}'s predictions list example ids more than once "
                             f"(e.g. {uniq[counts > 1][:5].tolist()}); cannot align them by id")
    if len(a) != len(b) or not np.array_equal(np.sort(a), np.sort(b)):
        only_a, only_b = np.setdiff1d(a, b), np.setdiff1d(b, a)
        raise ValueError(
            f"the {names[0]} and the {names[1]} scored different test sets: {len(a)} vs {len(b)} examples, "
            f"{len(only_a)} only in the {names[0]} (e.g. ids {only_a[:5].tolist()}), {len(only_b)} only in the "
            f"{names[1]} (e.g. ids {only_b[:5].tolist()}). Compare runs of the same data, subsample and seed "
            "(dataset.subsample / data seed), or re-run one of them.")
    return np.argsort(a, kind="stable"), np.argsort(b, kind="stable")


# ---- shared helpers -----------------------------------------------------------------------------------
def _prefix(split: str, grouping: str | None) -> tuple[str, bool]:
    primary = grouping is None or grouping == PRIMARY
    return (f"{split}/" if primary else f"{split}/{grouping}/"), primary


def _vec(x, n: int | None, what: str) -> np.ndarray:
    v = np.asarray(x).reshape(-1)
    if n is not None and len(v) != n:
        raise ValueError(f"{what}: {len(v)} entries, expected {n} (one per test example)")
    return v


def _masks(masks, n: int, group_names: Sequence[str]) -> np.ndarray:
    m = np.asarray(masks, dtype=bool)
    if m.ndim != 2 or m.shape != (n, len(group_names)):
        raise ValueError(f"masks: shape {m.shape}, expected ({n}, {len(group_names)}) = (examples, groups)")
    return m


def _probs(p, n: int, what: str) -> np.ndarray:
    """(N, C) float64, each row renormalised (float16 rows sum to 1 only up to rounding)."""
    q = np.asarray(p, dtype=np.float64)
    if q.ndim != 2 or q.shape[0] != n:
        raise ValueError(f"{what}: shape {q.shape}, expected ({n}, num_classes)")
    s = q.sum(1, keepdims=True)
    return q / np.where(s > 0, s, 1.0)


def _per_group_mean(values: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` (N,) over each group's examples, and the groups' sizes (empty: NaN mean)."""
    counts = masks.sum(0)
    sums = values.astype(np.float64) @ masks.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts


def kl_divergence(p, q) -> np.ndarray:
    """Per example KL(p || q) = sum_c p_c log(p_c / q_c), in nats, rows renormalised; terms with p_c = 0 are 0
    and q is floored at ``PROB_FLOOR`` (float16 storage keeps nothing smaller), so the value is finite."""
    p = _probs(p, len(np.asarray(p)), "probabilities")
    q = _probs(q, len(p), "probabilities")
    if p.shape != q.shape:
        raise ValueError(f"KL needs the same classes: {p.shape} vs {q.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(np.maximum(q, PROB_FLOOR))), 0.0)
    return np.maximum(terms.sum(1), 0.0)


# ---- flips --------------------------------------------------------------------------------------------
def flip_metrics(split: str, grouping: str | None, group_names: Sequence[str], masks, label, pred, probs,
                 base_pred, base_probs) -> dict[str, float]:
    """Per group: how many predictions changed against the base, and how far the probabilities moved.

    All inputs are aligned example by example (see ``align``); ``probs``/``base_probs`` (N, C) may be None
    (older predictions.npz without probabilities): then no KL keys.

    - ``flip/<g>``: fraction of the group's examples whose predicted class differs from the base's;
    - ``flip_c2w/<g>``: fraction of the group's examples the base got right and the run gets wrong;
    - ``flip_w2c/<g>``: fraction the base got wrong and the run gets right. Both are fractions of *all* the
      group's examples, so ``acc_run - acc_base = flip_w2c - flip_c2w`` and ``flip_c2w + flip_w2c <= flip``
      (equal for two classes; with more, wrong -> another wrong class is a flip in neither direction);
    - ``kl/<g>``: mean over the group's examples of KL(base || run), in nats.

    Overall ``flip_rate``, ``flip_c2w``, ``flip_w2c`` and ``kl`` (all examples, also those in no group) are
    written with the primary grouping only (grouping None or ``"groups"``). Empty groups get no key."""
    label = _vec(label, None, "label")
    n = len(label)
    pred, base_pred = _vec(pred, n, "pred"), _vec(base_pred, n, "base_pred")
    m = _masks(masks, n, group_names)
    ok, base_ok = pred == label, base_pred == label
    series = {"flip": pred != base_pred, "flip_c2w": base_ok & ~ok, "flip_w2c": ~base_ok & ok}
    if probs is not None and base_probs is not None:
        series["kl"] = kl_divergence(_probs(base_probs, n, "base_probs"), _probs(probs, n, "probs"))
    pre, primary = _prefix(split, grouping)
    out: dict[str, float] = {}
    if primary and n:
        for key, values in series.items():
            out[f"{pre}{'flip_rate' if key == 'flip' else key}"] = float(np.mean(values))
    for key, values in series.items():
        means, counts = _per_group_mean(values, m)
        for name, v, c in zip(group_names, means, counts):
            if c:
                out[f"{pre}{key}/{name}"] = float(v)
    return out


# ---- quality ------------------------------------------------------------------------------------------
def _confusion(label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    return np.bincount(label * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes,
                                                                                                num_classes)


def macro_f1(label, pred, num_classes: int) -> float:
    """Macro-F1 over the classes present in ``label`` (NaN when empty). Per class F1 = 2TP / (2TP + FP + FN),
    0 when the class is never predicted correctly. Classes absent from the labels are left out, so a group
    made of one class (every ``label x identity`` group) scores that class's F1; scikit-learn's default
    (``f1_score(average="macro")``, used by SubpopBench's report) would also average a 0 for a class that is
    only predicted."""
    label, pred = np.asarray(label).reshape(-1), np.asarray(pred).reshape(-1)
    if not len(label):
        return float("nan")
    cm = _confusion(label, pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    present = cm.sum(1) > 0
    return float(np.mean(2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])))


def expected_calibration_error(confidence, correct, n_bins: int = ECE_BINS) -> float:
    """ECE = sum_b (n_b / n) |accuracy_b - mean confidence_b| over ``n_bins`` equal-width bins of the top-class
    confidence, [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0] (Guo et al., 2017; SubpopBench). NaN when empty."""
    conf = np.clip(np.asarray(confidence, dtype=np.float64).reshape(-1), 0.0, 1.0)
    hit = np.asarray(correct, dtype=np.float64).reshape(-1)
    if not len(conf):
        return float("nan")
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    gap = np.bincount(bins, weights=hit - conf, minlength=n_bins)
    return float(np.abs(gap).sum() / len(conf))


def quality_metrics(split: str, grouping: str | None, group_names: Sequence[str], masks, label, pred, probs,
                    num_classes: int) -> dict[str, float]:
    """Per group and overall quality beyond accuracy (SubpopBench's report: Yang et al., ICML 2023).

    Per group (no key for an empty group):
    - ``f1/<g>``: macro-F1 over the classes **present in the group's labels** (see ``macro_f1``);
    - ``ece/<g>``: expected calibration error of the top-class confidence, 10 equal-width bins, correctness
      of the saved ``pred`` (only with ``probs``).
    Overall:
    - ``acc_mean_group``: unweighted mean of the non-empty groups' accuracies (SubpopBench's "adjusted
      accuracy"), per grouping;
    - with the primary grouping only (they do not depend on it): ``acc_worst_class`` (lowest per-class
      recall), ``acc_balanced`` (mean per-class recall), over the classes present in the labels, and ``ece``
      over all examples (only with ``probs``)."""
    label = _vec(label, None, "label").astype(np.int64)
    n = len(label)
    pred = _vec(pred, n, "pred").astype(np.int64)
    for what, v in (("label", label), ("pred", pred)):
        if n and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{what}: classes must lie in [0, {num_classes}); found {v.min()}..{v.max()}")
    m = _masks(masks, n, group_names)
    conf = None
    if probs is not None:
        p = _probs(probs, n, "probs")
        if p.shape[1] != num_classes:
            raise ValueError(f"probs: {p.shape[1]} classes, expected {num_classes}")
        conf = p.max(1)
    ok = pred == label
    pre, primary = _prefix(split, grouping)
    out: dict[str, float] = {}
    acc, counts = _per_group_mean(ok, m)
    if (counts > 0).any():
        out[f"{pre}acc_mean_group"] = float(np.mean(acc[counts > 0]))
    if primary and n:
        cm = _confusion(label, pred, num_classes)
        support = cm.sum(1)
        recall = np.diag(cm)[support > 0] / support[support > 0]
        out[f"{pre}acc_worst_class"] = float(recall.min())
        out[f"{pre}acc_balanced"] = float(recall.mean())
        if conf is not None:
            out[f"{pre}ece"] = expected_calibration_error(conf, ok)
    for g, name in enumerate(group_names):
        if not counts[g]:
            continue
        rows = m[:, g]
        out[f"{pre}f1/{name}"] = macro_f1(label[rows], pred[rows], num_classes)
        if conf is not None:
            out[f"{pre}ece/{name}"] = expected_calibration_error(conf[rows], ok[rows])
    return out


# ---- from predictions.npz -----------------------------------------------------------------------------
def prediction_metrics(run: Mapping[str, np.ndarray], groupings: Mapping, num_classes: int,
                       base: Mapping[str, np.ndarray] | None = None, split: str = "test") -> dict[str, float]:
    """Every key of ``quality_metrics`` (and, with a ``base``, of ``flip_metrics``) for every grouping, from
    two predictions.npz dicts (``results.read_predictions``): groups recomputed from the run's saved
    metadata, the base aligned by example id (ValueError if the test sets or their labels differ).

    ``groupings``: name -> ``data.groups.Grouping`` (``build_groupings(dataset_cfg)``)."""
    import torch

    meta = run.get("metadata")
    if meta is None:
        raise ValueError("these predictions carry no metadata (label and attribute values): groups cannot be "
                         "recomputed; re-run with the current code")
    columns = [str(c) for c in run["metadata_columns"]] if "metadata_columns" in run else None
    n = len(run["index"])
    pos = np.arange(n)
    base_pos = None
    if base is not None:
        pos, base_pos = align(run["index"], base["index"])
        if not np.array_equal(np.asarray(run["label"])[pos], np.asarray(base["label"])[base_pos]):
            raise ValueError("the run and its base give different labels to the same example ids: they read "
                             "different data (another dataset version or label mapping)")
    label, pred = np.asarray(run["label"])[pos], np.asarray(run["pred"])[pos]
    probs = np.asarray(run["probs"])[pos] if "probs" in run else None
    out: dict[str, float] = {}
    for name, grouping in groupings.items():
        if columns is not None and list(grouping.columns) and columns != list(grouping.columns):
            raise ValueError(f"grouping {name!r} reads columns {list(grouping.columns)}, the predictions "
                             f"saved {columns}")
        masks = grouping.masks(torch.as_tensor(np.asarray(meta)[pos].astype(np.int64))).numpy()
        key = None if name == PRIMARY else name
        out.update(quality_metrics(split, key, grouping.group_names, masks, label, pred, probs, num_classes))
        if base is not None:
            base_probs = np.asarray(base["probs"])[base_pos] if "probs" in base and probs is not None else None
            out.update(flip_metrics(split, key, grouping.group_names, masks, label, pred,
                                    probs if base_probs is not None else None,
                                    np.asarray(base["pred"])[base_pos], base_probs))
    return out
