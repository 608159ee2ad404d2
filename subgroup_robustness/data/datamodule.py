"""The one data path: normalized table -> tokenized once (cached on disk) -> length-bucketed,
dynamically padded batches that carry label and metadata (WILDS' contract) with every example."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import lightning.pytorch as L
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from subgroup_robustness.data.groups import PRIMARY, Grouping, build_groupings, cells, metadata_columns, value_names
from subgroup_robustness.data.sources.splits import SPLITS
from subgroup_robustness.data.spec import validate_dataset_spec
from subgroup_robustness.utils.errors import CorruptDataError, instantiate_or_explain
from subgroup_robustness.utils.io import atomic_write_bytes, file_lock, stable_hash

log = logging.getLogger(__name__)


def _as_dict(cfg: Any) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return stable_hash({"tok": text, "side": getattr(tokenizer, "truncation_side", "right")})


def validate_table(df: pd.DataFrame, dataset_cfg: Mapping) -> None:
    """The source kept its contract: every column, known splits, and every label and attribute code an
    index into its names in the config (a code past the end would land in no group, silently)."""
    name = dataset_cfg.get("name")
    needed = ["text", *metadata_columns(dataset_cfg), "split"]
    if dataset_cfg.get("text_pair"):
        needed.insert(1, "text_pair")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise CorruptDataError(f"dataset {name!r}: the source returned no column(s) {missing}")
    bad = set(df["split"].unique()) - set(SPLITS)
    if bad:
        raise CorruptDataError(f"dataset {name!r}: unknown split values {sorted(bad)}; expected {SPLITS}")
    for col in metadata_columns(dataset_cfg):
        names = value_names(dataset_cfg, col)
        where = "label_names" if col == "label" else f"attributes.{col}"
        values = pd.to_numeric(df[col], errors="coerce")
        outside = values.isna() | (values % 1 != 0) | (values < 0) | (values >= len(names))
        if outside.any():
            shown = sorted({str(v) for v in df[col][outside]})[:5]
            raise CorruptDataError(
                f"dataset {name!r}: column {col!r} has value(s) {shown} outside 0..{len(names) - 1}, the indices "
                f"of {where} {names}; the source and the dataset config disagree"
            )


def subsample_table(df: pd.DataFrame, sizes: Mapping[str, int] | None, strata: pd.Series, seed: int) -> pd.DataFrame:
    """Seeded, stratified subsample per split (``strata``: every grouping's cells, ``groups.cells``); every
    non-empty cell keeps at least one example, so no group of any grouping empties by subsampling."""
    if not sizes:
        return df
    keep = []
    for split in SPLITS:
        part = df.index[df["split"] == split]
        n = sizes.get(split)
        if n is None or n >= len(part):
            keep.append(part.to_numpy())
            continue
        frac = n / len(part)
        rng = np.random.default_rng(seed + SPLITS.index(split))
        for _, idx in strata.loc[part].groupby(strata.loc[part]).groups.items():
            idx = np.asarray(idx)
            k = max(1, int(round(frac * len(idx))))
            keep.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return df.loc[np.sort(np.concatenate(keep))]


class TokenizedSplit(Dataset):
    """Ragged token ids stored flat (ids + offsets): compact, cacheable with weights_only loading."""

    def __init__(self, ids: torch.Tensor, offsets: torch.Tensor, token_types: torch.Tensor | None,
                 metadata: torch.Tensor, index: torch.Tensor):
        self.ids, self.offsets, self.token_types = ids, offsets, token_types
        self.metadata, self.index = metadata, index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> np.ndarray:
        return (self.offsets[1:] - self.offsets[:-1]).numpy()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        item = {"input_ids": self.ids[a:b], "metadata": self.metadata[i], "index": self.index[i]}
        if self.token_types is not None:
            item["token_type_ids"] = self.token_types[a:b]
        return item


class Collator:
    """Pads to the longest sequence of the batch only."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        n, t = len(items), max(len(it["input_ids"]) for it in items)
        ids = torch.full((n, t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, t), dtype=torch.long)
        tt = torch.zeros((n, t), dtype=torch.long) if "token_type_ids" in items[0] else None
        for r, it in enumerate(items):
            k = len(it["input_ids"])
            ids[r, :k] = it["input_ids"]
            mask[r, :k] = 1
            if tt is not None:
                tt[r, :k] = it["token_type_ids"]
        metadata = torch.stack([it["metadata"] for it in items])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": metadata[:, 0].clone(),
                 "metadata": metadata, "index": torch.stack([it["index"] for it in items])}
        if tt is not None:
            batch["token_type_ids"] = tt
        return batch


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length (little padding) in a shuffled order (training stays stochastic).

    Shuffles the data, cuts it into pools of ``batch_size * pool_batches`` examples, sorts each pool by
    length, slices it into batches and shuffles the batches. Seeded per epoch. Shards batches over
    ``num_replicas`` processes for DDP.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                 pool_batches: int = 50, bucket: bool = True, num_replicas: int = 1, rank: int = 0):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.pool_batches, self.bucket = pool_batches, bucket
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.bucket:
            if self.shuffle:
                pool = self.batch_size * self.pool_batches
                order = np.concatenate([
                    chunk[np.argsort(self.lengths[chunk], kind="stable")]
                    for chunk in np.array_split(order, max(1, math.ceil(n / pool)))
                ]) if n else order
            else:
                order = np.argsort(self.lengths, kind="stable")
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.num_replicas > 1:
            if self.shuffle:  # equal step counts for DDP training; evaluation never duplicates an example
                per = math.ceil(len(batches) / self.num_replicas)
                batches = batches + batches[: per * self.num_replicas - len(batches)]
            batches = batches[self.rank::self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        if self.shuffle:
            self.epoch += 1  # also advances without Lightning's set_epoch
        return iter(batches)

    def __len__(self) -> int:
        n = math.ceil(len(self.lengths) / self.batch_size)
        if self.shuffle or self.num_replicas == 1:
            return math.ceil(n / self.num_replicas)
        return len(range(self.rank, n, self.num_replicas))


class GroupDataModule(L.LightningDataModule):
    def __init__(self, dataset: Mapping, batch_size: int = 32, eval_batch_size: int = 64,
                 num_workers: int = 0, bucket: bool = True, seed: int = 0,
                 cache_dir: str | None = None, tokenizer=None):
        super().__init__()
        validate_dataset_spec(dataset)  # before resolving: a missing key is named, not an interpolation error
        self.cfg = _as_dict(dataset)
        validate_dataset_spec(self.cfg)  # resolved: the interpolated values' types too
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.bucket, self.seed = int(num_workers), bool(bucket), int(seed)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.tokenizer = tokenizer
        self.groupings: dict[str, Grouping] = build_groupings(self.cfg)
        self.columns = metadata_columns(self.cfg)
        self.table: pd.DataFrame | None = None
        self.splits: dict[str, TokenizedSplit] = {}

    # ---- the table -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.cfg["name"]

    @property
    def max_length(self) -> int:
        """Tokens per example (the dataset's ``max_length``); compressors that tokenize on their own use it."""
        return int(self.cfg.get("max_length", 128))

    @property
    def num_labels(self) -> int:
        return len(self.cfg["label_names"])

    @property
    def primary(self) -> Grouping:
        return self.groupings[PRIMARY]

    def load_table(self) -> pd.DataFrame:
        if self.table is None:
            df = instantiate_or_explain(self.cfg["source"])  # a source's UserError reaches the user as itself
            validate_table(df, self.cfg)
            df = df.reset_index(drop=True)
            for col in self.columns:
                df[col] = df[col].astype(int)
            meta = torch.as_tensor(df[self.columns].to_numpy(), dtype=torch.long)
            strata = pd.Series(cells(self.groupings, meta).numpy(), index=df.index)  # every grouping's cells
            df = subsample_table(df, self.cfg.get("subsample"), strata, int(self.cfg.get("subsample_seed", 0)))
            self.table = df.reset_index(drop=True)
        return self.table

    def texts(self, split: str = "train") -> list[str]:
        df = self.load_table()
        part = df[df["split"] == split]
        out = part["text"].tolist()
        if self.cfg.get("text_pair"):
            out += part["text_pair"].tolist()
        return out

    def group_counts(self, grouping: str = PRIMARY) -> pd.DataFrame:
        """Examples per group and split (one example may count in several overlapping groups)."""
        df = self.load_table()
        g = self.groupings[grouping]
        rows = {}
        for split in SPLITS:
            part = df[df["split"] == split]
            m = g.masks(torch.as_tensor(part[self.columns].to_numpy(), dtype=torch.long))
            rows[split] = m.sum(0).tolist()
        out = pd.DataFrame(rows, index=g.group_names)
        out["all"] = out.sum(axis=1)
        return out

    # ---- tokenization ------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer) -> None:
        """Vocabulary transfer swaps the tokenizer: the cached splits must be rebuilt with the new one."""
        self.tokenizer = tokenizer
        self.splits = {}

    def _tokenize(self, df: pd.DataFrame) -> dict[str, torch.Tensor]:
        from tqdm.auto import tqdm

        tok = self.tokenizer
        tok.truncation_side = self.cfg.get("truncation_side", "right")
        max_len = int(self.cfg.get("max_length", 128))
        pair = bool(self.cfg.get("text_pair"))
        ids, tts, offsets = [], [], [0]
        step = 4096
        for start in tqdm(range(0, len(df), step), desc=f"tokenizing {self.name}", disable=len(df) < 20000):
            chunk = df.iloc[start:start + step]
            enc = tok(chunk["text"].tolist(), chunk["text_pair"].tolist() if pair else None,
                      truncation=True, max_length=max_len, return_attention_mask=False,
                      return_token_type_ids=pair)
            for j, seq in enumerate(enc["input_ids"]):
                ids.append(np.asarray(seq, dtype=np.int32))
                offsets.append(offsets[-1] + len(seq))
                if pair:
                    tts.append(np.asarray(enc["token_type_ids"][j], dtype=np.int8))
        out = {
            "ids": torch.from_numpy(np.concatenate(ids) if ids else np.zeros(0, np.int32)),
            "offsets": torch.as_tensor(offsets, dtype=torch.long),
            "metadata": torch.as_tensor(df[self.columns].to_numpy().copy(), dtype=torch.long),
            "index": torch.as_tensor(df.index.to_numpy().copy(), dtype=torch.long),
            "split": torch.as_tensor(df["split"].map({s: i for i, s in enumerate(SPLITS)}).to_numpy().copy()),
        }
        if pair:
            out["token_types"] = torch.from_numpy(np.concatenate(tts))
        return out

    def _tokenized(self) -> dict[str, torch.Tensor]:
        df = self.load_table()
        fingerprint = {
            "table": stable_hash(pd.util.hash_pandas_object(df, index=True).to_numpy().tolist(), 16),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "max_length": self.cfg.get("max_length", 128),
            "columns": self.columns,
        }
        if self.cache_dir is None:
            return self._tokenize(df)
        path = self.cache_dir / "tokenized" / f"{self.name}-{stable_hash(fingerprint, 16)}.pt"
        with file_lock(path.with_suffix(".lock")):
            if path.exists():
                try:
                    return torch.load(path, weights_only=True)
                except Exception:
                    log.warning("token cache %s unreadable; rebuilding it", path)
            data = self._tokenize(df)
            buf = io.BytesIO()
            torch.save(data, buf)
            atomic_write_bytes(path, buf.getvalue())
            return data

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.tokenizer is None:
            raise RuntimeError("GroupDataModule needs a tokenizer before setup(); call set_tokenizer().")
        data = self._tokenized()
        n = len(data["index"])
        lengths = data["offsets"][1:] - data["offsets"][:-1]
        for s, split in enumerate(SPLITS):
            rows = torch.nonzero(data["split"] == s).flatten()
            # re-pack each split's ids contiguously
            starts, lens = data["offsets"][:-1][rows], lengths[rows]
            if len(rows):
                gather = torch.cat([torch.arange(a, a + k) for a, k in zip(starts.tolist(), lens.tolist())])
            else:
                gather = torch.zeros(0, dtype=torch.long)
            offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
            offsets[1:] = torch.cumsum(lens, 0)
            self.splits[split] = TokenizedSplit(
                data["ids"][gather], offsets,
                data["token_types"][gather] if "token_types" in data else None,
                data["metadata"][rows], data["index"][rows],
            )
        assert sum(len(v) for v in self.splits.values()) == n

    # ---- loaders ----------------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        ds = self.splits[split]
        replicas, rank = 1, 0
        if self.trainer is not None and self.trainer.world_size > 1:
            replicas, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = BucketBatchSampler(
            ds.lengths, self.batch_size if train else self.eval_batch_size, shuffle=train,
            seed=self.seed, bucket=self.bucket or not train, num_replicas=replicas, rank=rank,
        )
        return DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(self.tokenizer.pad_token_id or 0),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
