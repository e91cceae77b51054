"""Training metrics: TensorBoard, metrics.jsonl and one progress line per step, from rank 0.

Owns what a user watches. ``Monitor.log(step, metrics)`` writes every figure to
``<output_dir>/metrics.jsonl`` (one JSON object per optimizer step) and to TensorBoard under
``<output_dir>/tensorboard/`` with tags ``train/<key>`` (nested dicts become ``train/lr/llm``,
``data/skipped/<reason>``), then prints a short line. On other ranks every call is a no-op. A
resumed run continues both records from its checkpoint's step.

    tensorboard --logdir <output_dir>/tensorboard
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


def peak_memory_gb() -> float:
    """Peak GPU memory allocated on this device, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_reserved_gb() -> float | None:
    """Peak GPU memory the caching allocator held from CUDA (what the cap limits); None on CPU."""
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


def cap_memory(cap_gb: float | None, device: int = 0) -> str | None:
    """``train.memory_cap_gb``: limit this process to ``cap_gb`` GiB. On CUDA the caching allocator
    refuses to hold more (``torch.cuda.set_per_process_memory_fraction``; past it a step fails with
    torch.OutOfMemoryError as on a full GPU), so an 80 GB GPU can be measured on a larger one; on CPU
    :func:`check_memory_cap` compares the peak resident set after each step. Returns a line for the log."""
    if cap_gb is None:
        return None
    if not torch.cuda.is_available():
        return f"memory cap {cap_gb:g} GiB: on CPU the peak resident set is checked after each step"
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gb * 2**30 >= total:
        return f"memory cap {cap_gb:g} GiB is not below the GPU's {total / 2**30:.1f} GiB: no cap"
    torch.cuda.set_per_process_memory_fraction(cap_gb * 2**30 / total, device)
    return f"memory capped at {cap_gb:g} GiB of the GPU's {total / 2**30:.1f} GiB"


def check_memory_cap(cap_gb: float | None) -> None:
    """On CPU, raise torch.OutOfMemoryError once the peak resident set has passed ``cap_gb`` GiB (on
    CUDA the allocator enforces the cap itself)."""
    if cap_gb is not None and not torch.cuda.is_available() and peak_memory_gb() > cap_gb:
        raise torch.OutOfMemoryError(f"out of memory: the peak resident set {peak_memory_gb():.2f} GiB is above "
                                     f"the memory cap of {cap_gb:g} GiB")


def _step(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Monitor:
    def __init__(self, output_dir: str | Path, enabled: bool, total_steps: int, name: str = "",
                 resume_step: int = 0):
        """``resume_step``: the run continues after this step (0: a fresh start); what an earlier run
        logged for later steps is dropped from metrics.jsonl and TensorBoard (``purge_step``), so
        each step appears once."""
        self.enabled, self.total, self.name = enabled, total_steps, name
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)
        path = out / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True) if _step(line) <= resume_step]
            path.write_text("".join(kept))
        self.jsonl = open(path, "a")

    def _scalars(self, prefix: str, value, step: int) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                self._scalars(f"{prefix}/{k}", v, step)
        elif isinstance(value, (int, float)):
            self.writer.add_scalar(prefix, value, step)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if key == "skipped":
                self._scalars("data/skipped", value, step)
            else:
                self._scalars(f"train/{key}", value, step)
        lr = metrics.get("lr", {})
        lr_text = " ".join(f"{k}={v:.2e}" for k, v in lr.items())
        gn, mfu = metrics.get("grad_norm"), metrics.get("mfu")
        speed = f"{metrics['tokens_per_sec']:.0f} tok/s"
        if "tflops_per_gpu" in metrics:
            speed += f", {metrics['tflops_per_gpu']:.3g} TFLOPs/GPU" + (f" (MFU {mfu:.1%})" if mfu is not None else "")
        print(f"[{self.name}] step {step}/{self.total} | loss {metrics['loss']:.4f} | lr {lr_text} | "
              f"gnorm {gn if gn is None else f'{gn:.3f}'} | {speed} | "
              f"{metrics['step_time_s']:.2f}s (data {metrics['data_wait_s']:.2f}s) | "
              f"mem {metrics['peak_memory_gb']:.2f} GB"
              + (f" (reserved {metrics['peak_reserved_gb']:.2f})" if metrics.get("peak_reserved_gb") is not None else ""),
              file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
