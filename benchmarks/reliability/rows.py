"""One measured line of RELIABILITY.md and the parts that produce them."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, Field

Section = Literal["load", "soak", "faults", "fuzz", "limits", "security"]

# Part name -> module of this package that measures it (each has ``run(quick) -> rows``).
PARTS: dict[str, str] = {
    "load": "benchmarks.reliability.load",
    "soak": "benchmarks.reliability.soak",
    "faults": "benchmarks.reliability.faults",
    "fuzz": "benchmarks.reliability.fuzz",
    "limits": "benchmarks.reliability.limits",
}


class Row(BaseModel):
    """A check and what it measured, e.g. section "faults", name "orchestrator SIGKILL with
    20 live sessions", result "20/20 resumed, items lost 0, recovery p50 0.4 s / max 1.1 s".
    """

    section: Section
    name: str
    # The figures, short and human-readable (they go into the table as they are).
    result: str
    passed: bool
    # The command that reproduces this row (``python -m benchmarks.reliability faults``).
    command: str
    # Machine-readable figures behind ``result`` (kept in results/<part>.json).
    figures: dict[str, Any] = Field(default_factory=dict)
    # Why it failed or what it does not cover (goes under the table).
    note: str = ""


def command(part: str, env_prefix: str) -> str:
    """The command that reproduces a part's rows, with the ``env_prefix`` variables this
    run was given (``CASCADE_LOAD_STEPS=5,10 python -m benchmarks.reliability load``)."""
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                   if k.startswith(env_prefix))
    return f"{env} python -m benchmarks.reliability {part}".strip()
