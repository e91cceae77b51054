"""``model.init_from`` an HF directory on a pipeline rank reads only that rank's tensors.

Each rank of a 2-stage pipeline initialises from a sharded HF export of a tiny model while
``safetensors.safe_open`` is spied on: the tensors (and bytes) it reads must be exactly those of
the rank's blocks, a shard holding none of them is never read from, and the loaded weights equal
the full load's. The fused-qkv path (InternViT-6B) reads one third of the tensor per projection.
"""
from __future__ import annotations

import pytest
import torch

from lvita.ckpt.hf import write_hf_dir
from lvita.ckpt.hf_read import read_hf
from lvita.data.tokenizer import load_tokenizer, special_token_ids
from lvita.model.longvita import LongVita, block_of
from lvita.model.presets import llm_config
from tests.distributed import run_world

N_LAYERS = llm_config("tiny").num_hidden_layers


class _Spy:
    """Wraps ``safetensors.safe_open``; records (file, name, bytes) of every tensor read."""
    reads: list = []

    def __init__(self, real):
        self.real = real

    def __call__(self, filename, framework, *a, **kw):
        spy = self

        class Handle:
            def __init__(self):
                self.ctx = spy.real(filename, framework, *a, **kw)

            def __enter__(self):
                self.h = self.ctx.__enter__()
                return self

            def __exit__(self, *exc):
                return self.ctx.__exit__(*exc)

            def keys(self):
                return self.h.keys()

            def get_tensor(self, name):
                t = self.h.get_tensor(name)
                _Spy.reads.append((str(filename), name, t.nbytes))
                return t

            def get_slice(self, name):
                sl = self.h.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return sl.get_shape()

                    def __getitem__(self, idx):
                        t = sl[idx]
                        _Spy.reads.append((str(filename), name, t.nbytes))
                        return t
                return Slice()
        return Handle()


def _spy_on_safetensors(monkeypatch=None):
    import safetensors

    _Spy.reads = []
    if not isinstance(safetensors.safe_open, _Spy):
        spy = _Spy(safetensors.safe_open)
        if monkeypatch is None:  # a spawned rank: it exits after the test
            safetensors.safe_open = spy
        else:
            monkeypatch.setattr(safetensors, "safe_open", spy)
    return _Spy.reads


@pytest.fixture(scope="module")
def hf(tokenizer_dir, tmp_path_factory):
    ids = special_token_ids(load_tokenizer(tokenizer_dir))
    model = LongVita("tiny", ids["img_context"], seed=11)
    out = write_hf_dir(model.state_dict(), "tiny", tokenizer_dir, tmp_path_factory.mktemp("hf") / "out",
                       ids["img_context"], max_shard_size="200KB")  # several shards
    return out, ids, model.state_dict()


def _init_on_stage(rank, hf_dir, tokenizer_dir, image_token_id):
    from lvita.ckpt.checkpoint import tokenizer_fingerprint
    from lvita.ckpt.weights import init_from, local_blocks
    from lvita.parallel.pipeline import build_pipeline
    from lvita.parallel.topology import build_topology, init_distributed

    init_distributed()
    topo = build_topology(2, 1, 1)
    module = build_pipeline("tiny", image_token_id, 99, 2, topology=topo.deepspeed)
    reads = _spy_on_safetensors()
    init_from(module, hf_dir, "tiny", tokenizer_fingerprint(load_tokenizer(tokenizer_dir)))
    from lvita.model.longvita import plain_key
    state = {plain_key(b, k, N_LAYERS): v.clone() for b, m in local_blocks(module).items()
             for k, v in m.state_dict().items()}
    return list(reads), state


def test_init_from_hf_on_a_pipeline_rank_reads_only_its_tensors(hf, tokenizer_dir, monkeypatch):
    hf_dir, ids, plain = hf
    assert len(list(hf_dir.glob("*.safetensors"))) > 2
    full_reads = _spy_on_safetensors(monkeypatch)
    full, _ = read_hf([hf_dir], "tiny")
    full_bytes = sum(r[2] for r in full_reads)
    assert full_bytes == sum(v.nbytes for v in full.values())  # the spy sees every byte of a full read
    results = run_world(_init_on_stage, 2, str(hf_dir), str(tokenizer_dir), ids["img_context"])
    seen_blocks, total = set(), 0
    for rank, (reads, state) in enumerate(results):
        blocks = {block_of(k, N_LAYERS)[0] for k in state}
        assert blocks and not blocks & seen_blocks
        seen_blocks |= blocks
        # exactly the rank's tensors were read, each once, and their bytes only
        assert sorted(k for k in full if block_of(k, N_LAYERS)[0] in blocks) == sorted(state)
        rank_bytes = sum(r[2] for r in reads)
        assert rank_bytes == sum(v.nbytes for v in state.values()), rank
        assert rank_bytes < 0.8 * full_bytes, (rank, rank_bytes, full_bytes)
        assert len(reads) == len(state)  # the tied lm_head is read once for the head, not for stage 0's embed
        for k, v in state.items():
            assert torch.equal(v, full[k]), (rank, k)
            assert torch.equal(v, plain[k]), (rank, k)
        total += rank_bytes
    assert seen_blocks == set(range(N_LAYERS + 2))
    assert total == full_bytes
    stage1_files = {r[0] for r in results[1][0]}
    assert stage1_files != {str(f) for f in hf_dir.glob("*.safetensors")}  # some shard was never read from


def test_fused_qkv_reads_one_third_per_projection(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from lvita.ckpt.hf_read import _load

    qkv = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    save_file({"qkv": qkv}, str(tmp_path / "w.safetensors"))
    f = tmp_path / "w.safetensors"
    reads = _spy_on_safetensors(monkeypatch)
    got = _load({n: (f, "qkv", i, (2, 4)) for i, n in enumerate("qkv")})
    assert [torch.equal(got[n], qkv.chunk(3)[i]) for i, n in enumerate("qkv")] == [True] * 3
    assert [r[2] for r in reads] == [qkv.nbytes // 3] * 3
