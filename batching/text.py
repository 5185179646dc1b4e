"""Text splitting: a request's text becomes sentence segments within XTTS's per-language character limits.

Stock coqui splits with spaCy; this splitter needs nothing beyond the standard library, handles CJK and
Devanagari sentence marks, and never cuts inside a word when a space is at hand.
"""

from __future__ import annotations

import re
import textwrap

from batching.languages import CHAR_LIMITS

# A sentence ends at . ! ? … ; (and their full-width forms), the Devanagari danda, or a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?…;。！？；।॥])\s+|(?<=[。！？；])|\n+")
# Where a too-long sentence may be cut, best first.
_CLAUSE_END = re.compile(r"(?<=[,:、，：])\s*")
_SPACES = re.compile(r"[ \t\r\f\v]+")


def _wrap(sentence: str, limit: int) -> list[str]:
    """Cut one sentence longer than `limit` at clause marks, then at spaces, then anywhere (CJK)."""
    pieces: list[str] = []
    for clause in (c for c in _CLAUSE_END.split(sentence) if c.strip()):
        if len(clause) <= limit:
            pieces.append(clause.strip())
        elif " " in clause.strip():
            pieces += textwrap.wrap(clause, width=limit, break_long_words=True, break_on_hyphens=False)
        else:
            pieces += [clause[i : i + limit] for i in range(0, len(clause), limit)]
    # Re-merge clauses greedily so that segments are as long as the limit allows.
    return _merge(pieces, limit)


def _merge(pieces: list[str], limit: int) -> list[str]:
    merged: list[str] = []
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        if merged and len(merged[-1]) + 1 + len(piece) <= limit:
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    return merged


def split_text(text: str, language: str, limit: int | None = None) -> list[str]:
    """Split `text` into segments of at most `limit` characters (default: XTTS's limit for `language`).

    Whole sentences are kept together and merged greedily up to the limit, as stock XTTS does; a sentence
    longer than the limit is cut at clause marks or spaces. Returns [] for blank text.
    """
    limit = limit or CHAR_LIMITS[language]
    text = _SPACES.sub(" ", text).strip()
    if not text:
        return []
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if not sentence:
            continue
        pieces += [sentence] if len(sentence) <= limit else _wrap(sentence, limit)
    return _merge(pieces, limit)
