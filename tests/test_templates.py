"""Prompt templates: plain `{name}` placeholders, values substituted once and never re-parsed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from statemachine_orch.definition._templates import Template, as_text


class Point(BaseModel):
    x: int
    label: str


def render(source: str, **values: Any) -> str:
    template = Template.parse(source)
    assert template.problems == ()
    return template.render(values)


def test_parse_collects_names_in_order() -> None:
    template = Template.parse("{a} and {b}, then {a} again")
    assert template.names == ("a", "b", "a")
    assert template.literals == ("", " and ", ", then ", " again")
    assert template.source == "{a} and {b}, then {a} again"


@pytest.mark.parametrize(
    "value",
    ["{other}", "{x.__class__}", "{x[0]}", "{}", "{{", "}", "{x!r:>10}", "{text}"],
)
def test_values_are_inserted_literally_never_reparsed(value: str) -> None:
    # the value lands in the prompt as is, even when it names a placeholder that has a value
    assert render("<{text}> {other}", text=value, other="O") == f"<{value}> O"


def test_each_placeholder_is_substituted_once_in_one_pass() -> None:
    assert render("{a}|{b}", a="{b}", b="{a}") == "{b}|{a}"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (42, "42"),
        (2.5, "2.5"),
        (True, "true"),
        (None, "null"),
        ([1, "two", None], '[1, "two", null]'),
        ({"k": [1, 2], "é": "ü"}, '{"k": [1, 2], "é": "ü"}'),  # not ASCII-escaped
        ("plain string", "plain string"),  # strings verbatim, not quoted
        ("", ""),
    ],
    ids=repr,
)
def test_non_strings_are_rendered_as_json(value: Any, text: str) -> None:
    assert render("[{v}]", v=value) == f"[{text}]"
    assert as_text(value) == text


def test_pydantic_models_are_rendered_with_model_dump_json() -> None:
    point = Point(x=3, label="naïve {x}")
    assert render("p={p}", p=point) == "p=" + point.model_dump_json()
    assert json.loads(render("{p}", p=point)) == {"x": 3, "label": "naïve {x}"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [("{{x}}", "{x}"), ("{{{x}}}", "{1}"), ("a {{ b }} {x}", "a { b } 1"), ("}}{{", "}{")],
)
def test_doubled_braces_are_literal(source: str, expected: str) -> None:
    assert render(source, x=1) == expected


def test_a_template_without_placeholders_renders_its_text() -> None:
    assert render("no placeholders here") == "no placeholders here"


def test_render_requires_every_name() -> None:
    with pytest.raises(KeyError):
        Template.parse("{a} {b}").render({"a": 1})


# --------------------------------------------------------------------------- property


NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
VALUES = st.text() | st.recursive(
    JSON_SCALARS | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def escape(literal: str) -> str:
    return literal.replace("{", "{{").replace("}", "}}")


def expected_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@given(
    first=st.text(),
    parts=st.lists(st.tuples(NAMES, st.text()), max_size=6),
    values=st.dictionaries(NAMES, VALUES),
    fallback=VALUES,
)
def test_render_of_parse_is_the_concatenation(first: str, parts: list[tuple[str, str]],
                                              values: dict[str, Any], fallback: Any) -> None:
    values = {name: values.get(name, fallback) for name, _ in parts}
    source = escape(first) + "".join("{" + name + "}" + escape(literal) for name, literal in parts)
    template = Template.parse(source)
    assert template.problems == ()
    assert template.names == tuple(name for name, _ in parts)
    expected = first + "".join(expected_text(values[name]) + literal for name, literal in parts)
    assert template.render(values) == expected
