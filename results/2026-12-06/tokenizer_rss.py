"""Resident memory (and encode time) of each tokenizer option, each in a fresh subprocess.

Options, per model:

- ``hf``: ``transformers.AutoTokenizer`` over the converted directory (what nodes load today),
  measured from a process that has already imported torch and transformers;
- ``tokenizers``: the Rust library alone, ``tokenizers.Tokenizer.from_file(tokenizer.json)``;
- ``tokenizers_no_merges`` / ``tokenizers_no_added``: the same with the merges (or the added
  tokens) cut out of the JSON: where the library's memory goes (not usable tokenizers);
- ``mesh``: ``mesh.text.Tokenizer`` over ``tokenizer.mesh``, from a bare interpreter (its imports
  count against it).

Each child records ``/proc/self/status`` (VmRSS, VmHWM, RssAnon, RssFile) at its baseline, after
loading, and after the workload (encoding the MMLU 1-shot prompts, then decoding 64 ids one token
at a time as a node streams). The peak is reset after the baseline (``clear_refs`` 5), so
``peak_mib`` is the highest resident set from the load on, minus the baseline. Times are CPU
seconds of the child (``time.process_time``) on a shared machine: compare them only within a run.
Usage: ``nice -n 19 .venv/bin/python results/2026-12-06/tokenizer_rss.py [--out F]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
def status():
    out = {}
    for line in open('/proc/self/status'):
        k, v = line.split(':', 1)
        if k in ('VmRSS', 'VmHWM', 'RssAnon', 'RssFile'):
            out[k] = round(int(v.split()[0]) / 1024, 1)
    return out
kind = spec['kind']
if kind == 'hf':
    import torch, transformers
elif kind.startswith('tokenizers'):
    import tokenizers
base = status()
open('/proc/self/clear_refs', 'w').write('5')
t0 = time.process_time()
if kind == 'hf':
    tok = transformers.AutoTokenizer.from_pretrained(spec['dir'])
    enc = lambda t: tok(t)['input_ids']
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True)
elif kind.startswith('tokenizers'):
    tok = tokenizers.Tokenizer.from_file(spec['json'])
    enc = lambda t: tok.encode(t).ids
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True)
else:
    from mesh.text import Tokenizer
    tok = Tokenizer(spec['mesh'])
    enc = lambda t: tok(t)['input_ids']
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True)
load_s = time.process_time() - t0
loaded = status()
texts = json.load(open(spec['texts']))
t0 = time.process_time()
ids = [enc(t) for t in texts]
encode_s = time.process_time() - t0
gen = ids[0][-64:]
t0 = time.process_time()
for i in range(1, len(gen) + 1):
    dec(gen[:i])
stream_s = time.process_time() - t0
done = status()
print(json.dumps({'base': base, 'loaded': loaded, 'done': done, 'load_s': load_s, 'encode_s': encode_s,
                  'stream_s_per_64': stream_s, 'ids': sum(map(len, ids)), 'heavy': sorted(
                      m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules)}))
"""


def workload(home: Path) -> list[str]:
    """Every subject's first test questions as the node's 1-shot prompts (4 per subject)."""
    from nodes.mmlu import one_shot_prompt, read_split, subjects

    data = home / "data" / "mmlu-0.9.0"
    out = []
    for s in subjects(data):
        ex = read_split(data, s, "dev")[0]
        out += [one_shot_prompt(ex, q) for q in read_split(data, s, "test")[:4]]
    return out


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT, check=True, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                                                    "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    b, l, d = r["base"], r["loaded"], r["done"]
    r["load_mib"] = round(l["VmRSS"] - b["VmRSS"], 1)
    r["after_work_mib"] = round(d["VmRSS"] - b["VmRSS"], 1)
    r["anon_mib"] = round(d["RssAnon"] - b["RssAnon"], 1)
    r["file_mib"] = round(d["RssFile"] - b["RssFile"], 1)
    r["peak_mib"] = round(d["VmHWM"] - b["VmRSS"], 1)
    return r


def measure_all(home: Path, models: list[str]) -> dict[str, Any]:
    from mesh.model import converted_dir
    from mesh.text import build_tables

    result: dict[str, Any] = {"conditions": __doc__.split("\n\n")[-1].strip()}
    with tempfile.TemporaryDirectory() as tmp:
        texts_path = Path(tmp) / "texts.json"
        texts = workload(home)
        texts_path.write_text(json.dumps(texts))
        result["workload"] = {"prompts": len(texts), "chars": sum(map(len, texts))}
        for model in models:
            src = converted_dir(home, model)
            d = Path(tmp) / model
            d.mkdir()
            spec = json.loads((src / "tokenizer.json").read_text())
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (d / name).write_bytes((src / name).read_bytes())
            mesh_file = build_tables(d / "tokenizer.json")
            no_merges = dict(spec, model=dict(spec["model"], merges=[]))
            (d / "no_merges.json").write_text(json.dumps(no_merges))
            no_added = dict(spec, added_tokens=[a for a in spec["added_tokens"] if a["special"] and a["id"] < 8])
            (d / "no_added.json").write_text(json.dumps(no_added))
            del spec, no_merges, no_added
            runs = {
                "hf": {"kind": "hf", "dir": str(d)},
                "tokenizers": {"kind": "tokenizers", "json": str(d / "tokenizer.json")},
                "tokenizers_no_merges": {"kind": "tokenizers_x", "json": str(d / "no_merges.json")},
                "tokenizers_no_added": {"kind": "tokenizers_x", "json": str(d / "no_added.json")},
                "mesh": {"kind": "mesh", "mesh": str(mesh_file)},
            }
            result[model] = {}
            for name, spec_ in runs.items():
                spec_["texts"] = str(texts_path)
                r = run_child(spec_)
                result[model][name] = r
                print(model, name, {k: r[k] for k in ("load_mib", "after_work_mib", "anon_mib", "file_mib",
                                                       "peak_mib", "encode_s", "heavy")}, flush=True)
            m, h = result[model]["mesh"], result[model]["hf"]
            result[model]["ratio_mesh_over_hf"] = {
                "after_work": round(m["after_work_mib"] / h["after_work_mib"], 4),
                "peak": round(m["peak_mib"] / h["peak_mib"], 4),
                "encode_cpu": round(m["encode_s"] / h["encode_s"], 2)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=Path.home() / ".cache" / "mesh")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("tokenizer_rss.json"))
    ap.add_argument("--models", nargs="*", default=["gemma3-270m", "smollm2-135m"])
    args = ap.parse_args()
    args.out.write_text(json.dumps(measure_all(args.home, args.models), indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
