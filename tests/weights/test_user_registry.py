"""The user model registry under concurrent `mesh setup --gguf` runs: no registration is lost."""

from __future__ import annotations

import multiprocessing

from mesh.user_models import UserModel, read_registry, register

PROCESSES, EACH = 6, 15


def _model(tag: str) -> UserModel:
    return UserModel(gguf_path=f"/g/{tag}.gguf", gguf_name=f"{tag}.gguf", gguf_sha256="0" * 64,
                     architecture="llama", family="llama")


def _register_many(root: str, worker: int) -> None:
    for i in range(EACH):
        register(root, f"m{worker}-{i}", _model(f"{worker}-{i}"))


def test_setups_running_at_once_keep_every_registration(tmp_path):
    # Each register() reads the file, adds one name and replaces the file: without a lock two
    # processes that read the same old registry each write it back with only their own name.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_register_many, args=(str(tmp_path), w)) for w in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    names = set(read_registry(tmp_path))
    assert names == {f"m{w}-{i}" for w in range(PROCESSES) for i in range(EACH)}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".user-models.json.")]  # no temporaries left
