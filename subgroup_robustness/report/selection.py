"""Model selection after the fact: re-pick a run's epoch with another validation rule from the per-epoch
history it recorded (``phases[*].history``: per fit epoch the validation metrics and the test metrics of
that epoch's weights), without re-running anything.

What can be re-picked, and what cannot:

- The epoch of the run's **last fine-tuning** (the one whose weights were tested). Earlier fine-tunings
  (the cached base a compressed run started from) cannot: the later training started from the epoch they
  picked, so the run would have to be trained again.
- Only when the tested model *is* that fine-tuning's weights: a step after it (``pr40+dq`` quantizes after
  the re-fine-tune; QAT converts its fake-quantized model to int8) changes the model, so the history's test
  metrics are not the final model's. Such runs, runs without history, and post-training compressions with
  no fine-tuning of their own keep the epoch they were run with, and the report says so.
- Only the accuracies the history holds (average, worst-group, per group). Intervals, prediction flips,
  KL and calibration need that epoch's predictions, which are saved only for the epoch the run used.

Ties go to the earliest epoch, as ``BestWeights`` does (a later epoch must be strictly better); every rule
here is maximised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

RULES = ("val/acc_avg", "val/acc_wg")
TOLERANCE = 1e-6  # the recorded epoch's history vs the final test metrics: the same weights, the same numbers

# why a run keeps its own epoch (status -> how the note says it)
KEPT = {
    "no_history": "no per-epoch history in results.json",
    "no_finetune": "no fine-tuning of its own (a post-training compression of the cached base)",
    "post_fit": "the tested model is not the fine-tuned weights (a step after fine-tuning)",
    "no_metric": "the rule's metric is not in its history",
}


@dataclass
class Reselection:
    status: str                         # own | same_epoch | changed | one of KEPT
    monitor: str | None = None          # the rule the run was selected with
    epoch: int | None = None            # the epoch now reported
    original_epoch: int | None = None   # the epoch the run used
    test: dict[str, float] = field(default_factory=dict)  # the chosen epoch's flat test metrics (changed only)
    detail: str = ""

    @property
    def changed(self) -> bool:
        return self.status == "changed"

    @property
    def kept(self) -> bool:
        return self.status in KEPT


def _num(x: Any) -> float:
    try:
        return math.nan if x is None else float(x)
    except (TypeError, ValueError):
        return math.nan


def phases(rec: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in (rec.get("phases") or []) if isinstance(p, dict)] if isinstance(rec.get("phases"), list) else []


def stage_reports(rec: dict[str, Any]) -> list[dict[str, Any]]:
    stages = (rec.get("compression") or {}).get("stages") if isinstance(rec.get("compression"), dict) else None
    return [s for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []


def own_phase(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The fine-tuning whose weights the run tested: its last fit phase; for a compressed run, not the base's
    fine-tune (``base_finetune``, the cached base trained in this job)."""
    own = phases(rec)
    if stage_reports(rec):
        own = [p for p in own if p.get("phase") != "base_finetune"]
    return own[-1] if own else None


def monitors(rec: dict[str, Any]) -> list[str]:
    """The selection metrics the run's fine-tunings used (in order, distinct)."""
    return list(dict.fromkeys(str(p["monitor"]) for p in phases(rec) if p.get("monitor")))


def _after_fit(rec: dict[str, Any], phase: dict[str, Any]) -> str | None:
    """Why the tested model differs from the phase's weights, or None: a stage after the fine-tuning, or a
    quantization-aware fine-tuning (its model is converted to int8 afterwards)."""
    stages = stage_reports(rec)
    if not stages:
        return None
    name = str(phase.get("phase") or "")
    fitted = set(name[len("finetune_"):].split("+")) if name.startswith("finetune_") else set()
    where = [i for i, s in enumerate(stages) if s.get("name") in fitted]
    if where and where[-1] < len(stages) - 1:
        return f"{stages[where[-1] + 1].get('name')} runs after the fine-tuning"
    if any("quantiz" in str(s.get("family", "")) for s in stages if s.get("name") in fitted):
        return "a quantization-aware fine-tuning is converted after it"
    return None


def reselect(rec: dict[str, Any], rule: str | None) -> Reselection:
    """The epoch ``rule`` picks in the run's last fine-tuning, with that epoch's test metrics (see module doc)."""
    phase = own_phase(rec)
    if phase is None:  # a post-training compression, or a base reused from the cache (trained by another job)
        return Reselection(("no_finetune" if stage_reports(rec) else "no_history") if rule else "own")
    monitor = phase.get("monitor")
    original = phase.get("best_epoch")
    original = int(original) if isinstance(original, (int, float)) and not math.isnan(original) else None
    base = Reselection("own", monitor=monitor, epoch=original, original_epoch=original)
    if rule is None or rule == monitor:
        return base
    history = [e for e in (phase.get("history") or []) if isinstance(e, dict) and isinstance(e.get("val"), dict)]
    if not history:
        return Reselection("no_history", monitor=monitor, epoch=original, original_epoch=original)
    why = _after_fit(rec, phase)
    if why:
        return Reselection("post_fit", monitor=monitor, epoch=original, original_epoch=original, detail=why)
    scored = [(v, e) for e in history if not math.isnan(v := _num(e["val"].get(rule)))]
    if not scored:
        return Reselection("no_metric", monitor=monitor, epoch=original, original_epoch=original)
    best_value = max(v for v, _ in scored)
    best = next(e for v, e in scored if v == best_value)  # ties: the earliest epoch, as BestWeights
    # the history must describe the tested model: the recorded epoch's test metrics are the final ones
    final = ((rec.get("metrics") or {}).get("test") or {}) if isinstance(rec.get("metrics"), dict) else {}
    recorded = next((e for e in history if e.get("epoch") == original), None)
    rec_test = (recorded or {}).get("test") if isinstance((recorded or {}).get("test"), dict) else None
    if rec_test is None or not isinstance(best.get("test"), dict):
        return Reselection("no_history", monitor=monitor, epoch=original, original_epoch=original,
                           detail="the history has no test metrics")
    for key in ("test/acc_avg", "test/acc_wg"):
        a, b = _num(rec_test.get(key)), _num(final.get(key))
        if not (math.isnan(a) and math.isnan(b)) and not abs(a - b) <= TOLERANCE:
            return Reselection("post_fit", monitor=monitor, epoch=original, original_epoch=original,
                               detail=f"its epoch {original} history gives {key} {a:.4f}, the final test {b:.4f}")
    epoch = int(best.get("epoch", -1))
    if epoch == original:
        return Reselection("same_epoch", monitor=monitor, epoch=epoch, original_epoch=original)
    return Reselection("changed", monitor=monitor, epoch=epoch, original_epoch=original,
                       test={k: _num(v) for k, v in best["test"].items()})


def describe(rule: str | None, runs: list[tuple[str, Any, Reselection, list[str]]]) -> str:
    """The selection line printed with a table. ``runs``: (setting, seed, reselection, monitors) of its runs."""
    if rule is None:
        used = sorted({m for *_, ms in runs for m in ms})
        return ("Model selection: the epoch each fine-tuning picked by its own rule, as run "
                f"({', '.join(used) if used else 'not recorded in results.json'}); "
                "`--selection val/acc_wg` re-applies another rule from the per-epoch history.")

    def who(items: list[tuple[str, Any]]) -> str:
        by: dict[str, list[str]] = {}
        for setting, seed in items:
            by.setdefault(setting, []).append(str(seed))
        return ", ".join(f"{s} (seed {', '.join(v)})" for s, v in by.items())

    changed = [(s, seed, r) for s, seed, r, _ in runs if r.changed]
    kept: dict[str, list[tuple[str, Any]]] = {}
    for s, seed, r, _ in runs:
        if r.kept:
            kept.setdefault(r.status, []).append((s, seed))
    same = sum(1 for _, _, r, _ in runs if r.status in ("own", "same_epoch"))
    text = (f"Model selection: {rule}, re-applied after the fact to the last fine-tuning of every run from its "
            f"per-epoch history (phases[*].history in results.json). ")
    text += (f"{len(changed)} run(s) changed epoch: " + "; ".join(
        f"{s} seed {seed}: epoch {r.original_epoch} → {r.epoch}" for s, seed, r in changed) + ". ") if changed \
        else "No run changed epoch. "
    text += f"{same} run(s) picked the same epoch as run. "
    if kept:
        text += "Kept the epoch they were run with — " + "; ".join(
            f"{KEPT[status]}: {who(items)}" for status, items in kept.items()) + ". "
    if changed:
        text += ("‡ rows report the re-picked epoch's accuracies; their intervals, flips, KL, calibration and "
                 "probe are of the epoch the run used (only its predictions are saved), so no interval is shown for them, "
                 "nor for the rows compared with them.")
    return text.strip()
