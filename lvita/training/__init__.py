"""Training: the run itself (:mod:`.loop`, started by ``deepspeed --module lvita.train``), the
optimizer and LR schedule, monitoring (TensorBoard, metrics.jsonl), the non-finite guard, stopping
on signals and time limits, and the memory levers applied to the model from outside.

May import: every package below (model, parallel, config, data, ckpt). Not lvita.infer.
"""
