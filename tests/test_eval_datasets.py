"""Extra test sets (eval_datasets=[...]): any dataset config scored after a run's own test, with its own
groupings under its own prefix (test_<name>/...), tokenized with the run's tokenizer; incompatible label
spaces are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from subgroup_robustness.evaluation import check_compatible, eval_dataset_config, eval_entries
from subgroup_robustness.results import read_predictions
from subgroup_robustness.utils.errors import ConfigError
from tests.data.fixtures import mnli_parts, write_mnli_local_jsonl
from tests.data.multilingual_fixtures import write_mhc, write_xnli, xnli_parts
from tests.helpers import compose, run_in_process, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_entries_are_names_or_mappings():
    cfg = OmegaConf.create({"eval_datasets": ["xnli", {"dataset": "mhc", "split": "test", "name": "hate",
                                                        "source": {"languages": ["de"]}}]})
    assert eval_entries(cfg) == [
        {"dataset": "xnli", "split": "test", "name": "xnli", "overrides": {}},
        {"dataset": "mhc", "split": "test", "name": "hate", "overrides": {"source": {"languages": ["de"]}}},
    ]
    assert eval_entries(OmegaConf.create({})) == [] and eval_entries(OmegaConf.create({"eval_datasets": []})) == []
    with pytest.raises(ConfigError, match="lists 'xnli' twice"):
        eval_entries(OmegaConf.create({"eval_datasets": ["xnli", "xnli"]}))
    with pytest.raises(ConfigError, match="split='train'; use test or val"):
        eval_entries(OmegaConf.create({"eval_datasets": [{"dataset": "xnli", "split": "train"}]}))
    with pytest.raises(ConfigError, match="a dataset name or"):
        eval_entries(OmegaConf.create({"eval_datasets": [3]}))


def test_the_dataset_config_resolves_in_the_run_and_merges_its_eval_block(tmp_path):
    run = compose([f"paths.data_dir={tmp_path}"])
    d = eval_dataset_config(run, {"dataset": "xnli", "overrides": {"source": {"languages": ["sw"]}}})
    assert d["name"] == "xnli" and d["source"]["train"] == "none" and d["source"]["languages"] == ["sw"]
    assert d["source"]["cache_dir"] == f"{tmp_path}/xnli" and "eval" not in d
    assert d["groupings"]["lang"]["per"] == "language"
    fscs = eval_dataset_config(run, {"dataset": "fscs"})  # ${dataset.attribute} is the extra set's own
    assert fscs["groupings"]["groups"]["by"] == ["label", "legal_area"]
    with pytest.raises(ConfigError, match="no dataset config 'nope'"):
        eval_dataset_config(run, {"dataset": "nope"})


def test_incompatible_label_spaces_are_refused():
    run = OmegaConf.to_container(compose([]).dataset, resolve=True)  # redditbias: 2 labels, single texts
    mhc = OmegaConf.to_container(compose(["dataset=mhc"]).dataset, resolve=True)
    check_compatible("mhc", run, mhc)
    xnli = OmegaConf.to_container(compose(["dataset=xnli"]).dataset, resolve=True)
    with pytest.raises(ConfigError, match="'xnli' encodes sentence pairs but the run's dataset 'redditbias' single texts"):
        check_compatible("xnli", run, xnli)
    scotus = OmegaConf.to_container(compose(["dataset=scotus"]).dataset, resolve=True)
    with pytest.raises(ConfigError, match="'scotus' has 11 labels .* 'redditbias' has 2"):
        check_compatible("scotus", run, scotus)
    ecthr = OmegaConf.to_container(compose(["dataset=ecthr"]).dataset, resolve=True)
    with pytest.raises(ConfigError, match="'ecthr' is multi-label but the run's dataset 'redditbias' is single-label"):
        check_compatible("ecthr", run, ecthr)


def test_a_redditbias_run_reports_mhc_groups_under_its_prefix(tiny_model_dir, redditbias_root, sr_env):
    root = write_mhc(sr_env / "mhc", ["german", "hindi", "mandarin"])
    out = sr_env / "run"
    entry = f"{{dataset:mhc,source:{{path:'{root}',languages:[de,hi,zh]}}}}"
    rec = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out, f"++eval_datasets=[{entry}]"))
    assert rec["status"] == "completed"
    own, extra = rec["metrics"]["test"], rec["metrics"]["test_mhc"]
    assert "test/acc_wg" in own and not any(k.startswith("test_mhc") for k in own)  # the run's own keys stay
    assert all(k.startswith("test_mhc/") for k in extra)
    assert 0.0 <= extra["test_mhc/acc_wg"] <= extra["test_mhc/acc_avg"] <= 1.0
    for code in ("de", "hi", "zh"):
        assert 0.0 <= extra[f"test_mhc/lang_{code}/acc_wg"] <= 1.0
        assert extra[f"test_mhc/language/acc/{code}"] >= extra[f"test_mhc/lang_{code}/acc_wg"]
    assert "test_mhc/acc/de:women:hateful" in extra and "test_mhc/acc/hi:lower_caste:hateful" in extra
    groups = rec["groups"]["test_mhc"]
    assert groups["groups"]["n"] == 120 and set(groups) >= {"groups", "lang_de", "language", "functionality"}
    info = rec["eval_datasets"]["mhc"]
    assert info["examples"] == 120 and info["label_names"] == ["non_hateful", "hateful"]
    assert info["run_label_names"] == ["not_biased", "biased"]
    z = read_predictions(out / info["predictions"])
    assert len(z["index"]) == 120 and list(z["metadata_columns"]) == ["label", "target", "language", "functionality"]
    assert z["probs"].shape == (120, 2)
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["test_mhc"]["test_mhc/acc_wg"] == pytest.approx(extra["test_mhc/acc_wg"])


def test_a_multinli_run_scored_on_xnli_per_language(tmp_path_factory, sr_env):
    from tests.data.fixtures import run_overrides
    from tests.helpers import make_tiny_bert

    mnli = write_mnli_local_jsonl(sr_env / "dev.jsonl", [r for p in mnli_parts(90, 30).values() for r in p])
    xnli = write_xnli(sr_env / "xnli", xnli_parts(6, 10, ["en", "de", "sw"]))
    entry = f"{{dataset:xnli,source:{{path:'{xnli}',languages:[en,sw]}}}}"
    model = make_tiny_bert(tmp_path_factory.mktemp("tiny3"), num_labels=3)
    rec = run_in_process(run_overrides(model, sr_env / "run", "multinli", f"dataset.source.path={mnli}",
                                       f"++eval_datasets=[{entry}]"))
    extra = rec["metrics"]["test_xnli"]
    assert rec["eval_datasets"]["xnli"]["examples"] == 20  # XNLI test, en + sw, 10 pairs each; no training rows
    assert "test_xnli/lang_sw/acc_wg" in extra and "test_xnli/lang_en/acc_wg" in extra
    assert not np.isnan(extra["test_xnli/negation/acc_wg"])
