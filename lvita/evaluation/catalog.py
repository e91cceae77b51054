"""What ``lvita eval --benchmark NAME`` can run, by VLMEvalKit's names, and what it refuses.

Owns the catalog (:data:`CATALOG`): every published benchmark (a :class:`lvita.evaluation.items.Benchmark`:
load, prompt, score), lvita's own JSONL sets (``jsonl``, the default) and V-NIAH (``vniah``, an
:class:`OwnCommand`: a grid of frame counts x needle depths with its own options, not a list of items),
plus :data:`UNSUPPORTED` (name -> why: a judge model scores it, or its answers are not published).
Adding a benchmark is one entry here; its module owns loading, prompt and scoring.

    from lvita.evaluation.catalog import lookup
    bench = lookup("MMBench_DEV_EN")      # an unknown name: UserError naming the valid names

Trade-off: a plain dict built at import (every loader module is imported, none reads a file until
``load`` is called; V-NIAH's module is imported only when it runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lvita.errors import UserError
from lvita.evaluation.items import Benchmark
from lvita.evaluation.jsonl_set import JSONL_SET
from lvita.evaluation.video import UNSUPPORTED as VIDEO_UNSUPPORTED
from lvita.evaluation.video import VIDEO_BENCHMARKS
from lvita.evaluation.vlmevalkit import BENCHMARKS as VLMEVALKIT


@dataclass(frozen=True)
class OwnCommand:
    """A catalog entry with its own command line (``main(argv) -> exit status``)."""
    name: str
    main: Callable[[list[str]], int]
    summary: str


def _vniah(argv: list[str]) -> int:
    from lvita.evaluation.vniah import main

    return main(argv)


VNIAH = OwnCommand("vniah", _vniah, "video needle-in-a-haystack grid (LongVA's V-NIAH): --haystack, --needles, "
                                    "--haystack-frames, --depths; see lvita eval --benchmark vniah --help")
CATALOG: dict[str, Benchmark | OwnCommand] = {JSONL_SET.name: JSONL_SET, **VLMEVALKIT, **VIDEO_BENCHMARKS,
                                              VNIAH.name: VNIAH}

_JUDGE = "scored by a judge model (GPT) on the leaderboard; exact matching would not reproduce its numbers"
_NO_ANSWERS = "its answers are not published: submit predictions to the leaderboard's evaluation server"
UNSUPPORTED: dict[str, str] = {
    "MMVet": _JUDGE, "MathVista_MINI": _JUDGE, "MathVista": _JUDGE,
    **VIDEO_UNSUPPORTED,
    **{name: _NO_ANSWERS for name in ("MMBench_TEST_EN", "MMBench_TEST_CN", "MMBench_TEST_EN_V11",
                                      "MMBench_TEST_CN_V11", "MMMU_TEST")},
}


def lookup(name: str) -> Benchmark | OwnCommand:
    """The catalog entry called ``name``; UserError saying why for an unsupported or unknown name."""
    if name in CATALOG:
        return CATALOG[name]
    if name in UNSUPPORTED:
        raise UserError(f"--benchmark {name} is not supported: {UNSUPPORTED[name]}")
    raise UserError(f"--benchmark {name}: unknown; known: {', '.join(CATALOG)}")


def listing() -> str:
    """The catalog for ``lvita eval --help``."""
    rows = [f"  {JSONL_SET.name:<20} lvita's own JSONL set in the training sample format (the default)"]
    rows += [f"  {name:<20} VLMEvalKit's {name}" for name in VLMEVALKIT]
    rows += [f"  {name:<20} {name} as published (video)" for name in VIDEO_BENCHMARKS]
    rows += [f"  {VNIAH.name:<20} {VNIAH.summary}"]
    return "benchmarks (--benchmark NAME):\n" + "\n".join(rows) + \
        "\nnot supported: " + ", ".join(sorted(UNSUPPORTED)) + " (a judge model scores them, or no answers are public)"
