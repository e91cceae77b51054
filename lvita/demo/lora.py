"""The demo's end of the LoRA flow: after the LoRA stage trains, export its model with the adapters merged and
answer a question.

    python -c "from lvita.demo.lora import export_and_answer; print(export_and_answer('demo_out/5_lora'))"

The export is ``lvita convert to-hf``'s (:func:`lvita.ckpt.convert.to_hf`, the checkpoint's own model.format):
the readers of a LoRA checkpoint merge ``W + alpha / rank * B @ A`` (lvita.ckpt.weights.read_block), so the
export is a plain model that loads anywhere the other stages' exports do. The answer is greedy decoding
(:func:`lvita.infer.generate.answer`) of the export itself, as ``lvita generate --model demo_out/5_lora/export``
gives it (tests/test_demo.py checks the export's weights against the checkpoint's merged ones). Trade-off: the
export is written next to the stage's checkpoints and replaced on every demo run (a few MB for the tiny model).
"""
from __future__ import annotations

import shutil
from pathlib import Path

QUESTION = "What is 12 + 30?"  # the demo's short-text sources teach this form (lvita.demo.dataset._text_short)


def is_lora_stage(stage: Path) -> bool:
    import json

    return bool(json.loads(Path(stage).read_text()).get("model", {}).get("lora"))


def export_and_answer(stage_out: str | Path, question: str = QUESTION, max_new_tokens: int = 24,
                      log=print) -> tuple[Path, str]:
    """Export ``stage_out``'s newest checkpoint merged into ``stage_out/export``; -> (export, its answer)."""
    from lvita.ckpt.convert import to_hf
    from lvita.infer.generate import answer, load_model, model_system_prompt

    stage_out = Path(stage_out)
    export = stage_out / "export"
    shutil.rmtree(export, ignore_errors=True)
    to_hf(str(stage_out / "checkpoints"), str(export), log=log)
    model, fmt = load_model(export)
    text, _ = answer(model, fmt, [{"role": "user", "content": question}], max_new_tokens=max_new_tokens,
                     system_prompt=model_system_prompt(export, fmt.tok))
    return export, text
