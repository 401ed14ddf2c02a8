"""The end of every benchmark: a JSON record with its date and a PNG that really is one."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from nodes.bench.report import pyplot, save_figure, write_results


def test_write_results_writes_the_record_and_the_plot(tmp_path: Path) -> None:
    def plot(path: Path) -> None:
        fig, ax = pyplot().subplots()
        ax.plot([0, 1], [1, 0])
        save_figure(fig, path)

    out = {"bench": "x", "rows": [{"a": 1.5}]}
    console = Console(record=True, width=200)
    write_results(out, tmp_path / "deep" / "x.json", plot, tmp_path / "other" / "x.png", console)
    saved = json.loads((tmp_path / "deep" / "x.json").read_text())
    assert saved["rows"] == [{"a": 1.5}] and saved["date"].startswith("20")
    assert (tmp_path / "other" / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    said = console.export_text()
    assert "deep/x.json" in said and "other/x.png" in said
