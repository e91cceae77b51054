"""Inference: prompts built as training builds samples, greedy decoding with a KV cache on one
device (:mod:`.decode`), context-parallel decoding with a sharded KV cache, the ``generate`` and
``eval`` commands (started by ``python -m lvita.generate|lvita.eval``).

May import: every package below (model, parallel, config, data, ckpt). Not lvita.training.
"""
