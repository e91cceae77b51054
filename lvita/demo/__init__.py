"""The built-in demo: synthetic data and the five-stage run (four curriculum stages, then a LoRA fine-tune) (``lvita demo``).

May import: anything in lvita (it sits at the top, with the entry points).
"""
