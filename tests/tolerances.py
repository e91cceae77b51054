"""How close each float comparison of the suite comes to its tolerance, on this machine.

With ``LVITA_TOLERANCE_LOG=FILE`` set, conftest wraps ``torch.testing.assert_close`` and
``pytest.approx`` (and tests call :func:`within` for their own rules): every comparison appends one
JSON line, its call site (file:line), the test, and ``ratio`` = the worst element's error divided
by what the tolerance allows there (1.0 = exactly at the tolerance; a failure is > 1). Nothing
changes without the variable. Then

    python -m tests.tolerances FILE [FILE ...]     # per call site: worst ratio in each file, worst first

shows which tolerances sit on the noise (ratio near 1 on some machine, thread count or
``ATEN_CPU_CAPABILITY``) rather than between the noise and the bug. tests/README.md runs it.
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback

LOG = os.environ.get("LVITA_TOLERANCE_LOG")


def _site() -> str:
    """The test file lines that made the comparison, outermost first ('test_x.py:69>30' when line 69
    called a helper at line 30 of the same file)."""
    lines, name = [], None
    for frame in traceback.extract_stack()[:-2]:
        base = os.path.basename(frame.filename)
        if base.startswith("test_"):
            name = name or base
            if base == name:
                lines.append(str(frame.lineno))
    return f"{name}:{'>'.join(lines)}" if name else "?"


def record(ratio: float, kind: str) -> None:
    if not LOG:
        return
    ratio = float(ratio)
    entry = {"site": _site(), "test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0],
             "ratio": ratio if math.isfinite(ratio) else 1e30, "kind": kind,
             "threads": os.environ.get("OMP_NUM_THREADS"), "cap": os.environ.get("ATEN_CPU_CAPABILITY")}
    with open(LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


def within(err: float, allowed: float, kind: str = "within") -> bool:
    """``err <= allowed``, recorded: the tests' own rules (e.g. error relative to a tensor's largest
    entry) use this so their margins show up beside assert_close's and approx's."""
    err, allowed = float(err), float(allowed)  # 0-d tensors too
    record(err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf), kind)
    return err <= allowed


def assert_near(got, ref, rtol: float, what: str = "") -> None:
    """Largest absolute error <= ``rtol`` x the largest entry of ``ref`` (a gradient's scale: an
    element near zero is allowed the rounding of the big ones it was summed with), recorded."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = (got.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    assert within(err, rtol * scale + 1e-12, "assert_near"), f"{what}: max abs error {err} vs largest entry {scale}"


def _tensor_ratio(actual, expected, rtol, atol) -> float:
    import torch

    a, e = torch.as_tensor(actual), torch.as_tensor(expected)
    if a.shape != e.shape or not a.numel() or not (a.is_floating_point() or e.is_floating_point()):
        return 0.0
    a, e = a.detach().double().cpu(), e.detach().double().cpu()
    if rtol is None or atol is None:  # torch's defaults by dtype
        from torch.testing._comparison import default_tolerances

        rtol, atol = default_tolerances(torch.as_tensor(actual), torch.as_tensor(expected))
    allowed = atol + rtol * e.abs()
    err = (a - e).abs()
    return float(torch.where(allowed > 0, err / allowed.clamp_min(1e-300), torch.where(err > 0, math.inf, 0.0)).max())


def _approx_ratio(actual, expected, rel, abs_) -> float:
    if isinstance(expected, dict):
        return max((_approx_ratio(actual.get(k, expected[k]), v, rel, abs_) for k, v in expected.items()), default=0.0)
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return 0.0
        return max((_approx_ratio(a, e, rel, abs_) for a, e in zip(actual, expected)), default=0.0)
    try:
        a, e = float(actual), float(expected)
    except (TypeError, ValueError):
        return 0.0
    if rel is None and abs_ is None:
        rel, abs_ = 1e-6, 1e-12
    allowed = max((rel or 0.0) * abs(e), abs_ if abs_ is not None else 1e-12)
    return abs(a - e) / allowed if allowed > 0 else (0.0 if a == e else math.inf)


def install() -> None:
    """Wrap torch.testing.assert_close and pytest.approx to record every comparison (conftest)."""
    import pytest
    import torch.testing

    close = torch.testing.assert_close

    def assert_close(actual, expected, *args, rtol=None, atol=None, **kw):
        try:
            record(_tensor_ratio(actual, expected, rtol, atol), "assert_close")
        except Exception:  # noqa: BLE001 - recording never changes a test's outcome
            pass
        return close(actual, expected, *args, rtol=rtol, atol=atol, **kw)

    approx = pytest.approx

    class Recorded:
        def __init__(self, expected, rel=None, abs=None, nan_ok=False):  # noqa: A002 - pytest's names
            self.expected, self.rel, self.abs = expected, rel, abs
            self.inner = approx(expected, rel=rel, abs=abs, nan_ok=nan_ok)

        def __eq__(self, actual):
            try:
                record(_approx_ratio(actual, self.expected, self.rel, self.abs), "approx")
            except Exception:  # noqa: BLE001
                pass
            return self.inner == actual

        __hash__ = None

        def __repr__(self):
            return repr(self.inner)

    torch.testing.assert_close = assert_close
    pytest.approx = Recorded


def report(paths: list[str]) -> None:
    worst: dict[str, dict[str, float]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                e = json.loads(line)
                cell = worst.setdefault(e["site"], {})
                cell[path] = max(cell.get(path, 0.0), e["ratio"])
    rows = sorted(worst.items(), key=lambda kv: -max(kv[1].values()))
    names = [os.path.basename(p) for p in paths]
    print(f"{'call site':40s} " + " ".join(f"{n[:18]:>18s}" for n in names))
    for site, cells in rows:
        print(f"{site:40s} " + " ".join(f"{cells[p]:18.3g}" if p in cells else f"{'-':>18s}" for p in paths))


if __name__ == "__main__":
    report(sys.argv[1:])
