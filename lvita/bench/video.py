"""The video benchmarks as published, by the name ``lvita eval --benchmark`` takes.

Owns nothing but the table: each benchmark lives in its own module (Video-MME:
:mod:`lvita.bench.videomme`; MVBench: :mod:`lvita.bench.mvbench`; LongVideoBench and MLVU's
multiple-choice tasks: :mod:`lvita.bench.longvideo`; the shared scoring rules:
:mod:`lvita.bench.video_common`). MLVU's generation tasks need a judge model and are not here.

    from lvita.bench.video import VIDEO_BENCHMARKS
    bench = VIDEO_BENCHMARKS["Video-MME"]   # a lvita.bench.items.Benchmark
"""
from __future__ import annotations

from lvita.bench.longvideo import LONGVIDEOBENCH, MLVU
from lvita.bench.mvbench import MVBENCH
from lvita.bench.videomme import VIDEO_MME

VIDEO_BENCHMARKS = {b.name: b for b in (VIDEO_MME, MVBENCH, LONGVIDEOBENCH, MLVU)}
UNSUPPORTED = {"MLVU-generation": "MLVU's sub_scene and summary answers are scored by a judge model (GPT); "
                                  "lvita scores without one"}
