"""Compressor chains: ``compressor=chain compressor.chain=[distill,pr40,dq]``.

Each name is an ordinary compressor config (``conf/compressor/<name>.yaml``), loaded through Hydra so
defaults lists, packaged configs and a user's ``hydra.searchpath`` all work as they do for
``compressor=<name>``. The members' stages are concatenated into ``compressor.stages`` before the run's
identity is taken, so results.json records exactly what ran. The order is checked before any training.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from subgroup_robustness.compression.base import STAGES
from subgroup_robustness.utils.compose import compose_group, group_options
from subgroup_robustness.utils.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from subgroup_robustness.compression.base import Compressor

GROUP = "compressor"
MAX_DEPTH = 8


# ---- expansion --------------------------------------------------------------------------------------
def expand_chain(cfg: DictConfig) -> DictConfig:
    """Fill ``cfg.compressor.stages`` (and ``members``: the member name of every stage) from
    ``cfg.compressor.chain``; name and family become the members', e.g. ``pr40+dq``. In place; a config
    without ``compressor.chain`` is returned unchanged."""
    comp = cfg.get(GROUP)
    if comp is None or comp.get("chain") is None or comp.get("members") is not None:  # none, or done
        return cfg
    names = _names(comp.chain, "compressor.chain")
    if comp.get("stages"):
        raise ConfigError("compressor.chain and compressor.stages are both set; a chain takes its stages "
                          "from its members, so leave compressor.stages empty")
    stages, members, families = [], [], []
    for name in names:
        for stage, member, family in _flatten(cfg, name, ()):
            stages.append(stage)
            members.append(member)
            families.append(family)
    with open_dict(comp):
        comp.stages = stages
        comp.members = members
        if comp.get("name") in (None, "chain"):
            comp.name = "+".join(names)
        if comp.get("family") in (None, "chain"):
            comp.family = "+".join(dict.fromkeys(families))
    return cfg


def _names(value, where: str) -> list[str]:
    if isinstance(value, str):  # compressor.chain=pr40 on the command line
        value = [value]
    if not isinstance(value, (list, tuple, ListConfig)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of compressor names, e.g. {where}=[pr40,dq]; got {value!r}")
    if not value:
        raise ConfigError(f"{where} is empty: name the compressors to chain, e.g. {where}=[pr40,dq]")
    return [str(v) for v in value]


def _flatten(cfg: DictConfig, name: str, parents: tuple[str, ...]):
    """(resolved stage config, member name, family) for every stage of member ``name``; a member that is
    itself a chain is expanded in place."""
    if name in parents or len(parents) >= MAX_DEPTH:
        raise ConfigError(f"compressor chain {' -> '.join([*parents, name])} contains itself")
    member = load_member(name)
    if member.get("chain") is not None:
        for sub in _names(member.chain, f"compressor {name!r}: chain"):
            yield from _flatten(cfg, sub, (*parents, name))
        return
    for stage in _resolved_stages(cfg, name, member):
        yield stage, name, str(member.get("family", "none"))


def _resolved_stages(cfg: DictConfig, name: str, member: DictConfig) -> list[dict]:
    """Resolve the member's stages as if the run were ``compressor=<name>``: ``${compressor.x}`` points at
    the member, everything else (``${dataset.train.lr}``, ``${seed}``) at this run."""
    if not member.get("stages"):
        raise ConfigError(f"compressor {name!r} has no stages, so it adds nothing to a chain; drop it from "
                          "compressor.chain")
    probe = copy.deepcopy(cfg)
    with open_dict(probe):
        probe[GROUP] = member
    try:
        return OmegaConf.to_container(probe[GROUP].stages, resolve=True)
    except Exception as exc:  # noqa: BLE001 - any interpolation error becomes one clear line
        raise ConfigError(f"compressor {name!r} (in compressor.chain): cannot resolve its stages: {exc}") from exc


def load_member(name: str) -> DictConfig:
    """The composed config of ``compressor=<name>``, from the same config sources as this run."""
    from hydra.errors import MissingConfigException

    try:
        return compose_group(GROUP, name)
    except MissingConfigException:
        problem = f"there is no config {GROUP}/{name}.yaml"
    except Exception as exc:  # noqa: BLE001 - a broken member config: one clear line
        problem = f"its config does not compose: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    raise ConfigError(f"compressor.chain names {name!r}, but {problem}; available compressors: "
                      f"{', '.join(available_compressors())}")


def available_compressors() -> list[str]:
    return group_options(GROUP)


# ---- order --------------------------------------------------------------------------------------------
def fit_schedule(stages: Sequence["Compressor"]) -> list[bool]:
    """Whether the experiment fine-tunes right after each stage: a training stage's fine-tuning is shared
    with the training 'during' stages that directly follow it. The one statement of this rule: the
    experiment iterates ``zip(stages, fit_schedule(stages))``."""
    out, pending = [], False
    for i, st in enumerate(stages):
        nxt = stages[i + 1] if i + 1 < len(stages) else None
        pending = pending or bool(st.trains)
        fit = pending and not (nxt is not None and nxt.stage == "during" and nxt.trains)
        out.append(fit)
        if fit:
            pending = False
    return out


def validate_chain(stages: Sequence["Compressor"], names: Sequence[str] | None = None) -> None:
    """Reject an impossible chain before any training, saying why and how to fix it."""
    if not stages:
        return
    names = [str(n) for n in names] if names is not None and len(names) == len(stages) else [s.name for s in stages]
    chain = " -> ".join(names)  # no [brackets]: the console reads them as rich markup

    def fail(why: str) -> None:
        raise ConfigError(f"invalid compressor chain {chain}: {why}")

    for s, n in zip(stages, names):
        if s.stage not in STAGES:
            fail(f"{n!r} declares stage {s.stage!r}; expected one of {STAGES}")
        if s.start_from not in ("pretrained", "finetuned"):
            fail(f"{n!r} declares start_from {s.start_from!r}; expected 'pretrained' or 'finetuned'")
    for i in range(1, len(stages)):
        a, b = stages[i - 1], stages[i]
        if STAGES.index(b.stage) < STAGES.index(a.stage):
            fail(f"{names[i]!r} acts {b.stage} fine-tuning but comes after {names[i - 1]!r}, which acts "
                 f"{a.stage} it. Order the stages before -> during -> after fine-tuning.")
    quant = [i for i, s in enumerate(stages) if s.quantizes]
    if len(quant) > 1:
        fail(f"two quantizations ({', '.join(repr(names[i]) for i in quant)}); an int8 model cannot be quantized "
             "again. Keep one quantizer, last.")
    if quant and quant[0] < len(stages) - 1:
        q, later = quant[0], stages[quant[0] + 1]
        what = ("fine-tunes, and int8 weights cannot be trained" if later.trains
                else "would edit int8 weights, which only the quantizer understands")
        fail(f"{names[q + 1]!r} comes after the quantization {names[q]!r} and {what}. Put the quantizer last.")
    # start_from of a later stage: "pretrained" = no fine-tuning may have finished before it (it may
    # share the next one, as qat after distill); "finetuned" = the model must be fine-tuned by then
    # (the cached base it started from, or a finished fine-tuning)
    fits = fit_schedule(stages)
    if stages[0].stage == "after" and stages[0].start_from != "finetuned":
        fail(f"{names[0]!r} acts after fine-tuning but declares start_from 'pretrained'; an 'after' stage "
             "needs start_from 'finetuned'")
    for i in range(1, len(stages)):
        s, done = stages[i], [names[j] for j in range(i) if fits[j]]
        if s.start_from == "pretrained" and done:
            fail(f"{names[i]!r} starts from the pretrained model, but the chain has already fine-tuned it "
                 f"(after {done[-1]!r}). Put {names[i]!r} first.")
        if s.start_from == "finetuned" and not (stages[0].start_from == "finetuned" or done):
            if s.stage == "after":
                fail(f"{names[i]!r} acts on a fine-tuned model, but nothing before it fine-tunes "
                     f"({', '.join(names[:i])} never train). Add a training stage first, or start with {names[i]!r}.")
            fail(f"{names[i]!r} starts from the fine-tuned base, but after {names[i - 1]!r} the model is a "
                 f"different, not yet fine-tuned one. Put {names[i]!r} first.")
    if not (stages[0].start_from == "finetuned" or any(fits)):
        fail("no stage fine-tunes the pretrained model, so its classifier would be untrained")
