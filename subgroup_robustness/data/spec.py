"""The dataset config's declared schema, and the resolver that gives a dataset YAML its source's vocabulary.

Why: a dataset YAML has about a dozen keys that code elsewhere relies on. ``conf/config.yaml``
interpolates ``${dataset.train.lr}`` and three other ``train`` keys; the datamodule reads the label
names, the attributes, the groupings and the tokenization settings. Nothing declared them, so a YAML
without ``train:`` failed far away, as an ``InterpolationKeyError`` about ``module.lr``.
:data:`FIELDS` declares them, and :func:`validate_dataset_spec` checks a dataset config against it
before anything resolves. It checks the raw config: interpolations that point outside the dataset
(``${paths.data_dir}``) are left alone, and only literal values are type-checked.

The vocabulary (label names, attribute value names) is defined once, in the source module, as
``LABELS`` and ``ATTRIBUTES``. For SCOTUS and MultiNLI its order is the data's own id order
(FairLex's ClassLabel, group_DRO's ids). The YAML refers to it with ``${sr.vocab:<source>,LABELS}``
(:func:`vocabulary`), so the two can never disagree.
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from subgroup_robustness.data.sources.splits import SPLITS
from subgroup_robustness.utils.errors import ConfigError

SOURCES_PACKAGE = "subgroup_robustness.data.sources"
RESERVED_COLUMNS = ("label", "text", "text_pair", "split", "index")


# ---- the schema -------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _names(v: Any, least: int = 1) -> bool:
    return isinstance(v, (list, tuple)) and len(v) >= least and all(isinstance(x, str) and x for x in v)


def _attributes(v: Any) -> bool:
    return isinstance(v, Mapping) and all(
        isinstance(k, str) and k not in RESERVED_COLUMNS and (_interpolation(x) or _names(x, 2)) for k, x in v.items())


def _subsample(v: Any) -> bool:
    return isinstance(v, Mapping) and all(
        k in SPLITS and (n is None or _interpolation(n) or (_is_int(n) and n > 0)) for k, n in v.items())


@dataclass(frozen=True)
class Field:
    path: str                      # dotted, inside the dataset config
    expected: str                  # what a valid value is, in words
    check: Callable[[Any], bool]
    example: str                   # a YAML line that fixes it
    required: bool = True
    nullable: bool = False


FIELDS: tuple[Field, ...] = (
    Field("name", "a non-empty string", lambda v: isinstance(v, str) and bool(v), "name: mydata"),
    Field("source", "a mapping", lambda v: isinstance(v, Mapping),
          "source: {_target_: subgroup_robustness.data.sources.redditbias.load, cache_dir: '${paths.data_dir}/mydata'}"),
    Field("source._target_", "the dotted path of a load function", lambda v: isinstance(v, str) and "." in v,
          "source: {_target_: subgroup_robustness.data.sources.<module>.load}"),
    Field("label_names", "a list of two or more names", lambda v: _names(v, 2),
          "label_names: ${sr.vocab:<module>,LABELS}   (or a literal list: [negative, positive])"),
    Field("attributes", f"a mapping from column name (not {list(RESERVED_COLUMNS)}) to two or more value names",
          _attributes, "attributes: ${sr.vocab:<module>,ATTRIBUTES}   (or: {identity: [female, male]})",
          required=False, nullable=True),
    Field("groupings", "a mapping of grouping specs", lambda v: isinstance(v, Mapping),
          "groupings: {groups: {by: [label, <attribute>]}}"),
    Field("groupings.groups", "a grouping spec with `by` and/or `each`",
          lambda v: isinstance(v, Mapping) and bool({"by", "each"} & set(v)),
          "groupings: {groups: {by: [label, <attribute>]}}"),
    Field("text_pair", "true or false", lambda v: isinstance(v, bool), "text_pair: true", required=False),
    Field("max_length", "a positive integer", lambda v: _is_int(v) and v > 0, "max_length: 128", required=False),
    Field("truncation_side", "left or right", lambda v: v in ("left", "right"), "truncation_side: right",
          required=False),
    Field("subsample", f"null or a mapping from {list(SPLITS)} to positive integers", _subsample,
          "subsample: {train: 2000, val: 500, test: 500}", required=False, nullable=True),
    Field("subsample_seed", "an integer", _is_int, "subsample_seed: 0", required=False),
    Field("train", "a mapping with lr, weight_decay, batch_size and max_epochs", lambda v: isinstance(v, Mapping),
          "train: {lr: 2e-5, weight_decay: 0.0, batch_size: 32, max_epochs: 3}"),
    Field("train.lr", "a positive number", lambda v: _is_number(v) and v > 0, "train: {lr: 2e-5}"),
    Field("train.weight_decay", "a non-negative number", lambda v: _is_number(v) and v >= 0,
          "train: {weight_decay: 0.0}"),
    Field("train.batch_size", "a positive integer", lambda v: _is_int(v) and v > 0, "train: {batch_size: 32}"),
    Field("train.max_epochs", "a positive integer", lambda v: _is_int(v) and v > 0, "train: {max_epochs: 3}"),
)


def _interpolation(v: Any) -> bool:
    return isinstance(v, str) and "${" in v


def _raw(dataset_cfg: Any) -> Any:
    """The config as plain Python, interpolations kept as their ``${...}`` text (nothing is resolved)."""
    if isinstance(dataset_cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(dataset_cfg, resolve=False)
    return dataset_cfg


_ABSENT = object()


def _lookup(cfg: Mapping, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        if _interpolation(node):
            return node  # the parent is an interpolation: its children cannot be seen unresolved
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def problems(dataset_cfg: Any) -> list[str]:
    """Every way ``dataset_cfg`` departs from :data:`FIELDS`, one phrase each (empty when it conforms)."""
    cfg = _raw(dataset_cfg)
    if not isinstance(cfg, Mapping):
        return [f"the dataset config is {type(cfg).__name__}, not a mapping; choose one with dataset=<name>"]
    out: list[str] = []
    reported: list[str] = []
    for f in FIELDS:
        if any(f.path.startswith(p + ".") for p in reported):
            continue  # its parent is already reported missing or ill-typed
        value = _lookup(cfg, f.path)
        if value is _ABSENT or value == "???":
            if f.required:
                out.append(f"missing `{f.path}` (e.g. `{f.example}`)")
                reported.append(f.path)
            continue
        if _interpolation(value) or (value is None and f.nullable):
            continue
        if not f.check(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            out.append(f"`{f.path}` is {shown}, expected {f.expected} (e.g. `{f.example}`)")
            reported.append(f.path)
    return out


def validate_dataset_spec(dataset_cfg: Any) -> None:
    """Raise one ConfigError line naming the dataset and every missing or ill-typed key, with a fix."""
    found = problems(dataset_cfg)
    if found:
        cfg = _raw(dataset_cfg)
        name = cfg.get("name") if isinstance(cfg, Mapping) else None
        where = f"dataset {name!r}" if isinstance(name, str) and not _interpolation(name) else "the dataset config"
        hint = f" (conf/dataset/{name}.yaml)" if isinstance(name, str) and name.isidentifier() else ""
        raise ConfigError(f"{where}{hint}: " + "; ".join(found))


# ---- the vocabulary resolver ------------------------------------------------------------------------
def vocabulary(source: str, name: str, keep: Any = None) -> DictConfig | ListConfig:
    """``${sr.vocab:<source>,<NAME>[,<ids>]}``: a vocabulary constant of a source module, as a config
    node (a plain list or dict would break ``OmegaConf.resolve``, which cannot store one in the string
    node the interpolation came from). ``source`` is a module of ``subgroup_robustness.data.sources`` or any dotted module path;
    ``NAME`` an upper-case constant (``LABELS``, ``ATTRIBUTES``, ...); ``keep`` (ids, or null for all)
    selects entries of a sequence in the given order, as MultiNLI's binary variants keep two labels."""
    module_name = source if "." in source else f"{SOURCES_PACKAGE}.{source}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise ConfigError(f"${{sr.vocab:{source},{name}}}: there is no module {module_name}; "
                          f"name a module of {SOURCES_PACKAGE} (e.g. redditbias) or a dotted module path") from None
    value = getattr(module, name, None) if name.isupper() else None
    if isinstance(value, Mapping) and all(_names(v) for v in value.values()):
        out: list | dict = {str(k): list(v) for k, v in value.items()}
    elif _names(value):
        out = list(value)
    else:
        raise ConfigError(f"${{sr.vocab:{source},{name}}}: {module_name} defines no vocabulary {name!r} "
                          "(an upper-case tuple of names, or a mapping of such tuples, e.g. LABELS or ATTRIBUTES)")
    if keep is not None:
        ids = list(keep) if isinstance(keep, (list, tuple, ListConfig)) else [keep]
        if isinstance(out, dict) or not all(_is_int(i) and 0 <= i < len(out) for i in ids):
            raise ConfigError(f"${{sr.vocab:{source},{name},{ids}}}: select with ids among 0..{len(out) - 1} "
                              f"of the list {out}")
        out = [out[i] for i in ids]
    return OmegaConf.create(out)
