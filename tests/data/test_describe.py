"""The describe command: the same Hydra overrides as a run, split sizes and per-group counts for every
grouping, offline default included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

from subgroup_robustness.data import describe
from tests.data.fixtures import civil_rows, mnli_parts, write_mnli_local_jsonl, write_wilds_csv


def test_multinli_counts_match_the_rows(sr_env, capsys):
    rows = [r for part in mnli_parts(120, 60).values() for r in part]
    path = write_mnli_local_jsonl(sr_env / "dev.jsonl", rows)
    summary = describe.summarize(describe.compose_config(["dataset=multinli", f"dataset.source.path={path}"]))
    counts = summary["groupings"]["groups"]["counts"]
    assert list(counts) == ["contradiction:no_negation", "contradiction:negation", "entailment:no_negation",
                            "entailment:negation", "neutral:no_negation", "neutral:negation"]
    from subgroup_robustness.data.sources.multinli import has_negation

    expect = Counter(f"{r['gold_label']}:{'negation' if has_negation(r['sentence2']) else 'no_negation'}"
                     for r in rows if r["gold_label"] != "-")
    assert {g: c["all"] for g, c in counts.items()} == dict(expect)
    assert sum(summary["split_sizes"].values()) == sum(expect.values())
    assert all(c["train"] + c["val"] + c["test"] == c["all"] for c in counts.values())

    assert describe.main(["dataset=multinli", f"dataset.source.path={path}"]) == 0
    out = capsys.readouterr().out
    assert "split sizes" in out and "6 groups, disjoint" in out
    assert "multinli: labels contradiction, entailment, neutral" in out
    assert "multinli: attribute has_negation no_negation, negation" in out
    assert summary["attributes"] == {"has_negation": ["no_negation", "negation"]}
    for group in counts:
        assert group in out


def test_overlapping_groups_show_the_examples_in_none(sr_env, capsys):
    path = write_wilds_csv(sr_env / "all_data_with_identities.csv", civil_rows(120))
    assert describe.main(["--json", "dataset=civilcomments", f"dataset.source.path={path}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["groupings"]) == {"groups", "wilds16", "rowdup"}
    assert summary["groupings"]["rowdup"]["average"] == "rows" and summary["groupings"]["wilds16"]["average"] == "examples"
    wilds = summary["groupings"]["wilds16"]
    assert not wilds["disjoint"] and len(wilds["counts"]) == 16
    none = sum(wilds["in_no_group"].values())
    assert none > 0 and summary["groupings"]["groups"]["in_no_group"] == {"train": 0, "val": 0, "test": 0}
    no_identity = summary["groupings"]["groups"]["counts"]
    assert none == no_identity["non_toxic:no_identity"]["all"] + no_identity["toxic:no_identity"]["all"]
    assert describe.main(["dataset=civilcomments", f"dataset.source.path={path}"]) == 0
    out = capsys.readouterr().out
    assert "overlapping" in out and "(in no group)" in out and "male:toxic" in out


def test_missing_data_is_a_clear_error(sr_env, capsys):
    assert describe.main(["dataset=scotus", f"dataset.source.path={sr_env / 'nowhere'}"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "error:" in out and "scotus" in out and "dataset.source.path" in out


def test_cli_on_the_offline_default(redditbias_root, sr_env):
    proc = subprocess.run([sys.executable, "-m", "subgroup_robustness.data", f"dataset.source.root={redditbias_root}"],
                          cwd=sr_env, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "redditbias: split sizes" in proc.stdout and "10 groups, disjoint" in proc.stdout
    assert "biased:muslim" in proc.stdout and "Traceback" not in proc.stderr
