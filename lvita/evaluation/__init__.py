"""Benchmarks as they are published: loaders, prompts and leaderboard scoring for ``lvita eval --benchmark``.

Owns reading each benchmark's own files (VLMEvalKit TSVs, Video-MME's parquet, MVBench / LongVideoBench /
MLVU json, a V-NIAH haystack) into :class:`lvita.evaluation.items.Item` s, the per-dataset prompt, and scoring
predictions the way the public leaderboards do without a judge model. The model side (prompt encoding,
decoding) stays in :mod:`lvita.infer`; nothing here imports torch.distributed.
"""
