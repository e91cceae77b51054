"""The video benchmarks as published, by the name ``lvita eval --benchmark`` takes.

Owns nothing but the table: each benchmark lives in its own module (Video-MME:
:mod:`lvita.evaluation.videomme`; MVBench: :mod:`lvita.evaluation.mvbench`; LongVideoBench and MLVU's
multiple-choice tasks: :mod:`lvita.evaluation.longvideo`; the shared scoring rules:
:mod:`lvita.evaluation.video_common`). MLVU's generation tasks need a judge model and are not here.

    from lvita.evaluation.video import VIDEO_BENCHMARKS
    bench = VIDEO_BENCHMARKS["Video-MME"]   # a lvita.evaluation.items.Benchmark
"""
from __future__ import annotations

from lvita.evaluation.longvideo import LONGVIDEOBENCH, MLVU
from lvita.evaluation.mvbench import MVBENCH
from lvita.evaluation.videomme import VIDEO_MME

VIDEO_BENCHMARKS = {b.name: b for b in (VIDEO_MME, MVBENCH, LONGVIDEOBENCH, MLVU)}
UNSUPPORTED = {"MLVU-generation": "MLVU's sub_scene and summary answers are scored by a judge model (GPT); "
                                  "lvita scores without one"}
