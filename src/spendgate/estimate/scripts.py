"""Per-script lower bounds on Claude's token count, for text o200k compresses far better than Claude.

The Anthropic estimate is ``factor × o200k``. o200k was trained on far more non-Latin text than
Claude's tokenizer: on Cyrillic, Greek, Arabic, Hebrew, Indic, Thai and similar scripts Claude
spends two to five times the tokens o200k does, so the factor alone under-estimates. Each run of
such a script is therefore also bounded from below by ``floor × characters``: the runs of one
script in a text count ``max(factor × o200k(runs), floor × chars)``, the rest of the text
``factor × o200k`` as before; text in scripts without a floor (ASCII, Latin, the
common punctuation and symbol blocks) counts exactly as before, at no extra cost.

Where the floors come from (README: "Anthropic input estimates"): Anthropic's legacy tokenizer
(the ``@anthropic-ai/tokenizer`` npm package, 0.0.4 — the only offline Claude tokenizer; it is
not used here, only measured with once) on two kinds of text: paragraphs written for the
purpose (``tests/data/scripts/``) and ~3,000 interface strings per language from the Debian
translation catalogs (``/usr/share/locale/*/LC_MESSAGES/*.mo``: ru, uk, bg, sr, be, kk, ar, fa,
hi, mr, ne, bn, gu, pa, ta, te, kn, ml, si, th, km, my, dz, ka, hy, he, yi, el, zh, ja, ko). A
floor is the catalogs' aggregate Claude tokens per character of the script (tokens of the
whole run, its spaces and punctuation included, over its script characters), rounded up by
5–10 %; short interface strings tokenize worse than prose, so prose is over-estimated by
10–25 % and the strings themselves by 0–20 % in aggregate.

Runs are found by one compiled regular expression (C speed): a run starts at a character of a
floored script and extends over further characters of that script and over neutral ones (spaces,
ASCII punctuation and digits, general punctuation), so a sentence is one run, not one per word.
The script tables are Unicode block ranges; ``tests/test_estimate_bounds.py`` checks them against
``unicodedata`` names. Any other character outside ASCII and Latin (a rare script, an emoji) is
floored at its UTF-8 length, the absolute ceiling of any byte-level BPE count.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

#: script -> the Unicode ranges (inclusive) of its characters.
RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "greek": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),
    "cyrillic": ((0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "armenian": ((0x0530, 0x058F), (0xFB13, 0xFB17)),
    "hebrew": ((0x0590, 0x05FF), (0xFB1D, 0xFB4F)),
    "arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x0870, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "devanagari": ((0x0900, 0x097F), (0xA8E0, 0xA8FF)),
    "bengali": ((0x0980, 0x09FF),),
    "gurmukhi": ((0x0A00, 0x0A7F),),
    "gujarati": ((0x0A80, 0x0AFF),),
    "oriya": ((0x0B00, 0x0B7F),),
    "tamil": ((0x0B80, 0x0BFF),),
    "telugu": ((0x0C00, 0x0C7F),),
    "kannada": ((0x0C80, 0x0CFF),),
    "malayalam": ((0x0D00, 0x0D7F),),
    "sinhala": ((0x0D80, 0x0DFF),),
    "thai": ((0x0E00, 0x0E7F),),
    "lao": ((0x0E80, 0x0EFF),),
    "tibetan": ((0x0F00, 0x0FFF),),
    "myanmar": ((0x1000, 0x109F), (0xA9E0, 0xA9FF), (0xAA60, 0xAA7F)),
    "ethiopic": ((0x1200, 0x139F), (0x2D80, 0x2DDF), (0xAB00, 0xAB2F)),
    "khmer": ((0x1780, 0x17FF), (0x19E0, 0x19FF)),
    "georgian": ((0x10A0, 0x10FF), (0x1C90, 0x1CBF), (0x2D00, 0x2D2F)),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF)),
    "kana": ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)),
    "han": ((0x2E80, 0x2FDF), (0x3100, 0x312F), (0x31A0, 0x31BF), (0x3200, 0x33FF), (0x3400, 0x4DBF),
            (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3FFFF)),
}

#: Claude tokens per character of each script, at least: the legacy tokenizer's aggregate rate on
#: the Debian catalogs, rounded up (module docstring). A run never counts below ``floor × chars``.
#: Measured rates (catalogs / prose sample): Cyrillic 0.72 / 0.53, Greek 1.35 / 1.09, Arabic
#: 1.16 / 0.91, Hebrew 1.26 / 0.87, Devanagari 1.39 / 1.07, Thai 1.85 / 1.74, Han 1.27 / 1.12,
#: kana 0.94, Hangul 1.43 / 1.01, Armenian 2.13, Georgian 1.40, Bengali 2.11, Tamil 2.12,
#: Telugu 2.39, Kannada 2.39, Malayalam 2.49, Sinhala 1.90, Myanmar 1.07; Gujarati, Gurmukhi,
#: Khmer, Tibetan, Lao and Ethiopic ~3.0–3.2 (byte level: three UTF-8 bytes a character).
FLOORS: dict[str, float] = {
    "greek": 1.5,
    "cyrillic": 0.8,
    "armenian": 2.3,
    "hebrew": 1.35,
    "arabic": 1.35,
    "devanagari": 1.55,
    "bengali": 2.3,
    "gurmukhi": 3.3,
    "gujarati": 3.3,
    "oriya": 3.3,
    "tamil": 2.3,
    "telugu": 2.6,
    "kannada": 2.6,
    "malayalam": 2.7,
    "sinhala": 2.1,
    "thai": 2.0,
    "lao": 3.3,
    "tibetan": 3.3,
    "myanmar": 1.2,
    "ethiopic": 3.3,
    "khmer": 3.3,
    "georgian": 1.6,
    "hangul": 1.55,
    "kana": 1.05,
    "han": 1.4,
}

# Characters that join a run without being counted in it: ASCII punctuation, digits and
# whitespace, Latin-1 punctuation, general punctuation and CJK punctuation / full-width forms.
_NEUTRAL = r"\s!-@\[-`{-~\u00a0-\u00bf\u2000-\u206f\u3000-\u303f\uff01-\uff20\uff3b-\uff40\uff5b-\uff65"
# Characters with no floor: ASCII, Latin-1, Latin Extended A/B, IPA, modifiers, combining marks,
# Latin Extended Additional, full-width Latin letters, and the common symbol blocks (currency,
# arrows, math, box drawing).
_FREE = (r"\x00-\u036f\u1e00-\u1eff\u2000-\u2bff\u2c60-\u2c7f\ua720-\ua7ff\ufe00-\ufe0f\ufe20-\ufe2f"
         r"\uff21-\uff3a\uff41-\uff5a\ufff0-\uffff")


def _cls(ranges: tuple[tuple[int, int], ...]) -> str:
    return "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)


_ALL = "".join(_cls(r) for r in RANGES.values())
# the look-ahead lets the scan pass ASCII and Latin at one class test a character
_RUNS = re.compile(f"(?=[^{_FREE}])(?:" + "|".join(
    [f"(?P<{name}>[{_cls(r)}](?:[{_cls(r)}]|[{_NEUTRAL}])*)" for name, r in RANGES.items()]
    + [f"(?P<other>[^{_FREE}{_ALL}{_NEUTRAL}]+)"]
) + ")")
_NEUTRAL_CHAR = re.compile(f"[{_NEUTRAL}]")


def runs(text: str) -> list[tuple[str, str, int]]:
    """(script, run, characters of the script in it) for each floored run of ``text``; ``other``
    runs carry their UTF-8 length instead of a character count. ASCII text has none."""
    if text.isascii():
        return []
    out = []
    for m in _RUNS.finditer(text):
        kind, span = m.lastgroup or "other", m.group()
        if kind == "other":
            out.append((kind, span, len(span.encode("utf-8", "surrogatepass"))))
        else:
            out.append((kind, span, len(span) - len(_NEUTRAL_CHAR.findall(span))))
    return out


class Floors:
    """The per-script floors of texts, cached per text.

    ``parts(text)`` is a tuple of (floor tokens, o200k tokens) per floored script, over all its
    runs in the text; the excess over ``factor × o200k`` is ``max(0, floor − factor × o200k)``.
    Cached by the text itself, bounded by total characters held (oldest first), so a
    conversation's old messages cost a dictionary lookup."""

    def __init__(self, count: Callable[[str], int], floors: dict[str, float] | None = None,
                 max_chars: int = 16_000_000) -> None:
        self._count = count
        self._floors = FLOORS if floors is None else floors
        self._cache: dict[str, tuple[tuple[float, int], ...]] = {}
        self._chars = 0
        self._max_chars = max_chars
        self._lock = threading.Lock()

    def parts(self, text: str) -> tuple[tuple[float, int], ...]:
        if text.isascii():
            return ()
        got = self._cache.get(text)
        if got is not None:
            return got
        # the runs of one script are counted together (joined by newlines, which o200k never
        # merges across): one encoder call per script, not one per run
        groups: dict[str, tuple[list[str], list[int]]] = {}
        for kind, span, n in runs(text):
            spans, chars = groups.setdefault(kind, ([], [0]))
            spans.append(span)
            chars[0] += n
        got = tuple(((n[0] if kind == "other" else self._floors[kind] * n[0]), self._count("\n".join(spans)))
                    for kind, (spans, n) in groups.items())
        with self._lock:
            self._cache[text] = got
            self._chars += len(text)
            while self._chars > self._max_chars and self._cache:
                oldest = next(iter(self._cache))
                self._chars -= len(oldest)
                del self._cache[oldest]
        return got

    def excess(self, text: str, factor: float) -> float:
        """Tokens to add to ``factor × o200k(text)`` so every run is at least its floor."""
        if text.isascii():
            return 0.0
        return sum(max(0.0, floor - factor * n) for floor, n in self.parts(text))
