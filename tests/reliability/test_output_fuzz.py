"""Model-output fuzzing: thousands of generated answers through the real SDK and engine.

Two machines take the answers: `router` routes on free text with guards that parse it the
way users write them (a label search, a strict_parse `FlowDecision(...)` parse, a named_branch branch from
the text), and `verdict` asks for structured output whose schema allows two values. For
every answer the outcome must be a transition the state declares to the state its table
names, or a recorded error with no transition; refusals, truncated and empty answers never
become a decision; nothing crashes.
"""

from __future__ import annotations

from pathlib import Path

from ..helpers import (
    Figures,
    fuzz_trial,
    scaled,
)

ANSWERS = scaled(1_200, 10_000)


def test_generated_answers_never_reach_an_undeclared_state(tmp_path: Path, figures: Figures) -> None:
    fuzz_trial(tmp_path, figures, ANSWERS)
