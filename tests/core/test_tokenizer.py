"""mesh.text's tokenizer against the HF tokenizer of both packaged models: identical ids and text.

The heavy proof on all of MMLU, the wiki text, ShareGPT and Home Assistant sentences is
``results/2026-12-06/tokenizer_identity.py``; this is the fast one CI runs: a few thousand
strings chosen to hit every branch (whitespace runs, newlines and tabs that are added tokens in
Gemma, emoji and rare characters that need byte fallback, special tokens typed in the text,
digits, contractions, long runs), plus decoding random ids one prefix at a time as a node streams.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.text import Tokenizer, build_tables, ensure_tables
from mesh.text.tables import FILE_NAME
from tests.conftest import REPO, require_model

MODELS = ("gemma3-270m", "smollm2-135m")

PIECES = [
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2028",
    "\u0085", "\u200b", "\ufeff", "Hello", "world", " the", "The", "it's", "they're", "I'll", "we've", "'d",
    "0", "7", "42", "2026", "3.14159", "1,000,000", "12:30", "-5", "½", "²", "٣", "１２",
    "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🫠", "中文", "日本語のテキスト", "한국어", "Ελληνικά", "русский",
    "العربية", "עברית", "हिन्दी", "ไทย", "é", "e\u0301", "ß", "İ", "ǅ", "ﬁ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0010fffd",
    "\ue000", "\U000e0041", "\x00", "\x07", "\x7f", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>",
    "<start_of_turn>", "<end_of_turn>", "<unused7>", "<unused6241>", "<bo", "bos>", "<|im_start|>",
    "<|im_end|>", "<|endoftext|>", "<|im_start", "<table>", "</td>", "<h1>", "[multimodal]", "<0x41>",
    "▁", "▁▁", "Ġ", "Ċ", "def f(x):\n    return x", "    ", "\t\tif (a) {", "http://example.com/a?b=1",
    "naïve café", "A. ", "\nB. ", "Answer:", " A", " B", "!!!", "...", "—", "“quoted”", "$100",
]


def tricky_strings(n: int, seed: int) -> list[str]:
    """The pieces alone, long runs, then ``n`` random concatenations of 1-8 pieces (seeded)."""
    rng = random.Random(seed)
    out = list(PIECES)
    out += ["a" * 700, " " * 65, "\n" * 40, "\t" * 35, "😀" * 50, "1" * 90, "ab " * 200, ""]
    for _ in range(n):
        out.append("".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8))))
    return out


@pytest.fixture(scope="module", params=MODELS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Tokenizer]:
    from transformers import AutoTokenizer

    src = require_model(request.param)
    tmp = tmp_path_factory.mktemp(request.param)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp / name)
    me = Tokenizer(build_tables(tmp / "tokenizer.json"))
    return AutoTokenizer.from_pretrained(src), me


def test_identity_fields(pair: tuple[object, Tokenizer]) -> None:
    hf, me = pair
    assert len(me) == len(hf)  # type: ignore[arg-type]
    assert (me.eos_token_id, me.bos_token_id, me.pad_token_id) == \
        (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id)  # type: ignore[attr-defined]


def test_encode_identical(pair: tuple[object, Tokenizer]) -> None:
    hf, me = pair
    texts = tricky_strings(2500, seed=1)
    for special in (True, False):
        want = [hf(t, add_special_tokens=special)["input_ids"] for t in texts]  # type: ignore[operator]
        got = [me(t, add_special_tokens=special)["input_ids"] for t in texts]
        bad = [(t, w, g) for t, w, g in zip(texts, want, got) if w != g]
        assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[:3]}"
    assert me.encode("Hello") == me("Hello")["input_ids"]


def test_decode_identical(pair: tuple[object, Tokenizer]) -> None:
    hf, me = pair
    for t in tricky_strings(1000, seed=2):
        ids = hf(t)["input_ids"]  # type: ignore[operator]
        for skip in (True, False):
            want = hf.decode(ids, skip_special_tokens=skip)  # type: ignore[attr-defined]
            assert me.decode(ids, skip_special_tokens=skip) == want, t


def _byte_ids(me: Tokenizer) -> list[int]:
    return [i for i in range(len(me)) if len(p := me.piece(i)) == 6 and p.startswith("<0x")]


def test_streaming_decode_identical(pair: tuple[object, Tokenizer]) -> None:
    """The node decodes all generated ids after every token; every prefix must read the same,
    including prefixes that end inside a character split over byte tokens (U+FFFD)."""
    hf, me = pair
    rng = random.Random(3)
    bytes_ = _byte_ids(me)
    special = sorted({hf.eos_token_id, hf.bos_token_id, 0, 1, 2})  # type: ignore[attr-defined]
    first = hf("Stream 😀 of 中文 text: 42\n\n<b>ok</b>", add_special_tokens=False)  # type: ignore[operator]
    seqs = [first["input_ids"]]
    for _ in range(150):
        pool = [lambda: rng.randrange(len(me))] * 3 + [lambda: rng.choice(special)]
        if bytes_:
            pool += [lambda: rng.choice(bytes_)] * 2
        seqs.append([rng.choice(pool)() for _ in range(24)])
    for ids in seqs:
        for i in range(1, len(ids) + 1):
            for skip in (True, False):
                want = hf.decode(ids[:i], skip_special_tokens=skip)  # type: ignore[attr-defined]
                assert me.decode(ids[:i], skip_special_tokens=skip) == want, ids[:i]


def test_gemma_byte_fallback_is_exercised(pair: tuple[object, Tokenizer]) -> None:
    """Guards the test above: a character missing from Gemma's vocabulary does become bytes."""
    _hf, me = pair
    if me.family != "metaspace-bpe":
        pytest.skip("byte fallback is Gemma's")
    ids = me.encode("\U0010fffd", add_special_tokens=False)
    assert [me.piece(i) for i in ids] == ["<0xF4>", "<0x8F>", "<0xBF>", "<0xBD>"]
    assert me.decode(ids[:2]) == "\ufffd\ufffd" and me.decode(ids) == "\U0010fffd"


def test_no_torch_no_transformers_and_small(pair: tuple[object, Tokenizer]) -> None:
    """A fresh process loads and uses the tokenizer without importing torch or transformers, and
    its resident set grows by at most 30 MiB (file pages of the mapped tables included)."""
    _hf, me = pair
    code = f"""
import json, sys
def status():
    out = {{}}
    for line in open('/proc/self/status'):
        k, v = line.split(':', 1)
        if k in ('VmRSS', 'VmHWM'):
            out[k] = int(v.split()[0]) / 1024
    return out
before = status()
from mesh.text import Tokenizer
tok = Tokenizer({str(me.path)!r})
text = open({str(REPO / 'README.md')!r}, encoding='utf-8').read()[:20000]
ids = tok.encode(text)
assert tok.decode(ids, skip_special_tokens=True) == text
after = status()
print(json.dumps({{'before': before, 'after': after,
                   'heavy': [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    r = json.loads(out.stdout)
    assert r["heavy"] == []
    assert r["after"]["VmHWM"] - r["before"]["VmRSS"] <= 30, r


def test_damaged_files_are_refused(tmp_path: Path, pair: tuple[object, Tokenizer]) -> None:
    _hf, me = pair
    data = me.path.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "empty": b"", "not ours": b"{" + data[1:],
             "other version": data[:8] + (99).to_bytes(4, "little") + data[12:]}
    for name, blob in cases.items():
        p = tmp_path / f"{name}.mesh"
        p.write_bytes(blob)
        with pytest.raises(ConfigError, match="mesh setup"):
            Tokenizer(p)


def test_unsupported_tokenizer_json_is_refused(tmp_path: Path) -> None:
    spec = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "normalizer": None}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="unsupported"):
        build_tables(tmp_path / "tokenizer.json")
    assert not (tmp_path / FILE_NAME).exists()


def test_ensure_tables_builds_once_and_rebuilds_when_stale(tmp_path: Path) -> None:
    """setup's entry point: builds a missing file, keeps a current one, rebuilds a damaged one
    or one made from another tokenizer.json."""
    src = require_model("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    out = ensure_tables(tmp_path)
    first = out.stat().st_mtime_ns
    want = Tokenizer(out).encode("hi there")
    assert ensure_tables(tmp_path) == out and out.stat().st_mtime_ns == first
    out.write_bytes(out.read_bytes()[:100])
    assert Tokenizer(ensure_tables(tmp_path)).encode("hi there") == want
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["added_tokens"].append({"id": 49152, "content": "<new>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert Tokenizer(ensure_tables(tmp_path)).encode("a<new>b") == [81, 49152, 82]


def test_merges_as_strings_or_pairs_build_the_same_tables(tmp_path: Path) -> None:
    """tokenizer.json spells a merge either ``["a", "b"]`` (today) or ``"a b"`` (older files);
    the byte scanner of build_tables reads both to the same tables."""
    src = require_model("smollm2-135m")
    spec = json.loads((src / "tokenizer.json").read_text())
    assert isinstance(spec["model"]["merges"][0], list)
    (tmp_path / "pairs").mkdir()
    (tmp_path / "strings").mkdir()
    (tmp_path / "pairs" / "tokenizer.json").write_text(json.dumps(spec))
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    (tmp_path / "strings" / "tokenizer.json").write_text(json.dumps(spec))
    a = Tokenizer(build_tables(tmp_path / "pairs" / "tokenizer.json"))
    b = Tokenizer(build_tables(tmp_path / "strings" / "tokenizer.json"))
    assert bytes(a._keys) == bytes(b._keys) and bytes(a._vals) == bytes(b._vals)
    assert len(a._keys) == len(spec["model"]["merges"])
    text = "Strings or pairs, the same ids: 42 😀"
    assert a.encode(text) == b.encode(text) and len(a.encode(text)) < len(text)


def _tables(path: Path) -> tuple[dict[str, object], dict[str, bytes]]:
    tok = Tokenizer(path)
    header = json.loads(bytes(tok._buf[16:16 + int.from_bytes(bytes(tok._buf[12:16]), "little")]))
    sections = {"keys": bytes(tok._keys), "vals": bytes(tok._vals), "offsets": bytes(tok._offsets),
                "blob": bytes(tok._blob)}
    tok.close()
    header.pop("source_sha256")
    header.pop("sections")
    return header, sections


def test_tables_from_gguf_equal_tables_from_tokenizer_json(pair: tuple[object, Tokenizer], tmp_path: Path) -> None:
    """Setup can build the tokenizer from the GGUF alone, without transformers: the tables equal
    those built from the tokenizer.json transformers wrote for the same GGUF, field by field and
    byte by byte; and the build stays far below a Pi Zero's 400 MiB (a fresh process's peak)."""
    from mesh.model import model_spec
    from nodes.setup import locate_gguf

    from tests.conftest import CACHE_ROOT

    _hf, me = pair
    key = "gemma3-270m" if me.family == "metaspace-bpe" else "smollm2-135m"
    gguf = locate_gguf(model_spec(key), CACHE_ROOT)
    out = tmp_path / FILE_NAME
    # VmHWM, not ru_maxrss: a child's ru_maxrss keeps the (large) pytest parent's from the fork.
    code = ("import sys; from mesh.text.gguf_vocab import build_tables_from_gguf; "
            "build_tables_from_gguf(sys.argv[1], sys.argv[2]); "
            "print([int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    run = subprocess.run([sys.executable, "-c", code, str(gguf), str(out)], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert float(run.stdout.strip()) < 250, run.stdout
    assert _tables(out) == _tables(me.path)
    assert Tokenizer(out).digest == me.digest and Tokenizer(out).source_sha256 != me.source_sha256


def test_unsupported_gguf_tokenizer_is_refused(tmp_path: Path) -> None:
    import gguf

    from mesh.text.gguf_vocab import build_tables_from_gguf

    w = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "t5")
    w.add_tokenizer_model("t5")
    w.add_token_list(["<pad>", "a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="not supported"):
        build_tables_from_gguf(tmp_path / "t5.gguf", tmp_path / FILE_NAME)
    assert not (tmp_path / FILE_NAME).exists()
