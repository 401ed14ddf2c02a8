"""The home workload: commands walked from Home Assistant's real command grammar.

Commands come from the English sentence templates of the ``home-assistant-intents`` package,
parsed by ``hassil`` into expression trees (sequences, alternatives, optionals, permutations,
``<rule>`` references and ``{list}`` slots). A command is one seeded random walk through one
template: every alternative picks a branch, a permutation picks an order, and every ``{list}``
slot is filled from the described :class:`~nodes.bench.ha_home.Home` (``{name}``, ``{area}``,
``{floor}``) or from the package's own lists (cover classes, colours, states), with realistic numbers for ranges. The
slot values are chosen before the walk (an entity that satisfies the template's domain
constraint, then its area and floor), so each command knows its intent and target exactly.

Templates that need context the text does not carry (``requires_context: area``, "turn on the
lights here") or a free-text wildcard (timer names, shopping items, search queries) are left out.

Deterministic: :class:`random.Random` with an integer seed, no iteration over sets, so the same
seed gives the same commands in every process and on every machine. No I/O beyond reading the
installed package data; nothing runs at import time.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from nodes.bench.ha_home import Entity, Home, default_home

# -- intents: which ones a home assistant hears, and how often ----------------------------------

# Relative frequency of each intent in the sampled workload (lights and switches dominate real
# voice use). Intents not listed (broadcast, shopping lists, media search, small talk...) are
# left out: they need free text or no device.
INTENT_WEIGHTS: dict[str, float] = {
    "HassTurnOn": 20, "HassTurnOff": 20, "HassLightSet": 8, "HassClimateSetTemperature": 6,
    "HassClimateGetTemperature": 4, "HassGetState": 6, "HassSetPosition": 4, "HassStartTimer": 6,
    "HassCancelTimer": 2, "HassTimerStatus": 2, "HassPauseTimer": 1, "HassUnpauseTimer": 1,
    "HassIncreaseTimer": 1, "HassDecreaseTimer": 1, "HassCancelAllTimers": 1, "HassMediaPause": 3,
    "HassMediaUnpause": 2, "HassMediaNext": 2, "HassMediaPrevious": 1, "HassSetVolume": 3,
    "HassSetVolumeRelative": 2, "HassMediaPlayerMute": 1, "HassMediaPlayerUnmute": 1,
    "HassGetCurrentTime": 2, "HassGetCurrentDate": 1, "HassGetWeather": 2, "HassFanSetSpeed": 2,
    "HassClimateSetFanMode": 1, "HassVacuumStart": 1, "HassVacuumReturnToBase": 1, "HassVacuumCleanArea": 1,
}

# The device domain an intent acts on when its templates do not say (no ``slots.domain`` and no
# ``requires_context.domain``): "set the kitchen temperature to 21" needs a thermostat there.
_INTENT_DOMAINS: dict[str, tuple[str, ...]] = {
    "HassClimateSetTemperature": ("climate",), "HassClimateGetTemperature": ("climate",),
    "HassClimateSetFanMode": ("climate",), "HassFanSetSpeed": ("fan",), "HassSetPosition": ("cover",),
    "HassLightSet": ("light",), "HassMediaPause": ("media_player",), "HassMediaUnpause": ("media_player",),
    "HassMediaNext": ("media_player",), "HassMediaPrevious": ("media_player",),
    "HassSetVolume": ("media_player",), "HassSetVolumeRelative": ("media_player",),
    "HassMediaPlayerMute": ("media_player",), "HassMediaPlayerUnmute": ("media_player",),
    "HassVacuumStart": ("vacuum",), "HassVacuumReturnToBase": ("vacuum",), "HassVacuumCleanArea": ("vacuum",),
}

# Numbers people actually say, per range list (the package's ranges run 0-100 or wider).
_NUMBERS: dict[str, tuple[int, ...]] = {
    "temperature": (17, 18, 19, 20, 21, 22, 23, 24, 25),
    "brightness": (10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100),
    "position": (0, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100),
    "volume": (10, 15, 20, 25, 30, 35, 40, 50, 60, 70, 80),
    "volume_step_up": (5, 10, 15, 20, 25), "volume_step_down": (5, 10, 15, 20, 25),
    "fan_speed": (20, 25, 30, 40, 50, 60, 75, 80, 100),
    "color_temperature": (2200, 2700, 3000, 3500, 4000, 5000, 6500),
    "timer_seconds": (10, 15, 20, 30, 40, 45, 90),
    "timer_minutes": (1, 2, 3, 4, 5, 7, 8, 10, 12, 15, 20, 25, 30, 40, 45),
    "timer_hours": (1, 2, 3, 4),
}

NO_TARGET = "-"
ALL_TARGET = "all"


@dataclass(frozen=True)
class Command:
    """One spoken command with what it means.

    ``target`` is the entity id when the command names a device, ``area.<id>`` when it names only
    an area, ``floor.<id>`` for a floor, ``all`` for every device of a kind, ``-`` for none.
    ``slots`` holds every filled slot (hassil slot name -> value) in template order.
    """

    text: str
    intent: str
    target: str
    slots: tuple[tuple[str, str], ...]
    template: str  # the hassil sentence template it was walked from
    combination: str  # the template group's slot_combination metadata

    @property
    def expected(self) -> str:
        """The action line the system prompt asks for."""
        values = [f"{k}={v}" for k, v in self.slots if k not in ("name", "area", "floor", "device_class", "domain")]
        return " ".join([self.intent, self.target, *values])

    def as_json(self) -> dict[str, Any]:
        return {"text": self.text, "intent": self.intent, "target": self.target, "slots": dict(self.slots),
                "expected": self.expected, "template": self.template, "combination": self.combination}


# -- the grammar --------------------------------------------------------------------------------


@dataclass
class _Group:
    """One template group of an intent (same slots, same constraints), ready to walk."""

    intent: str
    combination: str
    sentences: list[Any]  # hassil Sentence
    rules: dict[str, Any]  # hassil expansion rules (global + local)
    lists: dict[str, Any]  # hassil slot lists (global + local)
    list_names: tuple[str, ...]
    domains: tuple[str, ...]  # allowed device domains; () = no device needed
    fixed_domain: bool  # the domain is a fixed slot ("turn on the lights"), not a named entity
    candidates: list[Entity] = field(default_factory=list)


@lru_cache(maxsize=1)
def load_intents() -> Any:
    """hassil's parsed English intents from the installed ``home-assistant-intents`` data."""
    from hassil.intents import Intents
    from home_assistant_intents import get_intents

    data = get_intents("en")
    if data is None:  # pragma: no cover - the package always ships English
        raise RuntimeError("home-assistant-intents has no English data")
    return Intents.from_dict(data)


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _groups(home: Home) -> list[_Group]:
    from hassil.intents import WildcardSlotList

    intents = load_intents()
    out: list[_Group] = []
    for name, intent in intents.intents.items():
        if INTENT_WEIGHTS.get(name, 0) <= 0:
            continue
        for data in intent.data:
            if "area" in data.requires_context:  # needs the satellite's own area ("here")
                continue
            rules = {**intents.expansion_rules, **data.expansion_rules}
            lists = {**intents.slot_lists, **data.slot_lists}
            names: list[str] = []
            for sentence in data.sentences:
                for ln in sentence.list_names(rules):
                    if ln not in names:
                        names.append(ln)
            if any(isinstance(lists.get(ln), WildcardSlotList) for ln in names):
                continue
            if any(ln not in lists and ln not in ("name", "area", "floor") for ln in names):
                continue
            required = _as_tuple(data.requires_context.get("domain"))
            fixed = _as_tuple(data.slots.get("domain"))
            domains = required or fixed or _INTENT_DOMAINS.get(name, ())
            g = _Group(name, str((data.metadata or {}).get("slot_combination", "")), list(data.sentences), rules,
                       lists, tuple(names), domains, fixed_domain=bool(fixed) and not required)
            if domains:
                g.candidates = [e for e in home.entities if e.domain in domains
                                and ("cover_classes" not in names or e.device_class is not None)]
                if not g.candidates:
                    continue  # this home has no such device
            out.append(g)
    return out


def _pick(n: int, optional: bool, rng: random.Random) -> int:
    """Which branch of an alternative: templates list the common wording first, so earlier
    branches are likelier (Zipf-like); an optional part is said half of the time."""
    if optional or n == 1:
        return rng.randrange(n)
    return rng.choices(range(n), _zipf(n))[0]


@lru_cache(maxsize=64)
def _zipf(n: int) -> tuple[float, ...]:
    return tuple(1.0 / (i + 1) ** 1.2 for i in range(n))


def _walk(expr: Any, g: _Group, fill: dict[str, str], rng: random.Random, out: list[str]) -> None:
    """Append the text of one random path through a hassil expression to ``out``."""
    from hassil.expression import (Alternative, ListReference, Permutation, RuleReference, Sequence as Seq,
                                   TextChunk)

    if isinstance(expr, TextChunk):
        out.append(expr.original_text)
    elif isinstance(expr, Alternative):
        _walk(expr.items[_pick(len(expr.items), expr.is_optional, rng)], g, fill, rng, out)
    elif isinstance(expr, Permutation):
        order = list(expr.items)
        rng.shuffle(order)
        for item in order:
            out.append(" ")
            _walk(item, g, fill, rng, out)
            out.append(" ")
    elif isinstance(expr, Seq):
        for item in expr.items:
            _walk(item, g, fill, rng, out)
    elif isinstance(expr, RuleReference):
        _walk(g.rules[expr.rule_name].expression, g, fill, rng, out)
    elif isinstance(expr, ListReference):
        out.append(_fill_list(expr, g, fill, rng))
    else:  # pragma: no cover - hassil has no other expression kinds
        raise ValueError(f"unexpected hassil expression {type(expr).__name__}")


def _fill_list(ref: Any, g: _Group, fill: dict[str, str], rng: random.Random) -> str:
    from hassil.intents import RangeSlotList, TextSlotList

    slot, ln = ref.slot_name, ref.list_name
    if ln in ("name", "area", "floor"):  # chosen before the walk
        return fill[f"text:{ln}"]
    if f"text:{slot}" in fill:  # the same slot twice in one template ("for 5 minutes ... by 5 minutes")
        return fill[f"text:{slot}"]
    if ref.is_inline_range:
        start, stop, step = ref.get_inline_range()
        n = rng.randrange(start, stop + 1, step)
        fill[slot], fill[f"text:{slot}"] = str(n), str(n)
        return str(n)
    lst = g.lists[ln]
    if isinstance(lst, RangeSlotList):
        pool = _NUMBERS.get(ln) or tuple(range(lst.start, lst.stop + 1, max(lst.step, 1)))
        n = pool[rng.randrange(len(pool))]
        fill[slot], fill[f"text:{slot}"] = str(n), str(n)
        return str(n)
    assert isinstance(lst, TextSlotList)
    values = lst.values
    if ln == "cover_classes":  # the class of the covers this command is about
        values = [v for v in values if v.value_out == fill["device_class"]]
    value = values[rng.randrange(len(values))]
    parts: list[str] = []
    _walk(value.text_in, g, fill, rng, parts)
    text = "".join(parts).strip()
    fill[slot], fill[f"text:{slot}"] = str(value.value_out).strip(), text
    return text


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _one(g: _Group, home: Home, rng: random.Random) -> Command:
    """One command from one group: choose the device (if any), then walk one template."""
    fill: dict[str, str] = {}
    slots: list[tuple[str, str]] = []
    target = NO_TARGET
    entity = g.candidates[rng.randrange(len(g.candidates))] if g.candidates else None
    area_id = entity.area if entity else home.areas[rng.randrange(len(home.areas))].id
    floor = home.floor_of(area_id)
    if entity is not None and "cover_classes" in g.list_names:
        fill["device_class"] = str(entity.device_class)
    if "name" in g.list_names and entity is not None:
        fill["text:name"] = entity.name
        target = entity.id
    if "area" in g.list_names:
        fill["text:area"] = home.area(area_id).name
        target = target if "name" in g.list_names else f"area.{area_id}"
    if "floor" in g.list_names:
        fill["text:floor"] = floor.name
        target = target if "name" in g.list_names else f"floor.{floor.id}"
    if target == NO_TARGET and g.fixed_domain:
        target = ALL_TARGET  # "turn off all the lights", "are any blinds open"
    sentence = g.sentences[rng.randrange(len(g.sentences))]
    parts: list[str] = []
    _walk(sentence.expression, g, fill, rng, parts)
    if "name" in g.list_names:
        slots.append(("name", target))
    if "area" in g.list_names:
        slots.append(("area", area_id))
    if "floor" in g.list_names:
        slots.append(("floor", floor.id))
    for k in fill:
        if not k.startswith("text:") and k not in ("name", "area", "floor"):
            slots.append((k, fill[k]))
    return Command(_normalize("".join(parts)), g.intent, target, tuple(slots), sentence.text or "", g.combination)


def expand_commands(home: Home | None = None, limit: int = 3000, seed: int = 0,
                    max_tries: int | None = None) -> list[Command]:
    """Up to ``limit`` distinct commands (by text), in a deterministic order for ``seed``.

    Each draw picks an intent by :data:`INTENT_WEIGHTS`, one of its template groups that this
    home can serve, one template, and one walk through it."""
    home = home or default_home()
    groups = _groups(home)
    by_intent: dict[str, list[_Group]] = {}
    for g in groups:
        by_intent.setdefault(g.intent, []).append(g)
    intents = list(by_intent)
    weights = [INTENT_WEIGHTS[i] for i in intents]
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Command] = []
    tries = max_tries if max_tries is not None else 20 * limit
    for _ in range(tries):
        if len(out) >= limit:
            break
        intent = rng.choices(intents, weights)[0]
        options = by_intent[intent]
        cmd = _one(options[rng.randrange(len(options))], home, rng)
        if cmd.text and cmd.text not in seen:
            seen.add(cmd.text)
            out.append(cmd)
    return out


def sample_commands(n: int, home: Home | None = None, seed: int = 0, repeat_share: float = 0.0) -> list[Command]:
    """``n`` commands for a run: distinct ones, plus (about ``repeat_share`` of them) repeats of an
    earlier command, as a household says "turn on the kitchen lights" every evening."""
    if not 0.0 <= repeat_share < 1.0:
        raise ValueError("repeat_share must be in [0, 1)")
    rng = random.Random(seed * 7919 + 1)
    repeats = sorted(rng.sample(range(1, n), min(n - 1, round(n * repeat_share)))) if n > 1 else []
    fresh = expand_commands(home, limit=n - len(repeats), seed=seed)
    out: list[Command] = []
    it = iter(fresh)
    for i in range(n):
        if i in repeats and out:
            out.append(out[rng.randrange(len(out))])
        else:
            out.append(next(it))
    return out
