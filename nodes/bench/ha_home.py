"""The described home of the Home Assistant workload: floors, areas and the entities a typical
install exposes. Pure data; ``nodes.bench.ha_workload`` walks commands over it.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def home_names(home: Home) -> dict[str, set[str]]:
    """Every id and spoken name of the home's entities, areas and floors (for checks)."""
    return {"entity_ids": {e.id for e in home.entities}, "entity_names": {e.name for e in home.entities},
            "area_ids": {a.id for a in home.areas}, "area_names": {a.name for a in home.areas},
            "floor_ids": {f.id for f in home.floors}, "floor_names": {f.name for f in home.floors}}
