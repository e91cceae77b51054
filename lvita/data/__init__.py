"""Training data: sources and their published layouts, record formats, the chat template, the
tokenizer, media decoding, released Long-VITA's input layout (``longvita``), the packer, the
resumable stream and the inspection commands (``lvita data preview|stats|check|show``).

May import: lvita.model (presets, shapes) and lvita.config. Not ckpt, training or infer.
"""
