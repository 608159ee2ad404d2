"""Test helpers (importable as ``tests.helpers``)."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

WORDS = ("the women men people are always never good bad lazy smart they those all some jewish muslim "
         "black gay lesbian female girls guys really think know hate love stupid kind very not no").split()


def make_tiny_bert(folder: Path, num_labels: int = 2, layers: int = 2, hidden: int = 32, heads: int = 4,
                   corpus: Sequence[str] | None = None, seed: int = 0) -> Path:
    """Random tiny BERT + a WordPiece tokenizer trained on a toy corpus, saved like any HF checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = list(corpus or [" ".join(rng.choices(WORDS, k=12)) for _ in range(300)])
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(corpus, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=128,
                        num_labels=num_labels)
    model = BertForSequenceClassification(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


REDDITBIAS_FILES = {
    "female": "data/gender/reddit_comments_gender_female_processed_phrase_annotated.csv",
    "lgbtq": "data/orientation/reddit_comments_orientation_lgbtq_processed_phrase_annotated.csv",
    "black": "data/race/reddit_comments_race_black_processed_phrase_annotated.csv",
    "jewish": "data/religion1/reddit_comments_religion1_jews_processed_phrase_annotated.csv",
    "muslim": "data/religion2/reddit_comments_religion2_muslims_processed_phrase_annotated.csv",
}


def make_redditbias_root(root: Path, rows_per_identity: int = 60, seed: int = 0) -> Path:
    """RedditBias-format CSVs (latin-1) reproducing the real quirks: labels as 1/1.0/'2'/'biased?'/blank,
    empty comments and duplicates. The label is learnable from a keyword, so tiny models can fit it."""
    rng = random.Random(seed)
    for identity, rel in REDDITBIAS_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(rows_per_identity):
            label = rng.random() < 0.55
            words = rng.choices(WORDS, k=8) + ["hate" if label else "love", identity]
            rows.append({"id": f"x{i}", "attribute_in_window": "True", "comment": " ".join(words) + " caf\xe9",
                         "phrase": identity, "bias_sent": ("1.0" if label else "0.0") if i % 2 else ("1" if label else "0"),
                         "bias_phrase": "0"})
        rows += [
            {"id": "q1", "attribute_in_window": "True", "comment": "an odd label two", "phrase": "", "bias_sent": "2", "bias_phrase": ""},
            {"id": "q2", "attribute_in_window": "True", "comment": "is this biased", "phrase": "", "bias_sent": "biased?", "bias_phrase": ""},
            {"id": "q3", "attribute_in_window": "True", "comment": "not annotated", "phrase": "", "bias_sent": "", "bias_phrase": ""},
            {"id": "q4", "attribute_in_window": "True", "comment": "   ", "phrase": "", "bias_sent": "1", "bias_phrase": ""},
            dict(rows[0], id="dup"),  # exact duplicate comment
        ]
        with open(path, "w", encoding="latin-1", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
    return root


def compose(overrides: Sequence[str] = (), config_name: str = "config"):
    """The real config tree with its hydra node, without running the app (``utils.compose``, the one
    composer of tests, benchmarks, describe and chain members)."""
    from subgroup_robustness.utils.compose import compose as sr_compose

    assert config_name == "config", "the project has one primary config"
    return sr_compose(overrides, fresh=True, hydra=True)


def tiny_overrides(model_dir: Path, redditbias_root: Path, out_dir: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run: tiny BERT, fixture RedditBias, one short epoch, no loggers."""
    return [
        "model=local", f"model.path={model_dir}",
        f"dataset.source.root={redditbias_root}",
        "trainer.max_epochs=1", "trainer.precision=32-true", "logger=none", "print_config=false",
        "callbacks.progress=null",
        f"hydra.run.dir={out_dir}",
        *extra,
    ]


def run_in_process(overrides: Sequence[str]):
    """Compose and run one experiment in this process as the entry point does (fast: no interpreter
    start-up): the job's folder from ``hydra.run.dir=``, the config checked and completed, then the run."""
    from subgroup_robustness.experiment import run
    from subgroup_robustness.preflight import check_config
    from subgroup_robustness.utils.compose import compose as sr_compose

    out = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    rest = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    cfg = sr_compose(rest, out_dir=out[-1] if out else Path.cwd() / "run", fresh=True)
    check_config(cfg)  # as the entry point does: chains expanded, arguments checked
    return run(cfg)


def run_cli(args: Sequence[str], cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real entry point, ``python -m subgroup_robustness``, in a subprocess."""
    full_env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "subgroup_robustness", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ---- fake results.json files for report tests (appended by the grid/report work) -------------------------
FAKE_DATASET = {"name": "redditbias", "label_names": ["not_biased", "biased"],
                "attributes": {"identity": ["female", "lgbtq", "black", "jewish", "muslim"]},
                "groupings": {"groups": {"by": ["label", "identity"]}}}


def write_fake_run(folder: Path, *, model: str = "minilm_l6", compressor: str = "none", family: str = "none",
                   seed: int = 1, group_acc: Sequence[float] | float = 0.8, n_per_group: int = 60,
                   size_mb: float = 90.9, params: float = 22.7e6, experiment: str = "offline_grid",
                   status: str = "completed", objective: str = "erm", rng_seed: int | None = None) -> dict:
    """A results.json (+ predictions.npz with metadata) in the schema experiment.run writes, with exactly
    round(acc * n) correct test examples per group: the report's numbers can be checked by hand."""
    import json

    import numpy as np

    from subgroup_robustness.data.groups import PRIMARY, build_groupings
    from subgroup_robustness.metrics.group_metrics import flatten_metrics

    folder.mkdir(parents=True, exist_ok=True)
    run = {"dataset": FAKE_DATASET["name"], "model": model, "compressor": compressor, "family": family,
           "seed": seed, "objective": objective, "experiment": experiment, "task_name": "train"}
    record = {"schema_version": 1, "status": status, "run_id": f"{model}-{compressor}-{seed}", "run": run,
              "metrics": {}, "groups": {}, "model": {}, "base": None, "compression": {"stages": []},
              "timing": {}, "config": {"dataset": FAKE_DATASET, "seed": seed}, "started": "2026-01-01T00:00:00",
              "output_dir": str(folder)}
    if status == "failed":
        record["error"] = {"type": "RuntimeError", "message": "boom: the fake job failed", "traceback": ""}
        record["finished"] = "2026-01-01T00:01:00"
    if status == "completed":
        grouping = build_groupings(FAKE_DATASET)[PRIMARY]
        accs = [group_acc] * grouping.n_groups if isinstance(group_acc, (int, float)) else list(group_acc)
        rng = np.random.default_rng(rng_seed if rng_seed is not None else seed)
        meta, correct = [], []
        for (cond, acc) in zip(grouping.conditions, accs):
            row = [0, 0]
            for col, value in cond:
                row[col] = value
            meta += [row] * n_per_group
            hits = np.zeros(n_per_group, bool)
            hits[rng.choice(n_per_group, int(round(acc * n_per_group)), replace=False)] = True
            correct.append(hits)
        meta, correct = np.asarray(meta, np.int16), np.concatenate(correct)
        # dataset row ids (the same example has the same id in every run), not in test order
        index = np.random.default_rng(12345).permutation(len(meta)).astype(np.int32)
        label = meta[:, 0].astype(np.int32)
        pred = np.where(correct, label, 1 - label).astype(np.int32)
        order = np.argsort(index)
        np.savez_compressed(folder / "predictions.npz", index=index[order], label=label[order], pred=pred[order],
                            metadata=meta[order], metadata_columns=np.asarray(["label", "identity"]))
        import torch

        masks = grouping.masks(torch.as_tensor(meta.astype(np.int64))).numpy()
        n_g, c_g = masks.sum(0), (masks & correct[:, None]).sum(0)
        acc_g = {name: float(c / n) for name, c, n in zip(grouping.group_names, c_g, n_g)}
        worst = min(acc_g, key=acc_g.get)
        res = {"acc_avg": float(correct.mean()), "acc_wg": acc_g[worst], "worst_group": worst, "acc": acc_g,
               "count": {k: int(v) for k, v in zip(grouping.group_names, n_g)}, "n": int(len(correct))}
        record["groups"] = {"test": {PRIMARY: res}, "val": {PRIMARY: res}}
        record["metrics"] = {"test": flatten_metrics("test", None, res), "val": flatten_metrics("val", None, res)}
        record["model"] = {"params": params, "size_mb": size_mb, "size_bytes": int(size_mb * 1e6)}
        record["predictions"] = "predictions.npz"
        record["finished"] = f"2026-01-01T00:{seed:02d}:00"
        record["timing"] = {"total": 12.5}
    (folder / "results.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record
