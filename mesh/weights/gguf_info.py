"""What a user's GGUF file is, checked before setup converts anything: its architecture, whether
its bytes are whole, and the transformers config it stands for.

The config is read with the converter's light reader (``mesh.weights.convert._tensor_reader``:
array fields are skipped), not with ``AutoConfig.from_pretrained(gguf_file=...)``, whose reader
builds a numpy object per vocabulary entry: ~1 GB for Gemma-3's 262k-token vocabulary, more than
a Pi Zero has. The scalar fields are renamed by transformers' own GGUF table
(``GGUF_CONFIG_MAPPING``) with the fix-ups its ``load_gguf_checkpoint`` makes for the supported
families (tied embeddings when the file has no ``output.weight``, Gemma-3's text-only model
type), so the config equals the one the packaged route writes
(``tests/weights/test_user_gguf_packaged.py`` compares them); the vocabulary size comes from the
embedding's rows, which is what the model must hold whatever the metadata says.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError

# general.architecture -> the family of mesh.lm's forward (the tokenizer is checked separately).
ARCHITECTURES = {"llama": "llama", "qwen2": "llama", "gemma3": "gemma3"}
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufInfo:
    """A GGUF that passed the checks: its architecture, family and config (a dict for
    ``transformers.AutoConfig.for_model``)."""

    path: Path
    architecture: str
    family: str
    config: dict[str, Any]
    tensors: int


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def _open(path: Path) -> Any:
    """The light reader over ``path``; a ConfigError (never a traceback) for a file that is not
    a whole GGUF."""
    from mesh.weights.convert import _tensor_reader

    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head != GGUF_MAGIC:
        raise ConfigError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")
    try:
        return _tensor_reader(path)
    except (ValueError, IndexError, KeyError, OverflowError, struct.error, UnicodeDecodeError) as exc:
        # numpy's reshape of a tensor the file ends inside, or a header field past the end
        raise ConfigError(f"{path} is truncated or damaged ({exc}); download it again") from None


def _scalar(field: Any) -> Any:
    """The value of a scalar (or string) GGUF field; None for arrays (the light reader skips them)."""
    from gguf import GGUFValueType

    if not field.data or field.types[0] == GGUFValueType.ARRAY:
        return None
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    value = part.tolist()[0]
    return float(value) if isinstance(value, float) else value


def _check_tensor_bytes(path: Path, reader: Any) -> None:
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or int(t.data.nbytes) != int(t.n_bytes):
            raise ConfigError(f"{path} is truncated: tensor {t.name} needs bytes up to {end:,}, "
                              f"the file has {size:,}; download it again")


def _config(reader: Any, arch: str) -> dict[str, Any]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    config: dict[str, Any] = {"model_type": arch}
    for key, field in reader.fields.items():
        prefix, _, rest = key.partition(".")
        table = GGUF_CONFIG_MAPPING.get(prefix)
        if prefix not in (arch, "tokenizer") or table is None or rest not in table or table[rest] in (None, -1):
            continue
        value = _scalar(field)
        if value is not None:
            config[table[rest]] = value
    names = {t.name for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ConfigError("the GGUF has no token_embd.weight: not a language model this mesh can run")
    config["vocab_size"] = int(embed.shape[-1])  # GGUF lists dimensions innermost first: (hidden, vocab)
    if arch == "gemma3":
        config["model_type"] = "gemma3_text"  # a Gemma-3 GGUF holds the text backbone only
    return config


def inspect_gguf(path: Path) -> GgufInfo:
    """Check ``path`` before any work: a GGUF (magic, header), of a supported architecture, with
    every tensor's bytes present, whose config the mesh's forward can run. ConfigError otherwise."""
    from mesh.lm.config import from_dict

    path = Path(path)
    reader = _open(path)
    field = reader.fields.get("general.architecture")
    arch = _scalar(field) if field is not None else None
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path.name}: architecture {arch!r} is not supported; supported: {supported()}")
    _check_tensor_bytes(path, reader)
    config = _config(reader, arch)
    try:
        from_dict(_with_defaults(config))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path.name}: its {arch} metadata lacks {exc} the model needs") from None
    return GgufInfo(path=path, architecture=arch, family=ARCHITECTURES[arch], config=config,
                    tensors=len(reader.tensors))


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The config as transformers fills it in (defaults of the model's config class), as a dict."""
    return hf_config(config).to_dict()


def hf_config(config: dict[str, Any]) -> Any:
    """The transformers config object of a :class:`GgufInfo` config dict."""
    from transformers import AutoConfig

    body = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **body)
