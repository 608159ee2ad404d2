"""Groups are configuration, not code: a grouping spec becomes boolean masks over the batch metadata.

Masks (not a single group id) let one example belong to several groups, as in WILDS' 16
CivilComments groups, and let an example belong to none.

Spec forms, in a dataset config's ``groupings`` mapping (the grouping named ``groups`` is primary):
- ``{by: [label, identity]}``: the Cartesian product of the values: disjoint groups.
- ``{each: [male, female, ...], by: [label]}``: for every listed binary attribute, the examples where
  it is 1, crossed with ``by``: overlapping groups.
Two optional keys refine either form:
- ``exclude: {court_region: [n_a]}``: leave out the groups with these values of a ``by`` column (their
  examples are in no group of this grouping), e.g. FairLex's missing-value groups. Keys naming columns
  that are not in ``by`` are ignored, so one map of a dataset's missing values serves all its groupings.
- ``per: language``: one grouping per value of that column, named ``<name>_<value>`` (``lang_de``), each
  holding the ``by`` groups of that value only; every result then has its own worst group
  (``test/lang_de/acc_wg``: the worst-group accuracy of the German examples). ``Grouping.within`` says
  which column and value a grouping is restricted to.
- ``average: rows``: the grouping also reports ``acc_avg_rows``, the average over one row per (example,
  group) pair, the convention of BalancingGroups / SubpopBench (Idrissi et al. 2022; Yang et al. 2023) for
  CivilComments, whose evaluation files hold a comment once per identity it mentions and leave out the
  comments that mention none. That average is inflated against the per-example one (a comment with two
  identities counts twice, the no-identity majority not at all) and is labelled as such wherever shown; the
  group accuracies (and so the worst group) are the same as the overlapping masks' (``each:``).
  ``average: examples`` (the default) adds nothing.

Multi-label datasets (``task: multilabel``) keep the label set as a bitmask in the ``label`` column; its
values are label sets, not label names, so their groupings use attributes only (``label`` is refused).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from subgroup_robustness.utils.errors import ConfigError

PRIMARY = "groups"
MULTILABEL = "multilabel"
SPEC_KEYS = ("by", "each", "exclude", "per", "average")
AVERAGES = ("examples", "rows")


@dataclass
class Grouping:
    name: str
    group_names: list[str]
    conditions: list[list[tuple[int, int]]]  # per group: (metadata column, required value) pairs
    disjoint: bool = True
    columns: list[str] = field(default_factory=list)
    within: tuple[str, str] | None = None  # (column, value name) of a ``per:`` grouping, else None
    average: str = "examples"  # "rows": also the row-duplicated average (``average: rows`` above)

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    def masks(self, metadata: torch.Tensor) -> torch.Tensor:
        """(B, A) integer metadata -> (B, G) boolean membership."""
        out = torch.ones(metadata.shape[0], self.n_groups, dtype=torch.bool, device=metadata.device)
        for g, conds in enumerate(self.conditions):
            for col, value in conds:
                out[:, g] &= metadata[:, col] == value
        return out

    def group_ids(self, metadata: torch.Tensor) -> torch.Tensor:
        """Disjoint groupings only: the group index of each example, -1 where it is in none."""
        if not self.disjoint:
            raise ValueError(f"grouping {self.name!r} has overlapping groups; use masks()")
        m = self.masks(metadata)
        ids = m.float().argmax(dim=1)
        return torch.where(m.any(dim=1), ids, torch.full_like(ids, -1))


def cells(groupings: Mapping[str, Grouping], metadata: torch.Tensor) -> torch.Tensor:
    """(B,) cell index of every example: examples share a cell when they share their group of the primary
    grouping and their membership in every group of every grouping (overlapping masks included), so a
    stratified draw over cells keeps every grouping's groups in proportion. Cells are numbered in the order
    of (primary group id, memberships), so with one disjoint grouping the cells are its groups, in its order."""
    primary = groupings[PRIMARY]
    gid = primary.group_ids(metadata) if primary.disjoint else torch.zeros(metadata.shape[0], dtype=torch.long)
    parts = [gid.unsqueeze(1)] + [g.masks(metadata).long() for name, g in groupings.items()
                                  if name != PRIMARY or not g.disjoint]
    _, inverse = torch.unique(torch.cat(parts, 1), dim=0, return_inverse=True)
    return inverse


def metadata_columns(dataset_cfg: Mapping) -> list[str]:
    return ["label", *list((dataset_cfg.get("attributes") or {}).keys())]


def is_multilabel(dataset_cfg: Mapping | None) -> bool:
    """``task: multilabel`` in a dataset config: the ``label`` column holds a bitmask of label_names."""
    return bool(dataset_cfg) and dataset_cfg.get("task", "single_label") == MULTILABEL


class LabelSets(SequenceABC):
    """The values of a multi-label dataset's ``label`` column: every subset of the labels, as bitmasks
    0 .. 2**C - 1 (so the datamodule's range check of the column holds), named without listing 2**C names."""

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)

    def __len__(self) -> int:
        return 1 << len(self.labels)

    def __getitem__(self, mask):  # type: ignore[override]
        if isinstance(mask, slice):
            return [self[i] for i in range(*mask.indices(len(self)))]
        if not 0 <= int(mask) < len(self):
            raise IndexError(mask)
        return "+".join(n for k, n in enumerate(self.labels) if int(mask) >> k & 1) or "none"

    def __repr__(self) -> str:
        return f"<label sets of {self.labels} as bitmasks 0..{len(self) - 1}>"


def value_names(dataset_cfg: Mapping, column: str) -> Sequence[str]:
    if column == "label":
        if is_multilabel(dataset_cfg):
            return LabelSets(dataset_cfg["label_names"])
        return list(dataset_cfg["label_names"])
    attrs = dataset_cfg.get("attributes") or {}
    if column not in attrs:
        raise ConfigError(
            f"grouping refers to unknown attribute {column!r}; dataset {dataset_cfg.get('name')!r} has "
            f"{['label', *attrs.keys()]}"
        )
    return list(attrs[column])


def _excluded(name: str, spec: Mapping, by: Sequence[str], dataset_cfg: Mapping) -> dict[str, set[int]]:
    """``exclude:`` as value indices per ``by`` column (names checked; columns outside ``by`` ignored)."""
    exclude = spec.get("exclude") or {}
    if not isinstance(exclude, Mapping):
        raise ConfigError(f"grouping {name!r}: `exclude` must map columns to value names, e.g. "
                          "{court_region: [n_a]}; got " + repr(exclude))
    out: dict[str, set[int]] = {}
    for col, values in exclude.items():
        if col not in by:
            continue
        names = list(value_names(dataset_cfg, col))
        values = [values] if isinstance(values, str) else list(values or [])
        unknown = [v for v in values if v not in names]
        if unknown:
            raise ConfigError(f"grouping {name!r}: `exclude.{col}` names {unknown}, which are not values of "
                              f"{col} {names}")
        out[col] = {names.index(v) for v in values}
    return out


def build_grouping(name: str, spec: Mapping, dataset_cfg: Mapping,
                   within: tuple[str, int] | None = None) -> Grouping:
    """One grouping from its spec; ``within`` = (column, value index) restricts it to one value (``per:``)."""
    columns = metadata_columns(dataset_cfg)
    by: Sequence[str] = list(spec.get("by") or [])
    each: Sequence[str] = list(spec.get("each") or [])
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ConfigError(f"grouping {name!r}: unknown keys {sorted(unknown)}; use `by` and/or `each` "
                          "(optionally `exclude`, `per`, `average`)")
    average = spec.get("average") or "examples"
    if average not in AVERAGES:
        raise ConfigError(f"grouping {name!r}: `average` is one of {list(AVERAGES)} (rows: one row per example "
                          f"and group, BalancingGroups' CivilComments convention); got {average!r}")
    if not by and not each:
        raise ConfigError(f"grouping {name!r} needs `by` and/or `each`")
    if within is not None:
        by = [c for c in by if c != within[0]]  # the per-column is fixed inside this grouping
    for col in [*by, *each, *([within[0]] if within else [])]:
        value_names(dataset_cfg, col)  # validates
    if is_multilabel(dataset_cfg) and "label" in [*by, *each, *([within[0]] if within else [])]:
        raise ConfigError(
            f"grouping {name!r} of the multi-label dataset {dataset_cfg.get('name')!r} uses `label`, whose values "
            "are label sets (bitmasks); group multi-label data by attributes only, e.g. {by: [applicant_gender]}"
        )
    skip = _excluded(name, spec, by, dataset_cfg)
    products = [combo for combo in itertools.product(*[range(len(value_names(dataset_cfg, c))) for c in by])
                if not any(v in skip.get(c, ()) for c, v in zip(by, combo))] if by else [()]
    names, conds = [], []
    for indicator in (each or [None]):
        for combo in products:
            parts, cond = [], []
            if within is not None:
                cond.append((columns.index(within[0]), within[1]))
            if indicator is not None:
                parts.append(indicator)
                cond.append((columns.index(indicator), 1))
            for col, v in zip(by, combo):
                parts.append(value_names(dataset_cfg, col)[v])
                cond.append((columns.index(col), v))
            names.append(":".join(parts) or "all")
            conds.append(cond)
    where = (within[0], value_names(dataset_cfg, within[0])[within[1]]) if within is not None else None
    return Grouping(name=name, group_names=names, conditions=conds, disjoint=not each, columns=columns,
                    within=where, average=average)


def expand(name: str, spec: Mapping, dataset_cfg: Mapping) -> dict[str, Grouping]:
    """A spec's groupings: itself, or with ``per: <column>`` one grouping per value, ``<name>_<value>``."""
    per = spec.get("per")
    if not per:
        return {name: build_grouping(name, spec, dataset_cfg)}
    if not isinstance(per, str):
        raise ConfigError(f"grouping {name!r}: `per` names one column (e.g. per: language); got {per!r}")
    if name == PRIMARY:
        raise ConfigError(f"the primary grouping {PRIMARY!r} cannot use `per` (it must be one grouping); "
                          "give the per-value groupings another name")
    names = value_names(dataset_cfg, per)
    return {f"{name}_{v}": build_grouping(f"{name}_{v}", spec, dataset_cfg, within=(per, i))
            for i, v in enumerate(names)}


def build_groupings(dataset_cfg: Mapping) -> dict[str, Grouping]:
    specs = dataset_cfg.get("groupings") or {}
    if PRIMARY not in specs:
        raise ConfigError(
            f"dataset {dataset_cfg.get('name')!r} defines no `groupings.{PRIMARY}` (the primary grouping)"
        )
    out = expand(PRIMARY, specs[PRIMARY], dataset_cfg)
    for name, spec in specs.items():
        if name != PRIMARY:
            for key, grouping in expand(name, spec, dataset_cfg).items():
                if key in out:
                    raise ConfigError(f"grouping {key!r} is defined twice (a `per:` grouping expands to "
                                      f"<name>_<value>); rename one of them")
                out[key] = grouping
    return out
