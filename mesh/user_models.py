"""The registry of models users brought as GGUF files (`mesh setup --gguf PATH --name NAME`).

One small JSON file in the setup cache, ``<cache>/user-models.json``, maps each name to the GGUF
it was converted from::

    {"version": 1, "models": {"<name>": {"gguf_path": str, "gguf_name": str,
                                        "gguf_sha256": str, "architecture": str, "family": str}}}

The converted directory is ``<cache>/models/<name>/``, laid out as a packaged model's
(``mesh.model.converted_dir``), so everything that takes ``--model`` finds both kinds through
:func:`mesh.model.model_spec`. The file is replaced atomically (a temporary name, fsync,
``os.replace``): a reader sees the old registry or the new one, never half of either. Writers
(two `mesh setup --gguf` at once) take an exclusive ``flock`` on ``<cache>/.user-models.lock`` for
their read-modify-write, so neither loses the other's name.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from mesh.errors import ConfigError

REGISTRY_FILE = "user-models.json"
LOCK_FILE = ".user-models.lock"
REGISTRY_VERSION = 1
# A name becomes a directory and part of every model key: lowercase letters, digits, '.', '_'
# and '-', starting with a letter or digit (so never '.', '..' or a hidden temporary's name).
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class UserModel:
    gguf_path: str  # where the file was when it was registered (re-read only by a later setup)
    gguf_name: str
    gguf_sha256: str
    architecture: str  # the GGUF's general.architecture
    family: str  # mesh.lm's family: "llama" or "gemma3"


def registry_path(cache_root: Path) -> Path:
    return Path(cache_root) / REGISTRY_FILE


def check_name(name: str, packaged: Iterable[str]) -> str:
    """``name`` if a user model may take it; ConfigError saying why not otherwise."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"model name {name!r} is not allowed: use 1-64 lowercase letters, digits, '.', '_' "
                          "or '-', starting with a letter or digit")
    if name in set(packaged):
        raise ConfigError(f"model name {name!r} is a packaged model's; pick another with --name")
    return name


def name_from_file(path: Path) -> str:
    """A default name for a GGUF: its file stem in lowercase, other characters as '-'."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", Path(path).stem.lower()).strip("-._")
    return stem[:64] or "model"


def read_registry(cache_root: Path) -> dict[str, UserModel]:
    """Every registered user model (empty when none is); a damaged file is a ConfigError."""
    path = registry_path(cache_root)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the user model registry {path} ({exc}); delete it and run "
                          "`mesh setup --gguf PATH --name NAME` again for each model") from None
    if not isinstance(raw, dict) or raw.get("version") != REGISTRY_VERSION or not isinstance(raw.get("models"), dict):
        raise ConfigError(f"{path} is not a version {REGISTRY_VERSION} user model registry; delete it and "
                          "run `mesh setup --gguf PATH --name NAME` again for each model")
    try:
        return {str(name): UserModel(**entry) for name, entry in raw["models"].items()}
    except TypeError as exc:
        raise ConfigError(f"{path} has a malformed entry ({exc}); delete it and set the models up again") from None


def _write(cache_root: Path, models: dict[str, UserModel]) -> None:
    path = registry_path(cache_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"version": REGISTRY_VERSION, "models": {k: asdict(v) for k, v in sorted(models.items())}},
                      indent=2)
    fd, tmp = tempfile.mkstemp(prefix=f".{REGISTRY_FILE}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _locked(cache_root: Path) -> Iterator[None]:
    """Held while one process reads, changes and replaces the registry (released on close or exit)."""
    lock = Path(cache_root) / LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def register(cache_root: Path, name: str, model: UserModel) -> None:
    """Add (or replace) ``name`` in the registry."""
    with _locked(cache_root):
        models = read_registry(cache_root)
        models[name] = model
        _write(cache_root, models)


def user_model(cache_root: Path, name: str) -> UserModel | None:
    return read_registry(cache_root).get(name)
