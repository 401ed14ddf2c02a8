"""``mesh status`` without a terminal: plain columns, nothing cut (nodes.cli.plain_table)."""

from __future__ import annotations

from nodes.cli import plain_table


def test_plain_columns_keep_every_value_whole_and_aligned() -> None:
    long = "a-node-with-a-very-long-name-on-the-gateway-in-the-garage-rack-two"
    text = plain_table(("node", "status", "model"), [[long, "online", "gemma3-270m"], ["n2", "offline", "None"]])
    lines = text.splitlines()
    assert lines[0].split() == ["node", "status", "model"]
    assert lines[1].split() == [long, "online", "gemma3-270m"] and lines[2].split() == ["n2", "offline", "None"]
    assert len({line.index(line.split()[1]) for line in lines}) == 1  # one column start for status
    assert max(len(line) for line in lines) > 80  # wider than a terminal: not squeezed


def test_an_empty_mesh_prints_the_header_alone() -> None:
    assert plain_table(("node", "status"), []) == "node  status"
