"""Checkpoints and weights: saving and locating lvita checkpoints (crash-safe, with a manifest),
resuming and universal copies for another layout, ``model.init_from`` (weights alone), the
Hugging Face InternVL format and ``lvita convert`` / ``lvita ckpt``.

May import: lvita.model, lvita.config, lvita.data (tokenizer, template). Not training or infer.
"""
