"""What every `mesh bench ...` does at the end: the JSON record, the PNG plot, one line saying where."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only backend (benchmarks run headless, often as root over ssh)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def write_results(out: dict[str, Any], json_path: str | Path, plot: Callable[[Path], None],
                  plot_path: str | Path | None, console: Console) -> None:
    """Stamp ``out`` with the date, write it as JSON, draw the plot (unless ``plot_path`` is
    empty), and say where both went."""
    json_path = Path(json_path)
    out.setdefault("date", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2))
    if plot_path:
        plot(Path(plot_path))
    console.print(f"results: {json_path}" + (f", plot: {plot_path}" if plot_path else ""))
