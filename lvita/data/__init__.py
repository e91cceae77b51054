"""Training data: sources and their published layouts, record formats, the chat template, the
tokenizer, media decoding, the packer, the resumable stream and the inspection commands
(``lvita data preview|stats|check``).

May import: lvita.model (presets, shapes) and lvita.config. Not ckpt, training or infer.
"""
