"""The prompt and the scoring of the Home Assistant workload.

Every prompt is :func:`system_prompt` (the assistant preamble that lists the home's devices and
the answer format, identical for all commands) + ``Command: <text>`` + ``Action:``. The model is
asked to answer ``<Intent> <target> [key=value ...]``; :func:`score` checks intent and target.
"""

from __future__ import annotations

import re
from typing import Any

from nodes.bench.ha_home import Home, default_home
from nodes.bench.ha_workload import INTENT_WEIGHTS, Command

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
