"""``write_fake_run`` with the fields results.json gained since the report was first written (config with the
compressor's control, degenerate flag, code version, per-epoch history, extra metrics, probe, probabilities),
and small readers of what the report writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers import write_fake_run


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fake_run(folder: Path, *, control: str | None = None, config: dict | None = None,
             degenerate: str | None = None, code: dict | None = None, phases: list | None = None,
             stages: list | None = None, test_metrics: dict | None = None, probe: dict | None = None,
             probs: bool = False, **kw: Any) -> dict:
    """A completed (or other) fake run; ``control`` is ``config.compressor.control``, ``config`` is merged
    into the record's config, ``degenerate`` a reason (flags the run)."""
    write_fake_run(folder, **kw)
    path = folder / "results.json"
    rec = json.loads(path.read_text())
    run = rec["run"]
    rec["config"]["compressor"] = {"name": run["compressor"], "family": run["family"], "control": control}
    rec["config"]["model"] = {"name": run["model"]}
    rec["config"] = _merge(rec["config"], config or {})
    if degenerate:
        rec["degenerate"] = {"degenerate": True, "reasons": [degenerate], "majority_fraction": 1.0, "zero_fraction": {}}
    elif rec["status"] == "completed":
        rec["degenerate"] = {"degenerate": False, "reasons": [], "majority_fraction": 0.5, "zero_fraction": {}}
    if code is not None:
        rec["code"] = code
    if phases is not None:
        rec["phases"] = phases
    if stages is not None:
        rec["compression"]["stages"] = stages
    if test_metrics:
        rec["metrics"]["test"].update(test_metrics)
    if probe:
        rec["metrics"]["probe"] = probe
    path.write_text(json.dumps(rec, indent=1))
    if probs and rec["status"] == "completed":
        npz = folder / "predictions.npz"
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
        p = np.full((len(arrays["pred"]), 2), 0.2, np.float16)
        p[np.arange(len(p)), arrays["pred"]] = 0.8
        np.savez_compressed(npz, **arrays, probs=p)
    return rec


def set_predictions(folder: Path, pred: np.ndarray) -> None:
    """Replace a fake run's predictions (rows in the saved order)."""
    npz = folder / "predictions.npz"
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["pred"] = np.asarray(pred, np.int32)
    np.savez_compressed(npz, **arrays)


def md_table(path: Path, which: int = 0) -> dict[str, dict[str, str]]:
    """The ``which``-th markdown table of a file: first cell -> {column: cell}."""
    tables, current = [], []
    for ln in path.read_text().splitlines():
        if ln.startswith("|"):
            current.append(ln)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    lines = tables[which]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}


def history(epochs: list[tuple[float, float, float, float]], groups: dict[int, dict[str, float]] | None = None
            ) -> list[dict]:
    """Per epoch (val acc_avg, val acc_wg, test acc_avg, test acc_wg) -> GroupMetrics.history entries."""
    out = []
    for i, (va, vw, ta, tw) in enumerate(epochs):
        test = {"test/acc_avg": ta, "test/acc_wg": tw}
        test.update({f"test/acc/{g}": v for g, v in ((groups or {}).get(i) or {}).items()})
        out.append({"epoch": i, "step": 10 * (i + 1), "val": {"val/acc_avg": va, "val/acc_wg": vw}, "test": test})
    return out


# ---- per-language, multi-label and calibration runs ------------------------------------------------------
XNLI_LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
# XNLI's dataset config as a run records it (resolved): MultiNLI's labels, the negation flag and 15 languages;
# the per-language grouping `lang` expands to lang_ar ... lang_zh (label x negation inside one language)
FAKE_XNLI = {"name": "xnli", "text_pair": True, "label_names": ["contradiction", "entailment", "neutral"],
             "attributes": {"has_negation": ["no_negation", "negation"], "language": list(XNLI_LANGUAGES)},
             "groupings": {"groups": {"by": ["language", "label", "has_negation"]},
                           "lang": {"by": ["label", "has_negation"], "per": "language"},
                           "language": {"by": ["language"]},
                           "negation": {"by": ["label", "has_negation"]}}}
# ECtHR-like: multi-label (3 articles as a bitmask), groups by the defendant state
FAKE_ECTHR = {"name": "ecthr", "task": "multilabel", "label_names": ["2", "3", "5"],
              "attributes": {"defendant_state": ["east", "rest"]},
              "groupings": {"groups": {"by": ["defendant_state"]}}}


def _jsonable(x: Any) -> Any:
    """NaN -> None, as results.json stores a metric of an empty group."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def score_examples(dataset: dict, meta: np.ndarray, correct: np.ndarray) -> dict[str, dict]:
    """Every grouping's result (as GroupAccuracy.compute returns it) of examples with this metadata."""
    import math

    import torch

    from subgroup_robustness.data.groups import build_groupings

    out = {}
    for name, g in build_groupings(dataset).items():
        m = g.masks(torch.as_tensor(meta.astype(np.int64))).numpy()
        n = m.sum(0)
        acc = {gn: (float((m[:, j] & correct).sum() / n[j]) if n[j] else math.nan) for j, gn in enumerate(g.group_names)}
        present = [v for v in acc.values() if not math.isnan(v)]
        worst = min((k for k in acc if not math.isnan(acc[k])), key=acc.get) if present else None
        out[name] = {"acc_avg": float(correct.mean()) if len(correct) else math.nan,
                     "acc_wg": min(present) if present else math.nan, "worst_group": worst, "acc": acc,
                     "count": {gn: int(c) for gn, c in zip(g.group_names, n)}, "n": int(len(correct))}
    return out


def language_examples(dataset: dict, accuracy, languages: list[str], n: int = 40, rng_seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(metadata [label, has_negation, language], label, correct): ``n`` examples per language x label x negation
    of the ``languages`` present, exactly round(accuracy(language, label, negation) * n) of them correct."""
    codes = list(dataset["attributes"]["language"])
    rng = np.random.default_rng(rng_seed)
    meta, correct = [], []
    for lang in languages:
        for label in range(len(dataset["label_names"])):
            for neg in (0, 1):
                meta += [[label, neg, codes.index(lang)]] * n
                hits = np.zeros(n, bool)
                hits[rng.choice(n, int(round(accuracy(lang, label, neg) * n)), replace=False)] = True
                correct.append(hits)
    meta = np.asarray(meta, np.int16)
    return meta, meta[:, 0].astype(np.int32), np.concatenate(correct)


def _save_predictions(path: Path, meta: np.ndarray, label: np.ndarray, correct: np.ndarray, columns: list[str],
                      n_labels: int) -> None:
    index = np.random.default_rng(12345).permutation(len(meta)).astype(np.int32)  # the same ids in every run
    pred = np.where(correct, label, (label + 1) % n_labels).astype(np.int32)
    order = np.argsort(index)
    np.savez_compressed(path, index=index[order], label=label[order], pred=pred[order], metadata=meta[order],
                        metadata_columns=np.asarray(columns))


def multilingual_run(folder: Path, *, accuracy, languages: list[str] = ("de", "en", "sw"), seed: int = 1,
                     extra: dict[str, dict] | None = None, record_extra_config: bool = True, n: int = 40,
                     rng_seed: int | None = None, **kw: Any) -> dict:
    """A completed fake run on XNLI (``FAKE_XNLI``) with per-language groups, ``accuracy(lang, label, negation)``
    its accuracy per group; ``extra``: {name: {"accuracy": fn, "languages": [...]}} extra test sets of XNLI scored
    as ``test_<name>`` (``predictions_<name>.npz``, ``eval_datasets[name]``; its dataset config recorded unless
    ``record_extra_config`` is false, then re-composed by the report from ``eval_datasets``)."""
    from subgroup_robustness.data.groups import PRIMARY, metadata_columns
    from subgroup_robustness.metrics.group_metrics import flatten_metrics

    rec = fake_run(folder, seed=seed, rng_seed=rng_seed, **kw)
    rec["run"]["dataset"] = "xnli"
    rec["config"]["dataset"] = FAKE_XNLI
    columns = metadata_columns(FAKE_XNLI)

    def scored(prefix: str, acc, langs: list[str], fname: str, salt: int) -> None:
        meta, label, correct = language_examples(FAKE_XNLI, acc, list(langs), n, (rng_seed or seed) * 100 + salt)
        _save_predictions(folder / fname, meta, label, correct, columns, 3)
        res = score_examples(FAKE_XNLI, meta, correct)
        rec["groups"][prefix] = _jsonable(res)
        flat: dict[str, float] = {}
        for name, r in res.items():
            flat.update(flatten_metrics(prefix, None if name == PRIMARY else name, r))
        rec["metrics"][prefix] = _jsonable(flat)

    scored("test", accuracy, list(languages), "predictions.npz", 0)
    if extra:
        rec["config"]["eval_datasets"] = list(extra)
        rec["eval_datasets"] = {}
        for k, (name, spec) in enumerate(extra.items(), 1):
            fname = f"predictions_{name}.npz"
            scored(f"test_{name}", spec["accuracy"], spec["languages"], fname, k)
            info = {"dataset": "xnli", "split": "test", "prefix": f"test_{name}",
                    "examples": rec["groups"][f"test_{name}"][PRIMARY]["n"], "label_names": FAKE_XNLI["label_names"],
                    "run_label_names": FAKE_XNLI["label_names"], "groupings": list(rec["groups"][f"test_{name}"]),
                    "seconds": 1.0, "predictions": fname}
            if record_extra_config:
                info["dataset_config"] = FAKE_XNLI
            rec["eval_datasets"][name] = info
    (folder / "results.json").write_text(json.dumps(rec, indent=1))
    return rec


def multilabel_run(folder: Path, *, macro: dict[str, float], micro: dict[str, float] | None = None,
                   seed: int = 1, **kw: Any) -> dict:
    """A completed fake ECtHR-like run (``FAKE_ECTHR``): no accuracy keys, per-group macro-/micro-F1 as given,
    group disparity = their population std, worst group = the lowest macro-F1."""
    import math

    from subgroup_robustness.metrics.group_metrics import flatten_metrics

    rec = fake_run(folder, seed=seed, **kw)
    rec["run"]["dataset"] = "ecthr"
    rec["config"]["dataset"] = FAKE_ECTHR
    micro = micro or {g: v + 0.05 for g, v in macro.items()}
    worst = min(macro, key=macro.get)
    res = {"task": "multilabel", "micro_f1_avg": float(np.mean(list(micro.values()))),
           "macro_f1_avg": float(np.mean(list(macro.values()))), "micro_f1_wg": min(micro.values()),
           "macro_f1_wg": macro[worst], "gd_micro_f1": float(np.std(list(micro.values()))),
           "gd_macro_f1": float(np.std(list(macro.values()))), "worst_group": worst, "micro_f1": micro,
           "macro_f1": macro, "count": {g: 50 for g in macro}, "n": 50 * len(macro)}
    rec["groups"] = {"test": {"groups": res}, "val": {"groups": res}}
    rec["metrics"] = {"test": flatten_metrics("test", None, res), "val": flatten_metrics("val", None, res)}
    rec.pop("degenerate", None)  # not computed for multi-label runs
    rng = np.random.default_rng(seed)
    meta = np.repeat(np.arange(len(macro)), 50)[:, None].astype(np.int16)
    label = rng.integers(0, 8, len(meta)).astype(np.int32)
    pred = np.where(rng.random(len(meta)) < 0.6, label, rng.integers(0, 8, len(meta))).astype(np.int32)
    np.savez_compressed(folder / "predictions.npz", index=np.arange(len(meta), dtype=np.int32), label=label, pred=pred,
                        metadata=np.concatenate([label[:, None].astype(np.int16), meta], 1),
                        metadata_columns=np.asarray(["label", "defendant_state"]),
                        probs=rng.random((len(meta), 3)).astype(np.float16))
    assert not math.isnan(res["macro_f1_wg"])
    (folder / "results.json").write_text(json.dumps(rec, indent=1))
    return rec


def calibration_run(folder: Path, *, source: str, compressor: str = "wanda50", family: str = "pruning",
                    seed: int = 1, examples: int = 256, experiment: str = "calibration", config: dict | None = None,
                    **kw: Any) -> dict:
    """A completed fake run of a calibrating method with ``config.compressor.calibration`` as
    ``experiment=calibration`` records it (the draw's seed is the run's)."""
    cal = {"compressor": {"calibration": {"source": source, "examples": examples, "seed": seed}}}
    return fake_run(folder, compressor=compressor, family=family, seed=seed, experiment=experiment,
                    config=_merge(cal, config or {}), **kw)


def attach_cached_base(run: Path, cache: Path) -> None:
    """Record ``cache`` (a fake run folder with its predictions.npz) as the run's cached fine-tuned base."""
    rec = json.loads((run / "results.json").read_text())
    base = json.loads((cache / "results.json").read_text())
    rec["base"] = {"metrics": base["metrics"], "groups": base["groups"], "cache_dir": str(cache), "reused": True}
    (run / "results.json").write_text(json.dumps(rec, indent=1))
