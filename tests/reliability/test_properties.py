"""Property tests: random machines and guard outcomes against a reference_path model of the table.

The reference_path model is the transition table read as plain data: defaults (CONTINUE next,
SKIP the one after, RETRY itself, TERMINATE end), `on=` overrides, the closed set of each
guard, `retry_limit` on self-loops and `max_visits` on entries. The engine (the
`transitions` FSM, the store, the snapshot and replay) must agree with it step for step.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings

from ..helpers import (
    Figures,
    Spec,
    property_example,
    scaled,
    specs,
)

EXAMPLES = scaled(60, 600)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.filter_too_much])
@given(spec=specs())
def test_the_engine_follows_the_reference_table(spec: Spec, tmp_path: Path, figures: Figures) -> None:
    property_example(spec, tmp_path, figures)
