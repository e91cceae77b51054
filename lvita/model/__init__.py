"""Single-device Long-VITA: no torch.distributed, no deepspeed, no lvita.parallel in here."""
