"""`mesh setup --gguf PATH [--name NAME]`: a user's GGUF converted and registered as a model.

The file takes the packaged models' path into the same directory layout
(``<cache>/models/<name>/``: ``config.json``, ``generation_config.json``, ``tokenizer.mesh``,
``weights-<format>.safetensors`` / ``model.safetensors``, ``mesh-meta.json``), then its name goes
into the registry (:mod:`mesh.user_models`), so ``mesh node --model NAME`` and every other
``--model`` finds it. Order of work, cheapest refusal first:

1. the name (allowed characters, not a packaged model's);
2. the file (:func:`mesh.weights.gguf_info.inspect_gguf`): GGUF magic and header, a supported
   ``general.architecture``, every tensor's bytes present, a config the forward can run;
3. its sha256 (the weights' identity in every model key), then, in a temporary directory beside
   the target, the tokenizer tables straight from the GGUF (a tokenizer the mesh cannot
   reproduce is refused here, before any weight is converted), the config, and each weight
   format tensor by tensor (:func:`mesh.weights.convert.convert_gguf`; fp32 too, so no format
   ever holds the whole model in float32);
4. the directory renamed into place, then the registry entry written.

An error at any step leaves nothing under the cache: the temporary directory is removed and
the registry is written last. A rerun with the same file keeps the weight files it already
has (hard links into the new directory).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from mesh.errors import ConfigError
from mesh.model import CONVERTED_FORMAT, MODELS, converted_dir
from mesh.user_models import UserModel, check_name, name_from_file, register, user_model
from mesh.weights.formats import SETUP_WEIGHTS, WEIGHT_FORMATS, check_format, weights_file

log = logging.getLogger(__name__)


def _current_files(out: Path, digest: str, weights: tuple[str, ...]) -> dict[str, Path]:
    """The weight files of ``out`` still valid for a GGUF of sha256 ``digest``, by format."""
    from nodes.setup import _weights_current

    try:
        meta = json.loads((out / "mesh-meta.json").read_text())
    except (OSError, ValueError):
        return {}
    if meta.get("format") != CONVERTED_FORMAT or meta.get("gguf_sha256") != digest:
        return {}
    return {fmt: weights_file(out, fmt) for fmt in weights if _weights_current(weights_file(out, fmt), fmt, digest)}


def setup_gguf(cache_root: Path, gguf: Path, name: str | None = None, weights: tuple[str, ...] = SETUP_WEIGHTS,
               console: Console | None = None, expect_sha256: str | None = None) -> dict[str, str]:
    """Convert the GGUF at ``gguf`` into each format of ``weights`` and register it as ``name``
    (default: from the file name); return what is where. ``expect_sha256``: refuse a file with
    another digest (a registered model set up again from its recorded path)."""
    from transformers import GenerationConfig

    from mesh.text import FILE_NAME, build_tables_from_gguf
    from mesh.weights.convert import convert_gguf
    from mesh.weights.gguf_info import hf_config, inspect_gguf
    from nodes.setup import _replace_dir, _sha256

    console = console or Console(stderr=True)
    gguf = Path(gguf).expanduser()
    name = check_name(name or name_from_file(gguf), MODELS)
    for fmt in weights:
        check_format(fmt)
    info = inspect_gguf(gguf)
    console.print(f"{gguf.name}: {info.architecture}, {info.tensors} tensors; hashing")
    digest = _sha256(gguf)
    if expect_sha256 is not None and digest != expect_sha256:
        raise ConfigError(f"{gguf} has changed since {name} was registered (sha256 {digest[:16]}..., registered "
                          f"{expect_sha256[:16]}...); run `mesh setup --gguf {gguf} --name {name}` to register it again")
    before = user_model(cache_root, name)
    if before is not None and before.gguf_sha256 != digest:
        console.print(f"{name} was registered from {before.gguf_path}; it now runs {gguf}")
    out = converted_dir(cache_root, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = _current_files(out, digest, WEIGHT_FORMATS)  # every format already built stays
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    done: dict[str, str] = {}
    try:
        build_tables_from_gguf(gguf, tmp / FILE_NAME, digest)
        config = hf_config(info.config)
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        meta = {"format": CONVERTED_FORMAT, "key": name, "source": "user", "gguf_path": str(gguf.resolve()),
                "gguf_name": gguf.name, "gguf_sha256": digest, "architecture": info.architecture}
        header = {"gguf_sha256": digest, "model": name, "package_version": ""}
        for fmt, path in keep.items():
            os.link(path, weights_file(tmp, fmt))
        for fmt in weights:
            if fmt not in keep:
                console.print(f"{name}: {fmt} weights, tensor by tensor")
                convert_gguf(gguf, weights_file(tmp, fmt), fmt, config, header, plain_fp32=True)
            done[f"{name}/{fmt}"] = str(weights_file(out, fmt))
        (tmp / "mesh-meta.json").write_text(json.dumps(meta, indent=2))
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    register(cache_root, name, UserModel(gguf_path=str(gguf.resolve()), gguf_name=gguf.name, gguf_sha256=digest,
                                         architecture=info.architecture, family=info.family))
    done[name] = str(out)
    return done
