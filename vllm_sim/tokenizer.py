"""A deterministic stand-in tokenizer: words and punctuation marks are tokens.

Not vLLM's tokenizer (which depends on the model); it only has to be stable, cheap and give
plausible counts. A piece is a run of word characters or one other non-space character, with
its leading whitespace ("Hello world" -> ["Hello", " world"]). Ids are a CRC32 of the piece in
a 32000-token vocabulary; ids 0-2 are the special tokens `<unk>`, `<s>`, `</s>`. Decoding knows
the pieces this process has encoded (a bounded cache) and renders other ids as `<|id|>`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

VOCAB_SIZE = 32000
_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>"}
_FIRST_ID = 3
_PIECE_RE = re.compile(r"\s*(?:\w+|[^\w\s])", re.UNICODE)
_WORD_RE = re.compile(r"\w+", re.UNICODE)
# A chat template adds a few tokens per message and a generation prompt at the end.
CHAT_TOKENS_PER_MESSAGE = 6
CHAT_TOKENS_PER_PROMPT = 3
_DECODE_CACHE_MAX = 100_000


class Tokenizer:
    """Encode/decode/count with the stand-in scheme; one instance per server."""

    def __init__(self) -> None:
        self._pieces: dict[int, str] = {}

    @staticmethod
    def count(text: str) -> int:
        return len(_PIECE_RE.findall(text))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pieces = self._pieces
        for piece in _PIECE_RE.findall(text):
            tid = _FIRST_ID + zlib.crc32(piece.encode()) % (VOCAB_SIZE - _FIRST_ID)
            if tid not in pieces and len(pieces) < _DECODE_CACHE_MAX:
                pieces[tid] = piece
            ids.append(tid)
        return ids

    def pieces(self, text: str) -> list[str]:
        return _PIECE_RE.findall(text)

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        for tid in ids:
            piece = _SPECIALS.get(tid)
            if piece is None:
                piece = self._pieces.get(tid, f"<|{tid}|>")
            out.append(piece)
        return "".join(out)


def message_text(content: Any) -> str:
    """The text of a chat message's `content` (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return " ".join(parts)
    return ""


def chat_prompt_text(messages: Sequence[Any]) -> str:
    """All message texts, as a chat template would lay them out (for tokenizing)."""
    return "\n".join(message_text(m.get("content")) for m in messages if isinstance(m, dict))


def count_chat_tokens(messages: Sequence[Any]) -> int:
    """Prompt tokens of a chat request: its texts plus the template's tokens."""
    total = CHAT_TOKENS_PER_PROMPT
    for m in messages:
        total += CHAT_TOKENS_PER_MESSAGE
        if isinstance(m, dict):
            total += Tokenizer.count(message_text(m.get("content")))
    return total


def first_word(text: str) -> str | None:
    """The first word of `text` (what the simulator repeats as its output), if any."""
    m = _WORD_RE.search(text)
    return m.group(0) if m else None
