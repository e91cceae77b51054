"""The built-in demo: synthetic data and the four-stage run (``lvita demo``).

May import: anything in lvita (it sits at the top, with the entry points).
"""
