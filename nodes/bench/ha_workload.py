"""The home workload: Home Assistant's real command grammar behind one shared system prompt.

Commands come from the English sentence templates of the ``home-assistant-intents`` package,
parsed by ``hassil`` into expression trees (sequences, alternatives, optionals, permutations,
``<rule>`` references and ``{list}`` slots). A command is one seeded random walk through one
template: every alternative picks a branch, a permutation picks an order, and every ``{list}``
slot is filled from the described :class:`Home` (``{name}``, ``{area}``, ``{floor}``) or from the
package's own lists (cover classes, colours, states), with realistic numbers for ranges. The
slot values are chosen before the walk (an entity that satisfies the template's domain
constraint, then its area and floor), so each command knows its intent and target exactly.

Templates that need context the text does not carry (``requires_context: area``, "turn on the
lights here") or a free-text wildcard (timer names, shopping items, search queries) are left out.

Every prompt is :func:`system_prompt` (the assistant preamble that lists the home's devices and
the answer format, identical for all commands) + ``Command: <text>`` + ``Action:``. The model is
asked to answer ``<Intent> <target> [key=value ...]``; :func:`score` checks intent and target.

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

# -- the described home ------------------------------------------------------------------------


@dataclass(frozen=True)
class Floor:
    id: str
    name: str


@dataclass(frozen=True)
class Area:
    id: str
    name: str
    floor: str  # Floor.id


@dataclass(frozen=True)
class Entity:
    id: str  # "light.floor_lamp": the domain is the part before the dot
    name: str  # what people call it ("floor lamp")
    area: str  # Area.id
    device_class: str | None = None  # covers: blind, curtain, garage, shutter...

    @property
    def domain(self) -> str:
        return self.id.split(".", 1)[0]


@dataclass(frozen=True)
class Home:
    name: str
    floors: tuple[Floor, ...]
    areas: tuple[Area, ...]
    entities: tuple[Entity, ...]

    def area(self, area_id: str) -> Area:
        return next(a for a in self.areas if a.id == area_id)

    def floor_of(self, area_id: str) -> Floor:
        fid = self.area(area_id).floor
        return next(f for f in self.floors if f.id == fid)


def default_home() -> Home:
    """A two-storey family home with the devices a typical Home Assistant install exposes."""
    floors = (Floor("downstairs", "downstairs"), Floor("upstairs", "upstairs"))
    areas = (
        Area("living_room", "living room", "downstairs"), Area("kitchen", "kitchen", "downstairs"),
        Area("dining_room", "dining room", "downstairs"), Area("hallway", "hallway", "downstairs"),
        Area("garage", "garage", "downstairs"), Area("office", "office", "upstairs"),
        Area("bedroom", "bedroom", "upstairs"), Area("kids_room", "kids room", "upstairs"),
        Area("bathroom", "bathroom", "upstairs"),
    )
    E = Entity
    entities = (
        E("light.floor_lamp", "floor lamp", "living_room"), E("light.tv_backlight", "TV backlight", "living_room"),
        E("light.pendant_light", "pendant light", "kitchen"), E("light.counter_lights", "counter lights", "kitchen"),
        E("light.chandelier", "chandelier", "dining_room"), E("light.hall_light", "hall light", "hallway"),
        E("light.garage_light", "garage light", "garage"), E("light.desk_lamp", "desk lamp", "office"),
        E("light.bedside_lamp", "bedside lamp", "bedroom"), E("light.night_light", "night light", "kids_room"),
        E("light.mirror_light", "mirror light", "bathroom"),
        E("switch.coffee_maker", "coffee maker", "kitchen"), E("switch.printer", "printer", "office"),
        E("switch.towel_warmer", "towel warmer", "bathroom"),
        E("fan.ceiling_fan", "ceiling fan", "bedroom"), E("fan.desk_fan", "desk fan", "office"),
        E("cover.patio_blinds", "patio blinds", "living_room", "blind"),
        E("cover.blackout_curtains", "blackout curtains", "bedroom", "curtain"),
        E("cover.garage_door", "garage door", "garage", "garage"),
        E("cover.office_shutter", "roller shutter", "office", "shutter"),
        E("climate.thermostat", "thermostat", "living_room"), E("climate.heat_pump", "heat pump", "bedroom"),
        E("media_player.tv", "TV", "living_room"), E("media_player.radio", "radio", "kitchen"),
        E("media_player.nightstand_speaker", "nightstand speaker", "bedroom"),
        E("lock.front_door", "front door", "hallway"), E("lock.back_door", "back door", "kitchen"),
        E("vacuum.robot_vacuum", "robot vacuum", "hallway"),
        E("sensor.outdoor_temperature", "outdoor temperature", "garage"),
        E("scene.movie_night", "movie night", "living_room"), E("script.good_night", "good night", "bedroom"),
    )
    return Home("Maple Street", floors, areas, entities)


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


# -- the prompt ---------------------------------------------------------------------------------

EXAMPLES: tuple[tuple[str, str], ...] = (
    ("switch off the desk lamp", "HassTurnOff light.desk_lamp"),
    ("turn on the lights in the kitchen", "HassTurnOn area.kitchen"),
    ("set the bedroom temperature to 19 degrees", "HassClimateSetTemperature area.bedroom temperature=19"),
    ("close the garage door", "HassTurnOff cover.garage_door"),
    ("pause the TV", "HassMediaPause media_player.tv"),
    ("set a timer for 10 minutes", "HassStartTimer - minutes=10"),
    ("what time is it", "HassGetCurrentTime -"),
    ("turn off all the lights", "HassTurnOff all"),
)


def system_prompt(home: Home | None = None) -> str:
    """The shared preamble: who the assistant is, the home's devices, and the answer format.

    Identical for every command of a home, so a prompt cache reuses all of its chunks."""
    home = home or default_home()
    lines = [
        f"You are the voice assistant of the {home.name} home, running locally next to Home Assistant. "
        "You turn one spoken command into exactly one action line that Home Assistant executes.",
        "",
        "Floors: " + ", ".join(f"floor.{f.id} ({f.name})" for f in home.floors) + ".",
        "Areas: " + ", ".join(f"area.{a.id} ({a.name}, {a.floor})" for a in home.areas) + ".",
        "",
        "Devices (entity id: name, area):",
    ]
    lines += [f"- {e.id}: {e.name}, {home.area(e.area).name}" for e in home.entities]
    lines += [
        "",
        "How to answer:",
        "- Reply with one line: the intent, the target, then any values as key=value.",
        "- Intents: " + ", ".join(i for i in INTENT_WEIGHTS) + ".",
        "- Target: the entity id when a device is named; area.<id> when only an area is named; "
        "floor.<id> for a floor; all for every device of a kind; - when there is no target.",
        "- Use only the ids listed above. Never explain, never ask back.",
        "",
        "Examples:",
    ]
    for text, action in EXAMPLES:
        lines += [f"Command: {text}", f"Action: {action}"]
    return "\n".join(lines) + "\n\n"


def build_prompt(system: str, command: Command | str) -> str:
    """The full prompt: shared system prompt, the command, then the answer cue."""
    text = command.text if isinstance(command, Command) else command
    return f"{system}Command: {text}\nAction:"


# -- scoring the reply --------------------------------------------------------------------------

_ACTION = re.compile(r"(Hass[A-Za-z]+)(?:\s+([a-z_]+\.[a-z0-9_]+|all|-))?")


def parse_reply(text: str) -> tuple[str | None, str | None]:
    """The intent and target of a model's action line, e.g. ' HassTurnOn light.desk_lamp'."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    m = _ACTION.search(line)
    if m is None:
        return None, None
    return m.group(1), m.group(2)


def score(command: Command, reply: str) -> dict[str, Any]:
    """Whether the reply names the right intent and the right target."""
    intent, target = parse_reply(reply)
    return {"parsed_intent": intent, "parsed_target": target, "intent_ok": intent == command.intent,
            "target_ok": target == command.target, "ok": intent == command.intent and target == command.target}


def home_names(home: Home) -> dict[str, set[str]]:
    """Every id and spoken name of the home's entities, areas and floors (for checks)."""
    return {"entity_ids": {e.id for e in home.entities}, "entity_names": {e.name for e in home.entities},
            "area_ids": {a.id for a in home.areas}, "area_names": {a.name for a in home.areas},
            "floor_ids": {f.id for f in home.floors}, "floor_names": {f.name for f in home.floors}}
