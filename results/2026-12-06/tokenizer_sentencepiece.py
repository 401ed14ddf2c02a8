"""The option that lost: sentencepiece over a model proto built from Gemma's GGUF vocabulary.

Builds ``gemma-{scores,position}.model`` (pieces, types and either the GGUF's scores or minus the
position as the score; multi-space pieces respelled with "▁" as transformers does), then in a
fresh process per variant measures resident memory (``/proc/self/status``, from a bare
interpreter) after loading and after encoding the MMLU workload of ``tokenizer_rss.py``, and
counts the prompts whose ids equal mesh.text's. sentencepiece is not a project dependency:
install it and protobuf into a directory of their own (``pip install --target DIR sentencepiece
protobuf``) and pass it with ``--sp-path``. It cannot express SmolLM2's byte-level BPE at all.

    nice -n 19 .venv/bin/python results/2026-12-06/tokenizer_sentencepiece.py --sp-path DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = r"""
import json, sys
sp_path, model, mesh_file, texts_path = sys.argv[1:5]
sys.path.insert(0, sp_path)
def st():
    d = {}
    for l in open('/proc/self/status'):
        k, v = l.split(':', 1)
        if k in ('VmRSS', 'VmHWM', 'RssAnon', 'RssFile'):
            d[k] = round(int(v.split()[0]) / 1024, 1)
    return d
a = st()
import sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=model)
c = st()
texts = json.load(open(texts_path))
ids = [sp.encode(t) for t in texts]
d = st()
from mesh.text import Tokenizer
me = Tokenizer(mesh_file)
same = sum(me.encode(t, add_special_tokens=False) == i for t, i in zip(texts, ids))
print(json.dumps({'loaded_mib': round(c['VmRSS'] - a['VmRSS'], 1), 'after_work_mib': round(d['VmRSS'] - a['VmRSS'], 1),
                  'peak_mib': round(d['VmHWM'] - a['VmRSS'], 1), 'texts': len(texts), 'ids_identical_texts': same}))
"""


def build(sp_path: Path, gguf: Path, out_dir: Path) -> dict[str, Path]:
    sys.path.insert(0, str(sp_path))
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = GGUFReader(str(gguf)).fields

    def arr(name: str) -> list:
        f = fields[name]
        return [f.parts[i] for i in f.data]

    toks = [bytes(x).decode("utf-8") for x in arr("tokenizer.ggml.tokens")]
    toks = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in toks]
    scores = [float(x[0]) for x in arr("tokenizer.ggml.scores")]
    types = [int(x[0]) for x in arr("tokenizer.ggml.token_type")]
    out = {}
    for variant in ("scores", "position"):
        m = pb.ModelProto()
        m.trainer_spec.model_type = pb.TrainerSpec.BPE
        m.trainer_spec.byte_fallback = True
        m.trainer_spec.vocab_size = len(toks)
        m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 3, 2, 1, 0
        m.normalizer_spec.name = "identity"
        m.normalizer_spec.add_dummy_prefix = False
        m.normalizer_spec.remove_extra_whitespaces = False
        m.normalizer_spec.escape_whitespaces = True
        for i, (t, s, ty) in enumerate(zip(toks, scores, types)):
            p = m.pieces.add()
            p.piece, p.score, p.type = t, (s if variant == "scores" else -float(i)), ty if 1 <= ty <= 6 else 1
        out[variant] = out_dir / f"gemma-{variant}.model"
        out[variant].write_bytes(m.SerializeToString())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sp-path", type=Path, required=True)
    ap.add_argument("--home", type=Path, default=Path.home() / ".cache" / "mesh")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("tokenizer_sentencepiece.json"))
    args = ap.parse_args()
    from tokenizer_rss import workload  # type: ignore[import-not-found]

    from mesh.model import converted_dir
    from mesh.text import build_tables

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        models = build(args.sp_path, args.home / "gguf" / "gemma-3-270m-q4_k_m.gguf", t)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (t / name).write_bytes((converted_dir(args.home, "gemma3-270m") / name).read_bytes())
        mesh_file = build_tables(t / "tokenizer.json")
        (t / "texts.json").write_text(json.dumps(workload(args.home)))
        result = {"what": __doc__.splitlines()[0], "model": "gemma3-270m"}
        for variant, path in models.items():
            r = subprocess.run([sys.executable, "-c", CHILD, str(args.sp_path), str(path), str(mesh_file),
                                str(t / "texts.json")], capture_output=True, text=True, check=True,
                               cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            result[variant] = json.loads(r.stdout.strip().splitlines()[-1])
            print(variant, result[variant], flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
