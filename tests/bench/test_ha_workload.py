"""The home workload: Home Assistant's real templates expanded over a described home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from nodes.bench import ha_home as h
from nodes.bench import ha_prompt as pr
from nodes.bench import ha_workload as w


@pytest.fixture(scope="module")
def home() -> h.Home:
    return h.default_home()


@pytest.fixture(scope="module")
def commands(home: h.Home) -> list[w.Command]:
    return w.expand_commands(home, limit=2500, seed=0)


def test_many_distinct_commands_from_the_real_templates(commands: list[w.Command]) -> None:
    texts = [c.text for c in commands]
    assert len(texts) == 2500 and len(set(texts)) == 2500
    intents = Counter(c.intent for c in commands)
    assert len(intents) >= 25  # lights, climate, covers, media, timers, state, vacuum...
    assert intents.most_common(2)[0][0] in ("HassTurnOn", "HassTurnOff")
    assert len({c.template for c in commands}) >= 300  # many distinct hassil templates walked
    assert all(c.text == c.text.strip() and "  " not in c.text and "{" not in c.text and "<" not in c.text
               for c in commands)


def test_hassil_recognizes_every_command_as_its_intent_and_target(home: h.Home, commands: list[w.Command]) -> None:
    """The package's own recognizer, given only this home's names, reads back the same meaning."""
    from hassil.intents import TextSlotList
    from hassil.recognize import recognize_all

    lists = {"name": TextSlotList.from_tuples([(e.name, e.id, {"domain": e.domain}) for e in home.entities]),
             "area": TextSlotList.from_tuples([(a.name, a.id) for a in home.areas]),
             "floor": TextSlotList.from_tuples([(f.name, f.id) for f in home.floors])}
    for c in commands[:250]:
        results = [r for r in recognize_all(c.text, w.load_intents(), slot_lists=lists, language="en")
                   if r.intent.name == c.intent]
        assert results, c
        slots = dict(c.slots)

        def agrees(r: object) -> bool:
            ents = {k: e.value for k, e in r.entities.items()}  # type: ignore[attr-defined]
            return all(ents.get(k) == slots[k] for k in ("name", "area", "floor") if k in slots)

        assert any(agrees(r) for r in results), c


def test_commands_use_only_the_home(home: h.Home, commands: list[w.Command]) -> None:
    names = h.home_names(home)
    by_id = {e.id: e for e in home.entities}
    for c in commands:
        slots = dict(c.slots)
        if "name" in slots:
            assert slots["name"] in names["entity_ids"]
            assert by_id[slots["name"]].name.lower() in c.text.lower()
            if "area" in slots:  # "the desk lamp in the office": the device really is there
                assert by_id[slots["name"]].area == slots["area"]
        if "area" in slots:
            assert slots["area"] in names["area_ids"] and home.area(slots["area"]).name in c.text
        if "floor" in slots:
            assert slots["floor"] in names["floor_ids"]
        assert (c.target in (w.NO_TARGET, w.ALL_TARGET) or c.target in names["entity_ids"]
                or c.target.removeprefix("area.") in names["area_ids"]
                or c.target.removeprefix("floor.") in names["floor_ids"])
        if "device_class" in slots and "area" in slots:  # "open the bedroom curtains": curtains there
            assert any(e.area == slots["area"] and e.device_class == slots["device_class"] for e in home.entities)


def test_every_prompt_shares_the_system_prompt(home: h.Home, commands: list[w.Command]) -> None:
    system = pr.system_prompt(home)
    assert system == pr.system_prompt(h.default_home())  # a pure function of the home
    for e in home.entities:
        assert e.id in system
    prompts = [pr.build_prompt(system, c) for c in commands[:200]]
    assert all(p.startswith(system) and p.endswith(f"Command: {c.text}\nAction:") for p, c in zip(prompts, commands))
    assert len(system) > 2000  # some hundreds of tokens: the part a prompt cache reuses
    assert len(os.path.commonprefix(prompts)) >= len(system)


def test_sampling_is_deterministic_and_repeats_are_earlier_commands(home: h.Home) -> None:
    a = w.sample_commands(60, home, seed=3, repeat_share=0.1)
    assert a == w.sample_commands(60, home, seed=3, repeat_share=0.1)
    assert a != w.sample_commands(60, home, seed=4, repeat_share=0.1)
    assert len(a) == 60 and len({c.text for c in a}) == 54
    seen: set[str] = set()
    repeats = 0
    for c in a:  # each repeat says a command that came before it
        repeats += c.text in seen
        seen.add(c.text)
    assert repeats == 6
    assert w.sample_commands(5, home, seed=0) == w.expand_commands(home, limit=5, seed=0)
    with pytest.raises(ValueError):
        w.sample_commands(10, home, repeat_share=1.0)


def test_sampling_is_identical_across_processes() -> None:
    code = ("import json; from nodes.bench import ha_workload as w; "
            "print(json.dumps([c.as_json() for c in w.sample_commands(40, seed=7, repeat_share=0.2)]))")
    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        outs.append(json.loads(run.stdout))
    assert outs[0] == outs[1] == [c.as_json() for c in w.sample_commands(40, seed=7, repeat_share=0.2)]


def test_score_parses_the_action_line() -> None:
    cmd = w.Command("turn on the desk lamp", "HassTurnOn", "light.desk_lamp", (("name", "light.desk_lamp"),),
                    "t", "name_only")
    assert pr.score(cmd, " HassTurnOn light.desk_lamp\nCommand: x")["ok"]
    s = pr.score(cmd, " HassTurnOff light.desk_lamp")
    assert not s["intent_ok"] and s["target_ok"]
    assert pr.parse_reply(" HassStartTimer - minutes=5") == ("HassStartTimer", "-")
    assert pr.parse_reply(" HassTurnOff all") == ("HassTurnOff", "all")
    assert pr.parse_reply(" I am not sure") == (None, None)
    assert pr.parse_reply("") == (None, None)
    assert cmd.expected == "HassTurnOn light.desk_lamp"
    timer = w.Command("5 minute timer", "HassStartTimer", "-", (("minutes", "5"),), "t", "minutes_only")
    assert timer.expected == "HassStartTimer - minutes=5"
