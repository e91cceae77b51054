"""The benchmarks ``lvita eval --benchmark NAME`` knows, by VLMEvalKit's names, and those it refuses.

Owns the name -> :class:`lvita.evaluation.items.Benchmark` table (:data:`BENCHMARKS`) and :data:`UNSUPPORTED`
(name -> why: a judge model scores it, or its answers are not published). Adding a benchmark is one
entry here; its module owns loading, prompt and scoring.

    from lvita.evaluation.catalog import BENCHMARKS, lookup
    bench = lookup("MMBench_DEV_EN")      # KeyError-free: UserError naming the valid names

Trade-off: a plain dict built at import (every loader module is imported, none reads a file until
``load`` is called).
"""
from __future__ import annotations

from lvita.evaluation.items import Benchmark
from lvita.evaluation.video import UNSUPPORTED as VIDEO_UNSUPPORTED
from lvita.evaluation.video import VIDEO_BENCHMARKS
from lvita.evaluation.vlmevalkit import BENCHMARKS as VLMEVALKIT
from lvita.errors import UserError

BENCHMARKS: dict[str, Benchmark] = {**VLMEVALKIT, **VIDEO_BENCHMARKS}

_JUDGE = "scored by a judge model (GPT) on the leaderboard; exact matching would not reproduce its numbers"
_NO_ANSWERS = "its answers are not published: submit predictions to the leaderboard's evaluation server"
UNSUPPORTED: dict[str, str] = {
    "MMVet": _JUDGE, "MathVista_MINI": _JUDGE, "MathVista": _JUDGE,
    **VIDEO_UNSUPPORTED,
    **{name: _NO_ANSWERS for name in ("MMBench_TEST_EN", "MMBench_TEST_CN", "MMBench_TEST_EN_V11",
                                      "MMBench_TEST_CN_V11", "MMMU_TEST")},
}


def lookup(name: str) -> Benchmark:
    """The benchmark called ``name``; UserError saying why for an unsupported or unknown name."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    if name in UNSUPPORTED:
        raise UserError(f"--benchmark {name} is not supported: {UNSUPPORTED[name]}")
    raise UserError(f"--benchmark {name}: unknown; known benchmarks: {', '.join(sorted(BENCHMARKS))}")
