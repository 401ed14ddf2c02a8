"""Text to ids and back without transformers: a tokenizer that fits a Pi Zero 2W's memory.

``tables`` turns a ``tokenizer.json`` into one flat file (``mesh setup`` calls
:func:`ensure_tables` on each converted model directory); ``tokenizer`` maps it and encodes/decodes with the same results as the
Hugging Face tokenizer; ``bpe`` holds the pure steps both share.
"""

from mesh.text.tables import FILE_NAME, build_tables, ensure_tables
from mesh.text.tokenizer import Tokenizer, load_tokenizer

__all__ = ["FILE_NAME", "Tokenizer", "build_tables", "ensure_tables", "load_tokenizer"]
