"""What a node will take in memory, worked out before it loads, and the "no" it says in time.

A node that does not fit its device must say so at start, naming the setting to change, not be
OOM-killed mid-ask (on a Pi Zero 2W with 400 MiB, a Gemma node in fp32 would be killed while it
loads, and a node whose cache fills up would be killed minutes later). Its resident set is the
sum of parts a node knows before it loads the model:

- ``runtime``: the process as it stands (interpreter, torch, the mesh; a node never imports transformers: mesh.lm), measured
  (``mesh.sysmem.process_memory``) after those imports, since no constant holds across wheels and
  boards;
- ``weights``: the weight file's bytes. Every token reads every weight, so a memory-mapped file's
  pages are all resident (and a cgroup v1 cap charges page cache like anonymous memory); fp32
  weights are copied into anonymous memory, the same bytes;
- ``tokenizer``: the tokenizer's tables (``mesh.text``), their file's size;
- ``context``: one ask at the node's maximum context: its KV and attention per position
  (``mesh.budget.context_bytes_per_token``) and the prefill's activations, bounded by its chunk
  (``mesh.budget.prefill_bytes``);
- ``cache``: the prompt cache's byte budget, which fills up as the node works;
- ``slack``: what the allocator, torch's temporary buffers and the threads add, a share of the rest.

With no ``--max-context`` the context takes its share of the memory limit (``mesh.budget``), at
most half of what the fixed parts leave; with no ``--cache-mb`` the cache takes the rest, up to
its default. Set either explicitly and
the node refuses to start when the sum exceeds the limit; so it does when nothing is left.

A worker-only HALO node (``mesh node --roles worker --no-answer``, :func:`plan_worker`) holds
no model, tokenizer, context or cache: its parts are the runtime, what loading one layer takes
for a moment (one projection dequantised whole), its speed probe's groups, and the neuron groups
its plans give it, as float32 (it dequantises a quantised file's slices). It does not know its
share before a plan, so it works out its *capacity*: how many groups (of every layer together)
fit in what the rest leaves, and announces it in its heartbeat; the coordinator never plans more
on it (``mesh.halo.placement``), and the worker refuses a plan that does (``mesh.halo.worker``).
It refuses to start only when it cannot hold even one group per layer.

Pure: every figure is passed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mesh.errors import ConfigError

MiB = 1 << 20
SLACK_SHARE = 0.10  # of runtime + weights + tokenizer + context + cache (see the module docstring)
MIN_AUTO_CACHE = 8 * MiB  # below this a prompt cache holds too little to be worth its bookkeeping


@dataclass(frozen=True)
class Footprint:
    """Bytes a node will hold, by part (see the module docstring)."""

    runtime: int
    weights: int
    tokenizer: int
    context: int
    cache: int

    @property
    def slack(self) -> int:
        return int(SLACK_SHARE * (self.runtime + self.weights + self.tokenizer + self.context + self.cache))

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.tokenizer + self.context + self.cache + self.slack

    def mib(self) -> dict[str, float]:
        """Each part and the total in MiB, for logs, the heartbeat and ``mesh bench memory``."""
        parts = {**asdict(self), "slack": self.slack, "total": self.total}
        return {k: round(v / MiB, 1) for k, v in parts.items()}

    def describe(self) -> str:
        m = self.mib()
        return (f"{m['total']:.0f} MiB = runtime {m['runtime']:.0f} + weights {m['weights']:.0f} + tokenizer "
                f"{m['tokenizer']:.0f} + context {m['context']:.0f} + cache {m['cache']:.0f} + slack {m['slack']:.0f}")


@dataclass(frozen=True)
class Plan:
    """What a node may run with: its maximum context, its cache budget and what that comes to."""

    max_context: int
    cache_bytes: int
    footprint: Footprint


class DoesNotFit(ConfigError):
    """The node would not fit its memory limit; the message names what to change."""


def plan(limit_bytes: int, limit_source: str, runtime: int, weights: int, tokenizer: int, per_token: int,
         positions: int, weights_format: str, max_context: int = 0, cache_bytes: int | None = None,
         default_cache_bytes: int = 256 * MiB, context_share: float = 0.25, min_context: int = 64,
         prefill: int = 0) -> Plan:
    """The node's context and cache budget within ``limit_bytes``, or :class:`DoesNotFit`.

    ``max_context`` 0 and ``cache_bytes`` None mean "choose": the context takes ``context_share``
    of the limit (at most the model's ``positions`` and half of what runtime, weights and
    tokenizer leave), the cache what remains up to ``default_cache_bytes``. Explicit values are
    kept as given and checked. ``prefill`` is the context's fixed part (bytes whatever its length)."""
    room = int(limit_bytes / (1 + SLACK_SHARE)) - runtime - weights - tokenizer - prefill  # for context and cache
    context = max_context or max(min_context, min(positions, int(limit_bytes * context_share) // per_token,
                                                  max(room, 0) // 2 // per_token))
    if cache_bytes is None:
        rest = room - context * per_token
        cache_bytes = min(default_cache_bytes, rest) if rest >= MIN_AUTO_CACHE else 0
    fp = Footprint(runtime, weights, tokenizer, context * per_token + prefill, cache_bytes)
    if fp.total <= limit_bytes:
        return Plan(context, cache_bytes, fp)
    over = (fp.total - limit_bytes) / MiB
    where = f"{limit_bytes / MiB:.0f} MiB ({limit_source})"
    fixes = []
    smaller = {"fp32": ("int8", "q4"), "int8": ("q4",)}.get(weights_format, ())
    if smaller:
        fixes.append(f"smaller weights ({' or '.join(f'--weights {f}' for f in smaller)})")
    if cache_bytes:
        fixes.append(f"a smaller prompt cache (--cache-mb, now {cache_bytes / MiB:.0f}) or none (--no-cache)")
    if context > min_context:
        fixes.append(f"a shorter context (--max-context, now {context} tokens)")
    if not fixes:
        fixes.append("a smaller model (--model) or a device with more memory")
    raise DoesNotFit(f"this node needs {fp.describe()}: {over:.0f} MiB more than the {where} it may use; "
                     f"try {', or '.join(fixes)}")


def mlp_bytes(layers: int, hidden: int, intermediate: int, bytes_per_weight: int = 4) -> int:
    """Bytes of every layer's gate, up and down projections (the whole MLP), at ``bytes_per_weight``."""
    return 3 * layers * hidden * intermediate * bytes_per_weight


def worker_group_bytes(hidden: int, group_size: int, bias: bool = False) -> int:
    """Bytes of one neuron group held as float32: ``group_size`` rows of gate and of up and as many
    columns of down, ``hidden`` wide each (with biases, gate's and up's: two floats per neuron)."""
    return (3 * hidden + (2 if bias else 0)) * group_size * 4


@dataclass(frozen=True)
class WorkerFit:
    """What a worker-only node may hold: at most ``capacity`` of the model's ``total_groups``
    neuron groups at once (every layer's together, every plan it keeps together), ``group_bytes``
    each; ``min_groups`` is the least worth starting for (one group per layer). ``footprint``:
    its parts at full capacity (weights: the groups, the probe's and the load transient)."""

    capacity: int
    total_groups: int
    group_bytes: int
    min_groups: int
    transient: int
    footprint: Footprint

    def describe(self) -> str:
        fp = self.footprint
        return (f"capacity {self.capacity} of {self.total_groups} neuron groups "
                f"({100 * self.capacity / self.total_groups:.0f} %, {self.group_bytes / MiB:.2f} MiB each in float32): "
                f"{fp.total / MiB:.0f} MiB = runtime {fp.runtime / MiB:.0f} + groups {self.capacity * self.group_bytes / MiB:.0f}"
                f" + loading and probe {self.transient / MiB:.0f} + slack {fp.slack / MiB:.0f}")


def plan_worker(limit_bytes: int, limit_source: str, runtime: int, layers: int, hidden: int, intermediate: int,
                group_size: int, probe_groups: int = 1, bias: bool = False) -> WorkerFit:
    """A worker-only node's capacity within ``limit_bytes``, or :class:`DoesNotFit` when it cannot
    hold one group per layer.

    Beside ``runtime`` (measured) and the groups it holds, it takes a ``transient``: loading a
    layer dequantises one projection whole (``hidden x intermediate`` float32: a q4 ``down_proj``
    is grouped along the neurons, so its columns are cut after) and the speed probe keeps
    ``probe_groups`` groups of layer 0 for good (``mesh.halo.probe.probe_groups``). The slack
    share is kept free as for any node."""
    n_groups = -(-intermediate // group_size)
    total = layers * n_groups
    group_bytes = worker_group_bytes(hidden, group_size, bias)
    transient = hidden * intermediate * 4 + probe_groups * group_bytes
    room = int(limit_bytes / (1 + SLACK_SHARE)) - runtime - transient
    capacity = max(0, min(total, room // group_bytes))
    fit = WorkerFit(capacity, total, group_bytes, layers, transient,
                    Footprint(runtime, transient + capacity * group_bytes, 0, 0, 0))
    if capacity >= layers:
        return fit
    raise DoesNotFit(f"this HALO worker can hold {capacity} of the model's {total} neuron groups "
                     f"({group_bytes / MiB:.2f} MiB each in float32), fewer than one per layer ({layers}): runtime "
                     f"{runtime / MiB:.0f} MiB + loading and probe {transient / MiB:.0f} + slack leave "
                     f"{max(room, 0) / MiB:.0f} MiB of the {limit_bytes / MiB:.0f} MiB ({limit_source}) it may use; "
                     f"try a smaller model (--model) or a device with more memory")
