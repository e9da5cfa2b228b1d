"""Estimates that are bounds: Anthropic input on non-Latin text, and tool schemas with $ref/$defs.

The documented counts are Anthropic's legacy tokenizer (``@anthropic-ai/tokenizer`` 0.0.4, the
only offline Claude tokenizer) on the sample texts in ``tests/data/scripts/`` — measured once with
that package, not at test time (README: "Anthropic input estimates").
"""

from __future__ import annotations

import json
import math
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.estimate import anthropic, openai, schemas, scripts
from spendgate.estimate.shape import dumps
from spendgate.estimate.tokens import counter

pytestmark = pytest.mark.usefixtures("no_network")

DATA = Path(__file__).parent / "data"
TC = counter("o200k_base")
CLAUDE = "claude-sonnet-4-5"

#: sample -> Claude tokens by Anthropic's legacy tokenizer (countTokens: NFKC, then BPE).
DOCUMENTED = {"en": 124, "ru": 294, "ar": 467, "hi": 637, "zh": 198,
              "el": 737, "he": 393, "ja": 247, "ko": 290, "th": 827}
#: what the estimate was before the script floors: ceil(1.7 × o200k)
BEFORE = {"en": 208, "ru": 242, "ar": 274, "hi": 305, "zh": 264,
          "el": 398, "he": 272, "ja": 318, "ko": 278, "th": 320}


def sample(lang: str) -> str:
    return (DATA / "scripts" / f"{lang}.txt").read_text(encoding="utf-8")


def text_tokens(text: str, factor: float = anthropic.DEFAULT_FACTOR) -> int:
    """The Anthropic estimate of one user message holding ``text``, less the per-message constant."""
    body = {"model": CLAUDE, "max_tokens": 1, "messages": [{"role": "user", "content": text}]}
    return anthropic.messages(body, factor=factor).input_tokens - anthropic.PER_MESSAGE


def old_tokens(text: str, factor: float = anthropic.DEFAULT_FACTOR) -> int:
    return math.ceil(TC.count(text) * factor)


@pytest.mark.parametrize("lang", sorted(DOCUMENTED))
def test_estimate_is_at_or_above_the_documented_count_for_each_sample(lang: str) -> None:
    text = sample(lang)
    assert old_tokens(text) == BEFORE[lang]
    est = text_tokens(text)
    assert est >= DOCUMENTED[lang], f"{lang}: {est} < {DOCUMENTED[lang]}"
    assert est >= BEFORE[lang]
    if lang == "en":
        assert est == BEFORE["en"]  # English is counted exactly as before
    else:
        assert est <= 1.35 * max(DOCUMENTED[lang], BEFORE[lang]), f"{lang}: {est} is far above"


def test_the_scripts_the_issue_names_were_under_and_now_are_not() -> None:
    for lang in ("ru", "ar", "hi", "el", "he", "th"):
        assert BEFORE[lang] < DOCUMENTED[lang] <= text_tokens(sample(lang))
    # exact figures, so a change of floors is a visible change here
    assert [text_tokens(sample(x)) for x in ("ru", "ar", "hi", "zh", "en")] == [361, 570, 729, 264, 208]


def test_a_mixed_message_floors_only_its_non_latin_runs() -> None:
    en, hi = sample("en"), sample("hi")
    mixed = f"{en}\n\n{hi}\n\n{en}"
    assert text_tokens(mixed) >= 2 * BEFORE["en"] + DOCUMENTED["hi"] - 2
    assert text_tokens(mixed) <= 2 * BEFORE["en"] + text_tokens(hi) + 4
    found = scripts.runs(mixed)
    assert [k for k, _, _ in found] == ["devanagari"]


def test_runs_split_by_script_and_count_script_characters() -> None:
    assert scripts.runs("plain ASCII, code {} and JSON [1, 2]") == []
    assert scripts.runs("café — naïve “quotes” ±5 € → ✓") == []  # Latin, punctuation, symbols: no floor
    got = scripts.runs("Hi Привет, мир! 12 and 你好，世界。 then 😀 and שלום")
    assert [(k, n) for k, _, n in got] == [("cyrillic", 9), ("han", 4), ("other", 4), ("hebrew", 4)]
    assert got[0][1] == "Привет, мир! 12 "  # neutral characters join the run


def test_script_ranges_hold_the_letters_their_name_says() -> None:
    names = {"greek": ("GREEK", "COPTIC"), "cyrillic": ("CYRILLIC",), "armenian": ("ARMENIAN",),
             "hebrew": ("HEBREW",), "arabic": ("ARABIC",), "devanagari": ("DEVANAGARI", "VEDIC"),
             "bengali": ("BENGALI",), "gurmukhi": ("GURMUKHI",), "gujarati": ("GUJARATI",),
             "oriya": ("ORIYA",), "tamil": ("TAMIL",), "telugu": ("TELUGU",), "kannada": ("KANNADA",),
             "malayalam": ("MALAYALAM",), "sinhala": ("SINHALA",), "thai": ("THAI",), "lao": ("LAO",),
             "tibetan": ("TIBETAN",), "myanmar": ("MYANMAR",), "ethiopic": ("ETHIOPIC",), "khmer": ("KHMER",),
             "georgian": ("GEORGIAN",), "hangul": ("HANGUL",),
             "kana": ("HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA"),
             "han": ("CJK", "KANGXI", "IDEOGRAPHIC", "BOPOMOFO", "PARENTHESIZED", "CIRCLED", "SQUARE")}
    assert set(names) == set(scripts.RANGES) == set(scripts.FLOORS)
    for script, ranges in scripts.RANGES.items():
        letters = 0
        for lo, hi in ranges:
            for cp in range(lo, min(hi, 0x2FFFF) + 1):
                ch = chr(cp)
                if not unicodedata.category(ch).startswith("L"):
                    continue
                letters += 1
                name = unicodedata.name(ch, "")
                assert any(w in name for w in names[script]) or (script == "han" and "IDEOGRAPH" in name), \
                    f"U+{cp:04X} {name} in {script}"
                assert [k for k, _, _ in scripts.runs(ch)] == [script]
        assert letters > 0, script


def test_floors_are_cached_per_text() -> None:
    calls: list[str] = []

    def count(s: str) -> int:
        calls.append(s)
        return TC.count(s)

    fl = scripts.Floors(count)
    text = sample("ru")
    first = fl.excess(text, 1.7)
    assert first > 0 and len(calls) == 1
    assert fl.excess(text, 1.7) == first and len(calls) == 1
    assert fl.excess(text, 3.0) == 0.0 and len(calls) == 1  # a high factor needs no floor
    assert fl.excess("ascii only", 1.7) == 0.0 and len(calls) == 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_the_bound_is_never_below_the_old_estimate(text: str) -> None:
    assert text_tokens(text) >= old_tokens(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x24F), max_size=400))
def test_ascii_and_latin_text_count_as_before(text: str) -> None:
    est, old = text_tokens(text), old_tokens(text)
    assert old <= est <= math.ceil(1.25 * old)
    if text.isascii():
        assert est == old


def test_an_emoji_or_rare_script_is_floored_at_its_utf8_bytes() -> None:
    assert text_tokens("😀😀😀") >= 12
    assert text_tokens("𐌰𐌱𐌲𐌳") >= 16  # Gothic: no table row, so its UTF-8 length


# --- tool schemas ---------------------------------------------------------------------------

SCHEMA = json.loads((DATA / "pydantic_order_schema.json").read_text(encoding="utf-8"))
#: The schema as OpenAI renders a function tool (its TypeScript-like namespace form, references
#: written out where they are used), written by hand in tests/data: 431 o200k tokens.
RENDERED = TC.count((DATA / "pydantic_order_rendered.txt").read_text(encoding="utf-8"))
MSGS = [{"role": "user", "content": "hi"}]


def test_the_rendered_sample_is_what_the_readme_says() -> None:
    assert RENDERED == 431
    assert TC.count(dumps(SCHEMA)) == 636


def test_openai_chat_tools_with_refs_count_at_least_the_rendered_schema() -> None:
    base = openai.chat({"model": "gpt-4o", "messages": MSGS}).input_tokens
    tool = {"type": "function", "function": {"name": "place_order", "description": "Place an order.",
                                             "parameters": SCHEMA}}
    with_tool = openai.chat({"model": "gpt-4o", "messages": MSGS, "tools": [tool]}).input_tokens
    assert with_tool - base >= RENDERED  # was 143: the flat formula saw only the top-level names
    assert with_tool - base == 715
    legacy = openai.chat({"model": "gpt-4", "messages": MSGS,
                          "functions": [tool["function"]]}).input_tokens
    assert legacy - openai.chat({"model": "gpt-4", "messages": MSGS}).input_tokens >= RENDERED


def test_openai_responses_tools_with_refs_count_at_least_the_rendered_schema() -> None:
    base = openai.responses({"model": "gpt-5", "input": "hi"}).input_tokens
    tool = {"type": "function", "name": "place_order", "description": "Place an order.", "parameters": SCHEMA}
    assert openai.responses({"model": "gpt-5", "input": "hi", "tools": [tool]}).input_tokens - base >= RENDERED


def test_flat_tools_keep_the_cookbook_count() -> None:
    flat = {"type": "function", "function": {"name": "f", "description": "Does a thing.", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "description": "the x"},
                                         "u": {"type": "string", "enum": ["a", "b"]}}}}}
    base = openai.chat({"model": "gpt-4o", "messages": MSGS}).input_tokens
    # 7 + name:desc + 3 + (3 + "x:string:the x") + (3 - 3 + 2 × (3 + 1) + "u:string:") + 12
    expected = 7 + TC.count("f:Does a thing") + 3 + 3 + TC.count("x:string:the x") \
        + 3 - 3 + 2 * (3 + 1) + TC.count("u:string:") + 12
    assert openai.chat({"model": "gpt-4o", "messages": MSGS, "tools": [flat]}).input_tokens - base == expected


def test_a_definition_used_many_times_counts_every_use() -> None:
    addr = SCHEMA["$defs"]["Address"]
    many = {"type": "object", "$defs": {"Address": addr, "Country": SCHEMA["$defs"]["Country"]},
            "properties": {f"stop_{i}": {"$ref": "#/$defs/Address"} for i in range(12)}}
    inlined = schemas.expanded(many, dumps(many))
    assert inlined is not None and "$ref" not in inlined and "$defs" not in inlined
    base = anthropic.messages({"model": CLAUDE, "max_tokens": 1, "messages": MSGS}).input_tokens
    with_tools = anthropic.messages({"model": CLAUDE, "max_tokens": 1, "messages": MSGS,
                                     "tools": [{"name": "route", "input_schema": many}]}).input_tokens
    # at least every inlined address, scaled, plus the tool system prompt
    assert with_tools - base >= anthropic.TOOL_SYSTEM_PROMPT + 1.7 * TC.count(inlined)
    assert with_tools - base > anthropic.TOOL_SYSTEM_PROMPT + 1.7 * TC.count(dumps([{"name": "route",
                                                                                        "input_schema": many}]))


def test_anthropic_tools_with_refs_count_at_least_the_rendered_schema() -> None:
    base = anthropic.messages({"model": CLAUDE, "max_tokens": 1, "messages": MSGS}).input_tokens
    body = {"model": CLAUDE, "max_tokens": 1, "messages": MSGS,
            "tools": [{"name": "place_order", "description": "Place an order.", "input_schema": SCHEMA}]}
    assert anthropic.messages(body).input_tokens - base >= anthropic.TOOL_SYSTEM_PROMPT + 1.7 * RENDERED


def test_recursive_schemas_stop_and_blowups_fall_back_to_bytes() -> None:
    tree = {"$defs": {"Node": {"type": "object", "properties": {
        "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}},
        "$ref": "#/$defs/Node"}
    out = schemas.expanded(tree, dumps(tree))
    assert out is not None and out.count('"#/$defs/Node"') == 1 and "$defs\":" not in out
    self_ref = {"type": "object", "properties": {"me": {"$ref": "#"}, "you": {"$ref": "#/nowhere"}}}
    assert schemas.expanded(self_ref, dumps(self_ref)) is not None
    # each level refers twice to the one below: 2^40 leaves if inlined
    bomb: dict[str, object] = {"$defs": {"L0": {"type": "string"}}, "$ref": "#/$defs/L39"}
    defs = bomb["$defs"]
    assert isinstance(defs, dict)
    for i in range(1, 40):
        defs[f"L{i}"] = {"type": "object", "properties": {"a": {"$ref": f"#/$defs/L{i - 1}"},
                                                          "b": {"$ref": f"#/$defs/L{i - 1}"}}}
    start = time.perf_counter()
    text = dumps(bomb)
    assert schemas.expanded(bomb, text) is None
    assert schemas.bound(bomb, TC.count, text) == len(text.encode())
    tool = {"type": "function", "function": {"name": "bomb", "parameters": bomb}}
    assert openai.chat({"model": "gpt-4o", "messages": MSGS, "tools": [tool]}).input_tokens > len(text.encode())
    assert time.perf_counter() - start < 2.0
