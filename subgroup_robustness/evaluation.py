"""Extra test sets: any dataset config scored as an additional test set of a run, with its own groupings
and its own metric prefix, and the console lines of multi-label results.

``eval_datasets=[xnli, mhc]`` scores the run's final model on the test split of each listed dataset after
the run's own test. Each entry is a dataset config name, or a mapping with ``dataset: <name>`` and any keys
merged into that dataset config (``{dataset: mhc, source: {path: /data/mhc}, subsample: {test: 2000}}``);
``split: val`` scores its validation split instead, ``name: <prefix name>`` renames its prefix. A dataset
config's own ``eval:`` block is merged first (XNLI's sets ``source.train: none``, so no training rows are
read).

Per extra test set ``<name>``, results.json gets (``prefix`` = ``test_<name>``):
- ``metrics["test_<name>"]``: ``flatten_metrics`` keys under the prefix, e.g. ``test_xnli/acc_avg``,
  ``test_xnli/acc_wg``, ``test_xnli/acc/<group>``, ``test_xnli/<grouping>/acc_wg``
  (per language: ``test_xnli/lang_sw/acc_wg``);
- ``groups["test_<name>"]``: the per-grouping results (as ``groups["test"]``);
- ``eval_datasets[<name>]``: what was scored (dataset, split, examples, label names on both sides, seconds,
  the predictions file, the resolved dataset config `dataset_config`);
- ``predictions_<name>.npz`` beside results.json (``results.read_predictions`` reads it).

The text is tokenized with the run's final tokenizer (after vocabulary transfer, the new one). Labels are
matched by index: the extra dataset must have as many labels as the run's dataset and the same task
(single- or multi-label) and input form (single texts or pairs); their names are recorded side by side.
MultiNLI -> XNLI share names and ids; a toxicity or bias dataset -> MHC maps its positive class (1) to
hateful.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from subgroup_robustness.data.groups import PRIMARY, is_multilabel
from subgroup_robustness.utils.errors import ConfigError

PREFIX = "test_{name}"
ENTRY_KEYS = ("dataset", "split", "name")


# ---- which datasets ---------------------------------------------------------------------------------------
def eval_entries(cfg: Mapping) -> list[dict[str, Any]]:
    """``cfg.eval_datasets`` as ``[{"dataset": name, "split": split, "name": prefix name, "overrides": {...}}]``."""
    raw = cfg.get("eval_datasets") if hasattr(cfg, "get") else None
    if raw is None:
        return []
    if isinstance(raw, (DictConfig, ListConfig)):
        raw = OmegaConf.to_container(raw, resolve=True)
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"eval_datasets={raw!r}: give a list of dataset names, e.g. eval_datasets=[xnli,mhc]")
    out, seen = [], set()
    for item in raw:
        if isinstance(item, str):
            entry = {"dataset": item, "split": "test", "name": item, "overrides": {}}
        elif isinstance(item, Mapping) and isinstance(item.get("dataset"), str):
            entry = {"dataset": item["dataset"], "split": item.get("split", "test"),
                     "name": item.get("name", item["dataset"]),
                     "overrides": {k: v for k, v in item.items() if k not in ENTRY_KEYS}}
        else:
            raise ConfigError(f"eval_datasets entry {item!r}: a dataset name or {{dataset: <name>, ...}}")
        if entry["split"] not in ("val", "test"):
            raise ConfigError(f"eval_datasets entry {entry['name']!r}: split={entry['split']!r}; use test or val")
        if entry["name"] in seen:
            raise ConfigError(f"eval_datasets lists {entry['name']!r} twice; give one of them `name: <other>`")
        seen.add(entry["name"])
        out.append(entry)
    return out


def eval_dataset_config(run_cfg: Mapping, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config of an extra test set: ``conf/dataset/<name>.yaml`` placed where the run's dataset
    is (so its ``${dataset.*}`` and ``${paths.*}`` resolve as they would in a run of it), then its ``eval:``
    block and the entry's overrides merged in."""
    from subgroup_robustness.utils.compose import compose_group

    try:
        node = compose_group("dataset", entry["dataset"])
    except Exception as exc:  # noqa: BLE001 - hydra's MissingConfigException and friends
        raise ConfigError(f"eval_datasets: there is no dataset config {entry['dataset']!r} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    base = OmegaConf.to_container(run_cfg, resolve=False) if isinstance(run_cfg, DictConfig) else dict(run_cfg)
    base["dataset"] = OmegaConf.to_container(node, resolve=False)
    tree = OmegaConf.create(base)
    with open_dict(tree):
        block = tree.dataset.pop("eval", None)
        if block is not None:
            tree.dataset = OmegaConf.merge(tree.dataset, block)
        if entry.get("overrides"):
            tree.dataset = OmegaConf.merge(tree.dataset, OmegaConf.create(dict(entry["overrides"])))
    return OmegaConf.to_container(tree.dataset, resolve=True)  # type: ignore[return-value]


def check_compatible(name: str, run_dataset: Mapping, dataset: Mapping) -> None:
    """Same task, input form and label count: labels are matched by index."""
    if is_multilabel(run_dataset) != is_multilabel(dataset):
        kinds = ["multi-label" if is_multilabel(d) else "single-label" for d in (run_dataset, dataset)]
        raise ConfigError(f"eval_datasets: {name!r} is {kinds[1]} but the run's dataset {run_dataset.get('name')!r} "
                          f"is {kinds[0]}; an extra test set must have the run's task")
    if bool(run_dataset.get("text_pair")) != bool(dataset.get("text_pair")):
        forms = ["sentence pairs" if d.get("text_pair") else "single texts" for d in (run_dataset, dataset)]
        raise ConfigError(f"eval_datasets: {name!r} encodes {forms[1]} but the run's dataset "
                          f"{run_dataset.get('name')!r} {forms[0]}; the model cannot score it")
    ours, theirs = list(run_dataset["label_names"]), list(dataset["label_names"])
    if len(ours) != len(theirs):
        raise ConfigError(f"eval_datasets: {name!r} has {len(theirs)} labels {theirs} but the run's dataset "
                          f"{run_dataset.get('name')!r} has {len(ours)} {ours}; labels are matched by index, so "
                          "an extra test set needs the same number of labels")


# ---- scoring ----------------------------------------------------------------------------------------------
def _trainer(ctx, on_cpu: bool):
    """A test-only Trainer: the run's trainer settings, the GroupMetrics callback, no loggers (the extra test
    set's keys go to results.json, never into the run's logged test/* curves)."""
    from hydra.utils import instantiate

    from subgroup_robustness.metrics.callbacks import GroupMetrics
    from subgroup_robustness.models.precision import precision_plugin

    kwargs: dict[str, Any] = {}
    if on_cpu:
        kwargs.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true")
    plugin = precision_plugin(kwargs.get("precision", ctx.cfg.trainer.get("precision")),
                              kwargs.get("accelerator", ctx.cfg.trainer.get("accelerator")))
    if plugin is not None:
        kwargs.update(precision=None, plugins=[plugin])
    return instantiate(ctx.cfg.trainer, callbacks=[GroupMetrics(save_predictions=True, history_test=False)],
                       logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       default_root_dir=str(ctx.workdir), **kwargs)


def _data(ctx, dataset: Mapping[str, Any], split: str):
    """The extra test set's data module: its table cut to ``split`` (as ``test``), the run's tokenizer."""
    from subgroup_robustness.data.datamodule import GroupDataModule

    data_cfg = ctx.cfg.get("data") or {}
    dm = GroupDataModule(dataset=dataset, batch_size=int(data_cfg.get("eval_batch_size", 64)),
                         eval_batch_size=int(data_cfg.get("eval_batch_size", 64)),
                         num_workers=int(data_cfg.get("num_workers", 0)), seed=int(ctx.cfg.get("seed", 0)),
                         cache_dir=data_cfg.get("cache_dir"), tokenizer=ctx.tokenizer)
    table = dm.load_table()
    part = table[table["split"] == split].reset_index(drop=True)
    if part.empty:
        raise ConfigError(f"eval_datasets: dataset {dm.name!r} has no {split!r} rows (its splits: "
                          f"{sorted(set(table['split']))})")
    dm.table = part.assign(split="test")
    return dm


def score(ctx, entry: Mapping[str, Any], on_cpu: bool = False) -> dict[str, Any]:
    """One extra test set: {"prefix", "metrics", "groups", "predictions", "probabilities", "info", "data"}."""
    from subgroup_robustness.metrics.callbacks import GroupMetrics
    from subgroup_robustness.metrics.group_metrics import flatten_metrics
    from subgroup_robustness.models.classifier import SequenceClassifier

    t0 = time.perf_counter()
    name = entry["name"]
    run_dataset = OmegaConf.to_container(ctx.cfg.dataset, resolve=True) if isinstance(ctx.cfg.dataset, DictConfig) \
        else dict(ctx.cfg.dataset)
    dataset = eval_dataset_config(ctx.cfg, entry)
    check_compatible(name, run_dataset, dataset)
    dm = _data(ctx, dataset, entry["split"])
    module = SequenceClassifier(model=ctx.model, task=dataset.get("task", "single_label"))
    was_training = ctx.model.training
    trainer = _trainer(ctx, on_cpu)
    try:
        trainer.test(module, datamodule=dm, verbose=False)
    finally:
        ctx.model.train(was_training)
    gm = next(c for c in trainer.callbacks if isinstance(c, GroupMetrics))
    prefix = PREFIX.format(name=name)
    metrics: dict[str, float] = {}
    for grouping, res in gm.results["test"].items():
        metrics.update(flatten_metrics(prefix, None if grouping == PRIMARY else grouping, res))
    n = gm.results["test"][PRIMARY]["n"]
    info = {"dataset": dataset["name"], "split": entry["split"], "prefix": prefix, "examples": int(n),
            "label_names": list(dataset["label_names"]), "run_label_names": list(run_dataset["label_names"]),
            "groupings": list(gm.results["test"]), "seconds": time.perf_counter() - t0,
            "dataset_config": dataset}  # the resolved config scored: the report rebuilds per-language groups from it
    return {"prefix": prefix, "metrics": metrics, "groups": gm.results["test"], "info": info,
            "predictions": gm.test_predictions(), "probabilities": gm.test_probabilities(), "data": dm}


def extra_test_sets(ctx, rec: dict[str, Any], on_cpu: bool = False) -> dict[str, Any]:
    """Score every ``eval_datasets`` entry with the run's final model and add it to ``rec`` (see the module
    docstring); returns ``rec["eval_datasets"]`` (empty when none is configured)."""
    from subgroup_robustness.results import encode_predictions, example_metadata
    from subgroup_robustness.utils.console import console
    from subgroup_robustness.utils.io import atomic_write_bytes

    entries = eval_entries(ctx.cfg)
    if not entries:
        return {}
    out: dict[str, Any] = {}
    for entry in entries:
        res = score(ctx, entry, on_cpu=on_cpu)
        rec.setdefault("metrics", {})[res["prefix"]] = res["metrics"]
        rec.setdefault("groups", {})[res["prefix"]] = res["groups"]
        info = res["info"]
        if res["predictions"] is not None:
            index, label, pred = (res["predictions"][:, i].numpy() for i in range(3))
            probs = res["probabilities"]
            extra = {"probs": probs.numpy()} if probs is not None else {}
            meta = example_metadata(res["data"].table, res["data"].columns, index)
            fname = f"predictions_{entry['name']}.npz"
            atomic_write_bytes(Path(ctx.workdir) / fname, encode_predictions(index, label, pred, meta, **extra))
            info["predictions"] = fname
        out[entry["name"]] = info
        console.print(f"[dim]extra test set {entry['name']}: {info['examples']:,} examples, "
                      f"{worst_group_line(res['groups'][PRIMARY])}[/dim]")
    rec["eval_datasets"] = out
    return out


# ---- console lines ----------------------------------------------------------------------------------------
def _pct(x: Any) -> str:
    return "absent" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def worst_group_line(result: Mapping[str, Any]) -> str:
    """One grouping's worst group in words: accuracy, or macro-F1 (+ group disparity) for multi-label."""
    if result.get("task") == "multilabel":
        return (f"worst-group macro-F1 {_pct(result.get('macro_f1_wg'))}, micro-F1 {_pct(result.get('micro_f1_wg'))} "
                f"over {len(result.get('count') or {})} groups (GD macro-F1 {_pct(result.get('gd_macro_f1'))})")
    from subgroup_robustness.utils.console import empty_groups

    groups, empty = result.get("acc") or {}, empty_groups(result)
    line = f"worst-group {_pct(result.get('acc_wg'))} over {len(groups) - len(empty)} groups"
    if empty:
        line += f" ({len(empty)} empty, left out of the minimum: {', '.join(empty)})"
    if "acc_avg_rows" in result:
        line += (f"; row-duplicated average {_pct(result['acc_avg_rows'])} over {result.get('rows', 0):,} "
                 "(example, group) rows (inflated: BalancingGroups' convention)")
    return line


def extra_test_set_lines(rec: Mapping[str, Any]) -> list[str]:
    """One line per extra test set of a finished run (for the end-of-run summary)."""
    lines = []
    for name, info in (rec.get("eval_datasets") or {}).items():
        res = ((rec.get("groups") or {}).get(info.get("prefix", PREFIX.format(name=name))) or {}).get(PRIMARY)
        if res:
            lines.append(f"{info.get('prefix')}: {worst_group_line(res)} ({info.get('examples', 0):,} examples)")
    return lines


def print_multilabel_table(title: str, result: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> None:
    """The end-of-run table of a multi-label run: per group n, micro-F1 and macro-F1 (and the base's macro-F1)."""
    from rich.table import Table

    from subgroup_robustness.utils.console import console, empty_groups, empty_note

    table = Table(title=title, title_justify="left")
    for col, justify in (("group", "left"), ("n", "right"), ("micro-F1 %", "right"), ("macro-F1 %", "right")):
        table.add_column(col, justify=justify)
    if base:
        table.add_column("base macro-F1 %", justify="right")
    worst = result.get("worst_group")

    def fmt(x):
        return "absent" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"

    for name, n in (result.get("count") or {}).items():
        row = [name + (" (worst)" if name == worst else ""), str(n), fmt(result["micro_f1"].get(name)),
               fmt(result["macro_f1"].get(name))]
        if base:
            row.append(fmt((base.get("macro_f1") or {}).get(name)))
        table.add_row(*row, style="bold red" if name == worst else None)
    table.add_section()
    for label, micro, macro in (("all examples", "micro_f1_avg", "macro_f1_avg"),
                                ("worst group", "micro_f1_wg", "macro_f1_wg"),
                                ("group disparity (std)", "gd_micro_f1", "gd_macro_f1")):
        row = [label, str(result.get("n", "")) if micro == "micro_f1_avg" else "", fmt(result.get(micro)),
               fmt(result.get(macro))]
        if base:
            row.append(fmt(base.get(macro)))
        table.add_row(*row, style="bold")
    console.print(table)
    empty = empty_groups(result)
    if empty:
        console.print(f"  {empty_note(empty, len(result.get('count') or {}))}")
