"""The data commands' bring-up: a stage file -> its config, model description and input format.

Owns what ``lvita data preview/stats/check/show`` do before touching a record, so the three agree
with each other and with training: load the stage (with ``--set`` overrides), run every config check
for the stage's own layout (a ConfigError before any work), describe the model
(:meth:`lvita.config.schema.ModelConfig.spec`) and bring up its input format
(:meth:`lvita.data.input_format.InputFormat.load`: tokenizer, special ids, tile size), exactly as
``lvita.training.loop`` does.

    cfg, fmt = open_stage("stages/demo/2_general.json", ["data.seq_length=512"])
    planner = Planner(cfg.data, fmt)
"""
from __future__ import annotations


def open_stage(stage: str, sets: list[str]):
    """-> (StageConfig, InputFormat) of a stage file, checked for its own parallel layout."""
    from lvita.config.schema import load_stage
    from lvita.config.validate import validate
    from lvita.data.input_format import InputFormat

    cfg = load_stage(stage, sets)
    p = cfg.parallel
    validate(cfg, max(p.pipeline, 1) * max(p.ulysses, 1) * max(p.ring, 1))  # every ConfigError, before any work
    return cfg, InputFormat.load(cfg.model.spec(), cfg.model.tokenizer)
