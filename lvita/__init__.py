"""lvita: a DeepSpeed pipeline trainer for Long-VITA, stage by stage, from JSON configs."""
__version__ = "0.1.0"
