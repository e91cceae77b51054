"""Configuration: stage JSON -> typed dataclasses (:mod:`.schema`, the one source of truth),
validation against a world size and the DeepSpeed config derived from it (:mod:`.validate`),
``lvita check`` (:mod:`.check`), the memory plan it prints (:mod:`.memory_plan`, with the engines' model
states in :mod:`.zero_memory`) and ``--suggest``'s search (:mod:`.suggest`).

May import: lvita.model and lvita.parallel (to partition a pipeline without building it).
"""
