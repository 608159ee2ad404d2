"""Groups are configuration, not code: a grouping spec becomes boolean masks over the batch metadata.

Masks (not a single group id) let one example belong to several groups, as in WILDS' 16
CivilComments groups, and let an example belong to none.

Spec forms, in a dataset config's ``groupings`` mapping (the grouping named ``groups`` is primary):
- ``{by: [label, identity]}``: the Cartesian product of the values: disjoint groups.
- ``{each: [male, female, ...], by: [label]}``: for every listed binary attribute, the examples where
  it is 1, crossed with ``by``: overlapping groups.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from subgroup_robustness.utils.errors import ConfigError

PRIMARY = "groups"


@dataclass
class Grouping:
    name: str
    group_names: list[str]
    conditions: list[list[tuple[int, int]]]  # per group: (metadata column, required value) pairs
    disjoint: bool = True
    columns: list[str] = field(default_factory=list)

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


def metadata_columns(dataset_cfg: Mapping) -> list[str]:
    return ["label", *list((dataset_cfg.get("attributes") or {}).keys())]


def value_names(dataset_cfg: Mapping, column: str) -> list[str]:
    if column == "label":
        return list(dataset_cfg["label_names"])
    attrs = dataset_cfg.get("attributes") or {}
    if column not in attrs:
        raise ConfigError(
            f"grouping refers to unknown attribute {column!r}; dataset {dataset_cfg.get('name')!r} has "
            f"{['label', *attrs.keys()]}"
        )
    return list(attrs[column])


def build_grouping(name: str, spec: Mapping, dataset_cfg: Mapping) -> Grouping:
    columns = metadata_columns(dataset_cfg)
    by: Sequence[str] = list(spec.get("by") or [])
    each: Sequence[str] = list(spec.get("each") or [])
    unknown = set(spec) - {"by", "each"}
    if unknown:
        raise ConfigError(f"grouping {name!r}: unknown keys {sorted(unknown)}; use `by` and/or `each`")
    if not by and not each:
        raise ConfigError(f"grouping {name!r} needs `by` and/or `each`")
    for col in [*by, *each]:
        value_names(dataset_cfg, col)  # validates
    products = list(itertools.product(*[range(len(value_names(dataset_cfg, c))) for c in by])) or [()]
    names, conds = [], []
    for indicator in (each or [None]):
        for combo in products:
            parts, cond = [], []
            if indicator is not None:
                parts.append(indicator)
                cond.append((columns.index(indicator), 1))
            for col, v in zip(by, combo):
                parts.append(value_names(dataset_cfg, col)[v])
                cond.append((columns.index(col), v))
            names.append(":".join(parts))
            conds.append(cond)
    return Grouping(name=name, group_names=names, conditions=conds, disjoint=not each, columns=columns)


def build_groupings(dataset_cfg: Mapping) -> dict[str, Grouping]:
    specs = dataset_cfg.get("groupings") or {}
    if PRIMARY not in specs:
        raise ConfigError(
            f"dataset {dataset_cfg.get('name')!r} defines no `groupings.{PRIMARY}` (the primary grouping)"
        )
    out = {PRIMARY: build_grouping(PRIMARY, specs[PRIMARY], dataset_cfg)}
    for name, spec in specs.items():
        if name != PRIMARY:
            out[name] = build_grouping(name, spec, dataset_cfg)
    return out
