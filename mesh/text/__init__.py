"""Text to ids and back without transformers: a tokenizer that fits a Pi Zero 2W's memory.

``tables`` turns a ``tokenizer.json`` into one flat file (``mesh setup`` calls
:func:`ensure_tables` on each converted model directory); ``gguf_vocab`` builds the same file
from a GGUF alone (:func:`build_tables_from_gguf`, no transformers); ``tokenizer`` maps it and
encodes/decodes with the same results as the Hugging Face tokenizer; ``bpe`` holds the pure
steps both share.
"""

from mesh.text.gguf_vocab import build_tables_from_gguf
from mesh.text.tables import FILE_NAME, build_tables, ensure_tables
from mesh.text.tokenizer import Tokenizer, load_tokenizer

__all__ = ["FILE_NAME", "Tokenizer", "build_tables", "build_tables_from_gguf", "ensure_tables", "load_tokenizer"]
