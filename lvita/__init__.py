"""lvita: a DeepSpeed pipeline trainer for Long-VITA, stage by stage, from JSON configs.

The tree is the architecture; each package imports only the ones listed before it:

    model/     single-device model, parameter names, FLOPs     (torch, transformers)
    parallel/  topology, pipeline adapters, sequence parallelism (+ model)
    config/    stage JSON -> dataclasses, validation, lvita check (+ model, parallel)
    data/      sources, formats, template, tokenizer, media, packer, stream (+ config)
    ckpt/      checkpoints, resume, init_from, Hugging Face conversion (+ data)
    training/  the run, optimizer, monitor, guard, stopping, levers (+ ckpt)
    infer/     prompts, decoding, context-parallel decoding, eval  (+ ckpt; not training)
    demo/      the built-in tiny demo

The plain modules here are the entry points users type: ``lvita.train``, ``lvita.generate`` and
``lvita.eval`` (``deepspeed --module ...`` / ``python -m ...``), ``lvita.launch`` and the ``lvita``
command (``lvita.cli``).
"""
__version__ = "0.1.0"
