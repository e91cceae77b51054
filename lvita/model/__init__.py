"""The single-device model: Long-VITA's blocks, attention as an injectable function, the chunked
LM-head loss, the presets, the model's own parameter names (plain keys <-> pipeline blocks) and
its FLOP count.

May import: torch and transformers only. Nothing here imports torch.distributed, deepspeed or any
other lvita package; parallelism and memory levers are applied from outside (lvita.parallel,
lvita.training.levers).
"""
