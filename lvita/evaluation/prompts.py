"""The user's text for a benchmark question, as Long-VITA's VLMEvalKit wrappers build it.

Owns the wording around a question: how options, hints and media placeholders are laid out, and the
per-dataset instruction appended at the end. What differs between Long-VITA's two wrappers (a dataset's
system text, the dataset type MLVU is given, answer clean-up) is the :class:`lvita.evaluation.wrappers.Wrapper`
passed in (default :data:`~lvita.evaluation.wrappers.HF`, ``VLMEvalKit/long_vita_hf.py``). Two layouts,
chosen by ``model.format``:

- ``longvita``: the wrappers' shared ``build_msgs`` (same code in ``long_vita_hf.py`` and ``long_vita.py``,
  VITA-MLLM/Long-VITA 3389e76), applied to the message list VLMEvalKit's dataset builds
  (``vlmeval/dataset/image_mcq.py`` ``ImageMCQDataset.build_prompt``, ``MMMUDataset.split_MMMU``,
  ``image_base.py`` for yes/no and VQA, the video datasets' ``build_prompt``; VLMEvalKit 37d08c5):
  images first as ``<image>\\n`` each (MMMU: at its ``<image k>`` placeholders), then
  ``Hint: ..\\nQuestion: ..\\nOptions:\\nA. ..\\n``; VLMEvalKit's "Please select the correct answer from the
  options above." is replaced by the wrapper's instruction ("Answer with the option's letter from the given
  choices directly." for MMMU / MMStar, "Answer with the letter." for other multiple choice, "Answer yes or
  no." for yes/no, OCRBench's "Answer this question using the text in the image directly without any other
  context.", "Offer a very short reply." for video multiple choice). No system prompt (the driver passes
  none; the server wrapper also drops a dataset's system text, :attr:`Wrapper.system_text`). The server
  wrapper cuts an answer after its last "Answer:", the HF one does not (:func:`postprocess`).
- ``internvl``: lvita's earlier prompt, InternVL's VLMEvalKit one: ``<image>\\n`` per image, hint, question,
  ``A. ..`` lines, then "Answer with the option's letter from the given choices directly." (open questions:
  "Answer the question using a single word or phrase."). The wrapper is not read.

    text = image_prompt(item, fmt, "MMBench_DEV_EN", "MCQ")     # fmt: the model's InputFormat
    text = video_mcq_prompt("What happens?", {"A": "x", "B": "y"}, fmt, subtitles="line one\\nline two")

Trade-off: the strings are copied verbatim (trailing spaces and all) rather than tidied, so that scores
compare with the published tables; an unknown dataset name gets VLMEvalKit's fallback instruction.
"""
from __future__ import annotations

import re

from lvita.evaluation.items import Item
from lvita.evaluation.wrappers import HF, Wrapper

MCQ_LETTER_DIRECTLY = "Answer with the option's letter from the given choices directly."
SELECT_FROM_ABOVE = "Please select the correct answer from the options above."
YES_NO_ASKED = "Answer the question with Yes or No."
SHORT_PHRASE = "Answer the question using a single word or phrase."
OCR_INSTRUCTION = "\nAnswer this question using the text in the image directly without any other context."
VIDEO_MCQ_REPLY = "Offer a very short reply."
VIDEO_MME_NOSUB = ("\nThese are the frames of a video. Select the best answer to the following multiple-choice "
                   "question based on the video. Respond with only the letter (A, B, C, or D) of the correct option.\n")
VIDEO_MME_SUB = ("\nThese are the frames of a video. This video's subtitles are listed below:\n{}\nSelect the best "
                 "answer to the following multiple-choice question based on the video. Respond with only the "
                 "letter (A, B, C, or D) of the correct option.\n")

# The wrappers' instruction per dataset kind (build_msgs' if/elif chain, in its order).
LETTER_DIRECTLY_DATASETS = ("MMMU_DEV_VAL", "MMMU_TEST", "MMStar")
IMAGE_PLACEHOLDER = re.compile(r"<image (\d)>")  # MMMU: split_MMMU reads one digit then '>'


def options_text(choices: dict | None) -> str:
    """VLMEvalKit's ``Options:\\nA. ..\\nB. ..\\n`` block ('' without options)."""
    if not choices:
        return ""
    return "Options:\n" + "".join(f"{k}. {v}\n" for k, v in choices.items())


def vlmevalkit_text(item: Item) -> str:
    """The text part of ``ImageMCQDataset.build_prompt``: hint, question, options, VLMEvalKit's own request."""
    text = f"Hint: {item.hint}\n" if item.hint is not None else ""
    text += f"Question: {item.question}\n"
    if item.choices:
        text += options_text(item.choices) + SELECT_FROM_ABOVE + " \n"
    return text


def interleave_order(text: str, n_images: int) -> list[int] | None:
    """MMMU's image order: the 0-based image of each ``<image k>`` in ``text``, in reading order (an image
    may repeat, an unnamed one is left out, as ``split_MMMU``); None when the text names no image.
    A k beyond the row's images raises IndexError."""
    ks = [int(k) - 1 for k in IMAGE_PLACEHOLDER.findall(text)]
    if not ks:
        return None
    if bad := [k + 1 for k in ks if not 0 <= k < n_images]:
        raise IndexError(f"<image {bad[0]}> but the row has {n_images} image(s)")
    return ks


def longvita_finish(text: str, dataset: str, kind: str) -> str:
    """The wrappers' ``build_msgs`` rewrite of the joined text. ``kind``: VLMEvalKit's DATASET_TYPE of the
    name the wrapper is given ("MCQ", "Y/N", "VQA", "Video-MCQ"; :meth:`Wrapper.dataset_type`)."""
    text = text.replace("\nAnswer: ", "\n")
    if dataset == "OCRBench":
        return text + OCR_INSTRUCTION
    if dataset in LETTER_DIRECTLY_DATASETS:
        return text.replace(SELECT_FROM_ABOVE, "").strip() + "\n" + MCQ_LETTER_DIRECTLY
    if dataset == "MVBench":
        return text.replace("Only give the best option.Best option:(", "") + "Answer with the letter."
    if kind == "Y/N":
        return text.replace(YES_NO_ASKED, "").strip() + "\nAnswer yes or no."
    if kind == "MCQ":
        return text.replace(SELECT_FROM_ABOVE, "").strip() + "\nAnswer with the letter."
    if kind == "VQA":
        return text
    if kind == "Video-MCQ":
        return text + VIDEO_MCQ_REPLY
    return text.replace(SHORT_PHRASE, "").strip() + "\n" + SHORT_PHRASE


def internvl_text(question: str, choices: dict | None, hint: str | None = None) -> str:
    """InternVL's VLMEvalKit prompt (lvita's format before longvita): hint, question, options, instruction."""
    text = f"{hint}\n{question}" if hint is not None else question
    if choices:
        return text + "".join(f"\n{k}. {v}" for k, v in choices.items()) + "\n" + MCQ_LETTER_DIRECTLY
    return text + "\n" + SHORT_PHRASE


def image_prompt(item: Item, fmt, dataset: str, kind: str, wrapper: Wrapper = HF) -> str:
    """The user's text for an image benchmark item (one ``<image>`` per entry of ``item.images``); ``fmt``:
    the model's input format (lvita.data.input_format; its class will do: only ``wrapper_prompts`` is read).
    Image datasets have no system text: both wrappers send the same text."""
    if not fmt.wrapper_prompts:
        text = internvl_text(item.question, item.choices, item.hint)
    elif kind == "Y/N" or kind == "VQA":  # ImageBaseDataset.build_prompt: the question alone
        text = item.question
    else:
        text = vlmevalkit_text(item)
    if item.meta.get("interleaved"):  # the loader ordered item.images by these placeholders
        text = IMAGE_PLACEHOLDER.sub("<image>\n" if fmt.wrapper_prompts else "<image>", text)
    else:
        text = "<image>\n" * len(item.images) + text
    return longvita_finish(text, dataset, wrapper.dataset_type(dataset, kind)) if fmt.wrapper_prompts else text


def videomme_text(question: str, choices: dict, subtitles: str | None = None) -> str:
    """VLMEvalKit's Video-MME text for a video model: ``<video>``, the frames template (with its subtitle
    block when ``subtitles`` is not None), ``Question: q\\nA. ..\\nB. ..\\nAnswer: ``."""
    frames = VIDEO_MME_NOSUB if subtitles is None else VIDEO_MME_SUB.format(subtitles)
    body = question + "\n" + "\n".join(f"{k}. {v}" for k, v in choices.items())
    return "<video>" + frames + f"Question: {body}\nAnswer: "


def video_mcq_prompt(question: str, choices: dict, fmt, subtitles: str | None = None,
                     dataset: str = "Video-MME") -> str:
    """A video multiple-choice prompt with one ``<video>`` placeholder: :func:`videomme_text` with the
    wrapper's "Offer a very short reply." (longvita); InternVL's layout otherwise. ``choices``: {"A": text}."""
    if not fmt.wrapper_prompts:
        return "<video>\n" + internvl_text(question, choices)
    return longvita_finish(videomme_text(question, choices, subtitles), dataset, "Video-MCQ")


def postprocess(answer: str, fmt, wrapper: Wrapper = HF) -> str:
    """The answer as the wrapper returns it (:meth:`Wrapper.postprocess`: the server wrapper keeps what
    follows the last "Answer:", the HF one all); unchanged under ``internvl``."""
    return wrapper.postprocess(answer) if fmt.wrapper_prompts else answer
