"""What the request path writes with orjson reads back, with the standard library, as it was."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from spendgate import fastjson

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
DOCS = st.recursive(SCALARS,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=20)


@given(doc=DOCS)
def test_what_it_writes_reads_back_as_it_was(doc: Any) -> None:
    assert json.loads(fastjson.dumps(doc)) == json.loads(json.dumps(doc))


def test_values_orjson_cannot_write_are_written_as_the_standard_library_writes_them() -> None:
    for doc in ({"n": 2**70}, {"s": "gpt-4o\ud800"}, {1: "int key"}):
        assert fastjson.dumps(doc) == json.dumps(doc, separators=(",", ":"))
