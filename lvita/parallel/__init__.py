"""Parallelism for training, applied from outside the model: the topology (the one place process
groups are made), the DeepSpeed PipelineModule adapters, sequence sharding, Ulysses, the zigzag
ring kernel, the hybrid (yunchang) attention, and the list of library internals lvita patches
(:mod:`.internals`, used by lvita.training too).

May import: lvita.model, torch.distributed, deepspeed, yunchang. Not lvita.config, data, ckpt,
training or infer (they sit above).
"""
