"""Packed (varlen) attention: every available kernel equals a block-diagonal causal reference
(per-sample SDPA semantics), the detection of what the installed torch offers (faked torch
feature sets for 2.9 / 2.10 / 2.11 / 2.12+ signatures of varlen_attn, flash-attn absent or broken),
the arguments handed to torch's varlen_attn, max_seqlen computed once per cu_seqlens tensor, and
validation naming the torch version when no kernel is available. CUDA kernels skip without CUDA."""
from __future__ import annotations

import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lvita.config.schema import ConfigError, load_stage
from lvita.config.validate import validate
from lvita.model import attention
from tests.conftest import stage_dict, write_stage

LENGTHS = [5, 1, 9, 3, 14]  # packed samples over B=2 rows of 16 tokens
B, S, HQ, HKV, D = 2, 16, 4, 2, 16


def _packed(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, h, D, generator=g).to(device, dtype) for h in (HQ, HKV, HKV))
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).reshape(B, S).to(device)
    return q, k, v, pos


def _reference(q, k, v, pos):
    """fp32 attention over each row with a block-diagonal causal mask (sample = restart of pos)."""
    sample = torch.cumsum((pos.reshape(-1) == 0).long(), 0).reshape(B, S)
    sample = sample + torch.arange(B, device=pos.device).unsqueeze(1) * 1000  # rows always split samples
    i = torch.arange(S, device=pos.device)
    mask = (sample.unsqueeze(2) == sample.unsqueeze(1)) & (i.unsqueeze(1) >= i.unsqueeze(0))  # (B, S, S)
    kr, vr = (t.float().repeat_interleave(HQ // HKV, 2).transpose(1, 2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), kr, vr, attn_mask=mask.unsqueeze(1))
    return out.transpose(1, 2)


@pytest.fixture
def fresh_detection():
    detect = attention.packed_kernels
    detect.cache_clear()
    yield
    detect.cache_clear()


def _run(kernel, dtype, device):
    q, k, v, pos = _packed(dtype, device)
    cu = attention.cu_seqlens_from_position_ids(pos)
    flat = (t.reshape(B * S, *t.shape[2:]) for t in (q, k, v))
    got = attention.packed_attention(*flat, cu, None, kernel).reshape(q.shape)
    return got.float(), _reference(q, k, v, pos)


def test_sdpa_per_sample_equals_reference_on_cpu():
    got, want = _run("sdpa", torch.float32, "cpu")  # noise fp32 ~1e-7; bug: samples mixed ~1e-1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    q, k, v, pos = _packed()  # and through local_attention, which picks it on CPU
    out = attention.local_attention(q, k, v, cu_seqlens=attention.cu_seqlens_from_position_ids(pos))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["flash_attn", "torch_varlen", "sdpa"])
def test_each_available_kernel_equals_reference_on_cuda(kernel):
    if kernel not in attention.packed_kernels():
        pytest.skip(f"{kernel} is not available with torch {torch.__version__}")
    got, want = _run(kernel, torch.bfloat16, "cuda")  # bf16: noise ~4e-3 (1 ulp); bug: samples mixed ~1e-1
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def _fake_varlen(params: str):
    """A torch.nn.attention.varlen module whose varlen_attn has one release's signature and
    computes per-sample attention on CPU, recording what it was given."""
    calls = []
    ns = {}
    exec(f"def varlen_attn({params}):\n    return impl(locals())", {"impl": lambda a: (calls.append(a), _impl(a))[1]},
         ns)
    return types.SimpleNamespace(varlen_attn=ns["varlen_attn"]), calls


def _impl(a):
    cu = a["cu_seq_q"].tolist()
    assert a["cu_seq_q"].dtype == torch.int32 and a["max_q"] == max(LENGTHS) == a["max_k"]
    assert a.get("window_size", (-1, 0)) == (-1, 0)
    return attention.packed_attention(a["query"], a["key"], a["value"], torch.tensor(cu), a.get("scale"), "sdpa")


SIGNATURES = {  # torch release -> varlen_attn's parameters (torch/nn/attention/varlen.py of each wheel)
    "2.10": "query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None",
    "2.11": "query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, "
            "window_size=(-1, -1)",
    "2.12": "query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, "
            "window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None",
}


@pytest.mark.parametrize("release", ["2.9", "2.10", "2.11", "2.12"])
def test_detection_and_arguments_for_each_torch_release(release, monkeypatch, fresh_detection):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # flash-attn absent: import raises
    if release == "2.9":
        monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # no such module before 2.10
    else:
        fake, calls = _fake_varlen(SIGNATURES[release])
        monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", fake)
    usable = release in ("2.11", "2.12")
    assert attention.packed_kernels() == (("torch_varlen",) if usable else ()) + ("sdpa",)
    if usable:  # the arguments lvita passes fit this release, and the result is right
        got, want = _run("torch_varlen", torch.float32, "cpu")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert calls[-1]["window_size"] == (-1, 0) and ("enable_gqa" in calls[-1]) == (release == "2.12")
        assert release == "2.11" or calls[-1]["enable_gqa"] is True  # GQA: 4 query heads, 2 KV heads


def test_broken_flash_attn_counts_as_absent(monkeypatch, fresh_detection):
    broken = types.ModuleType("flash_attn")
    broken.__getattr__ = lambda name: (_ for _ in ()).throw(OSError("undefined symbol: _ZN3c10..."))
    monkeypatch.setitem(sys.modules, "flash_attn", broken)
    assert "flash_attn" not in attention.packed_kernels()
    good = types.ModuleType("flash_attn")
    good.flash_attn_varlen_func = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "flash_attn", good)
    attention.packed_kernels.cache_clear()
    assert attention.packed_kernels()[0] == "flash_attn"


def test_kernel_choice_by_device_and_dtype(monkeypatch, fresh_detection):
    monkeypatch.setattr(attention, "packed_kernels", lambda: ("torch_varlen", "sdpa"))
    cpu = torch.empty(1, 1, 1, 8, dtype=torch.bfloat16)
    assert attention._packed_kernel(cpu) == "sdpa"  # the fused kernels are CUDA bf16/fp16 only
    monkeypatch.setattr(attention, "packed_kernels", lambda: ())
    with pytest.raises(RuntimeError, match=re.escape(f"torch {torch.__version__}")):
        attention._packed_kernel(cpu)


def test_max_seqlen_and_bounds_are_computed_once_per_cu_seqlens(monkeypatch):
    _, _, _, pos = _packed()
    cu = attention.cu_seqlens_from_position_ids(pos)
    syncs = []
    real_int = int
    monkeypatch.setattr(attention, "int", lambda x: (syncs.append(1), real_int(x))[1], raising=False)
    assert [attention.max_seqlen(cu) for _ in range(4)] == [max(LENGTHS)] * 4  # four layers
    assert len(syncs) == 1
    cu2 = attention.cu_seqlens_from_position_ids(pos)  # the next forward pass: a new tensor
    assert attention.max_seqlen(cu2) == max(LENGTHS) and len(syncs) == 2
    q, k, v, _ = _packed()
    flat = [t.reshape(B * S, *t.shape[2:]) for t in (q, k, v)]
    lists = []
    monkeypatch.setattr(attention._BOUNDS, "get", lambda t, f, extra=None, real=attention._BOUNDS.get:
                        real(t, lambda: (lists.append(1), f())[1], extra))
    for _ in range(3):
        attention.packed_attention(*flat, cu2, None, "sdpa")
    assert len(lists) == 1


def test_validation_names_the_torch_version_when_no_kernel_is_available(tmp_path, tokenizer_dir, dataset_dir,
                                                                        monkeypatch):
    from lvita.config import validate as validate_module

    stage = write_stage(tmp_path / "s.json", stage_dict(tokenizer_dir, dataset_dir, tmp_path / "out"))
    monkeypatch.setattr(validate_module, "packed_kernels", lambda: ())
    with pytest.raises(ConfigError) as e:
        validate(load_stage(stage, ["data.reset_position_ids=true"]), 2)
    assert f"torch {torch.__version__}" in str(e.value) and "data.reset_position_ids" in str(e.value)
    validate(load_stage(stage, ["data.reset_position_ids=false"]), 2)  # one sample per row: plain SDPA
    monkeypatch.setattr(validate_module, "packed_kernels", lambda: ("sdpa",))
    validate(load_stage(stage, ["data.reset_position_ids=true"]), 2)
