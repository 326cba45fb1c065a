"""Every JSON the pipeline writes is valid JSON: NaN and Infinity are refused, naming the key."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.io import InvalidJsonError, read_json, write_json


def strict_load(text: str):
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(("data", "key"), [
    ({"metrics": {"ece": float("nan")}}, "metrics.ece"),
    ({"per_class": [{"f1": 1.0}, {"f1": np.float32("inf")}]}, "per_class[1].f1"),
    ([1.0, -math.inf], "[1]"),
    (float("nan"), "the value"),
    ({"a": (1, np.float64("nan"))}, "a[1]"),
])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, data, key):
    path = tmp_path / "out.json"
    path.write_text('{"old": 1}\n')
    with pytest.raises(InvalidJsonError) as raised:
        write_json(path, data)
    assert str(raised.value) == (f"cannot write {path}: {key} is not a finite number (NaN or "
                                 "Infinity, which JSON cannot hold)")
    assert read_json(path) == {"old": 1}  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


JSONABLE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=12)


@settings(max_examples=50, deadline=None)
@given(JSONABLE)
def test_what_is_written_is_strict_json(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("json") / "x.json"
    try:
        write_json(path, data)
    except InvalidJsonError:
        assert "nan" in repr(data) or "inf" in repr(data)
        assert not path.exists()
        return
    assert strict_load(path.read_text()) == data
