"""Long-VITA's two VLMEvalKit wrappers, as objects: what each sends a model and what it does with the answer.

Owns every behaviour in which the two wrappers of VITA-MLLM/Long-VITA (3389e76, run with the VLMEvalKit it
pins, 37d08c5) differ, so a benchmark's prompt, answer length, frame limits and answer clean-up are chosen
by passing one :class:`Wrapper` down (built once; no wrapper names compared elsewhere):

- :data:`HF` (``"hf"``, the default): ``VLMEvalKit/long_vita_hf.py`` ``LongVITA_HF``, the path for the
  released Hugging Face checkpoints (``VLMEvalKit/evaluation_long_vita_hf.sh``). A local model to
  VLMEvalKit: ``BaseModel.generate`` hands ``build_msgs`` every message, so a dataset's ``role='system'``
  text (MVBench's, MLVU's) is part of the user's text; VLMEvalKit's ``infer_data`` names an MLVU question by
  its sub-dataset, ``MLVU_MCQ``, whose type is Video-MCQ. Greedy, ``max_new_tokens`` 1024 (images and
  videos); frames: ``get_external_inputs``' ``max_fps=1`` and ``MAX_NUM_FRAME`` (environment, default
  4096). The decoded answer is returned as generated.
- :data:`SERVER` (``"server"``): ``VLMEvalKit/long_vita.py`` ``LongVITAAPI``, the client of the Megatron
  text-generation server (``VLMEvalKit/evaluation_long_vita.sh``). An API model to VLMEvalKit:
  ``BaseAPI.generate`` moves ``role='system'`` text into ``self.system_prompt``, which ``generate_inner``
  never sends, and ``infer_data_api`` names MLVU ``MLVU`` (a type VLMEvalKit does not annotate: MCQ).
  ``tokens_to_generate`` 1024; ``max_num_frame`` is sent only when ``MAX_NUM_FRAME`` is set (the
  evaluation script sets 64..1024), else the server's ``--max-num-frame``: 4096 in
  ``scripts/megatron/qwen25/inference_qwen25_14b_intern_300m_server.sh`` (argparse default 8; the modellink
  non-CP script passes 128), ``--max-fps 1``. An answer holding ``"Answer:"`` keeps what follows its last one.

Both build the text with the same ``build_msgs`` (:func:`lvita.evaluation.prompts.longvita_finish`). Checked
by running both wrappers on synthetic items of all 10 benchmarks (``tests/fixtures/longvita_wrappers``).

    from lvita.evaluation.wrappers import HF, wrapper_named
    w = wrapper_named("server")
    text = bench.prompt(item, fmt, w); n = w.max_new_tokens(bench); answer = w.postprocess(raw)
"""
from __future__ import annotations

from dataclasses import dataclass

from lvita.errors import UserError

VLMEVALKIT = "open-compass/VLMEvalKit 37d08c5"


@dataclass(frozen=True)
class Wrapper:
    name: str  # what --wrapper takes
    source: str  # the wrapper's file, repository and commit
    system_text: bool  # a dataset's role='system' text reaches the user's text
    cuts_after_answer: bool  # an answer holding "Answer:" keeps what follows its last one
    max_frames: int  # most frames per video unless MAX_NUM_FRAME is set
    max_fps: float  # frames per second of video at most
    image_tokens: int = 1024  # greedy answer length, image benchmarks
    video_tokens: int = 1024  # greedy answer length, video benchmarks
    # (dataset, VLMEvalKit's DATASET_TYPE of the name this wrapper is given) where it differs from the
    # benchmark's own type
    dataset_types: tuple[tuple[str, str], ...] = ()

    def max_new_tokens(self, bench) -> int:
        """The answer length this wrapper allows for ``bench`` (a lvita.evaluation.items.Benchmark)."""
        return self.video_tokens if bench.video else self.image_tokens

    def dataset_type(self, dataset: str, kind: str) -> str:
        """The type ``build_msgs`` sees for ``dataset`` (``kind``: the benchmark's own VLMEvalKit type)."""
        return dict(self.dataset_types).get(dataset, kind)

    def postprocess(self, answer: str) -> str:
        if self.cuts_after_answer and "Answer:" in answer:
            return answer.split("Answer:")[-1].strip()
        return answer

    def __str__(self) -> str:
        return f"{self.name} ({self.source} with {VLMEVALKIT})"


HF = Wrapper("hf", "VLMEvalKit/long_vita_hf.py @ VITA-MLLM/Long-VITA 3389e76", system_text=True,
             cuts_after_answer=False, max_frames=4096, max_fps=1)
SERVER = Wrapper("server", "VLMEvalKit/long_vita.py @ VITA-MLLM/Long-VITA 3389e76", system_text=False,
                 cuts_after_answer=True, max_frames=4096, max_fps=1, dataset_types=(("MLVU", "MCQ"),))
WRAPPERS = {w.name: w for w in (HF, SERVER)}


def wrapper_named(name: str) -> Wrapper:
    try:
        return WRAPPERS[name]
    except KeyError:
        raise UserError(f"--wrapper {name!r}: expected one of {', '.join(WRAPPERS)} "
                        f"({'; '.join(f'{w.name}: {w.source}' for w in WRAPPERS.values())})") from None
