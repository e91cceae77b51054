"""The GPU figures of issue 23 in one lease, most valuable first; run by benchmarks/gpu_suite.sh.

    bash benchmarks/gpu_suite.sh                 # on the GPU machine (installs wheels/ first)
    bash benchmarks/gpu_suite.sh --dry-run       # the same steps on CPU with the tiny preset (a test runs it)

Steps, each inside what is left of the deadline ($BUDGET_S, default 560 s, from the shell script's start):
  a. one lvita.train launch at 32K, activation checkpointing only, 3 steps: tokens/s, MFU, plan vs
     measured peak (allocated and reserved);
  b. the peer (plain transformers, same Qwen2 shapes) from 8K, doubling until out of memory;
  c. one lvita.train step at 512K with the first lever set the memory plan says fits the cap (else
     256K; a length whose estimated time does not fit what is left is not started);
  e. the ZeRO-3 engine at pipeline 1 (issue 31): one lvita.train step at the longest length of
     ``zero3_long`` whose plan fits the cap with the ZeRO-3 lever sets (optimizer, then parameter offload)
     and whose estimated time fits what is left: plan vs measured peak;
  d. the CUDA correctness tests by node id, then the lever smoke runs of tests/test_gpu.py.
Every trial is capped at $MEMORY_CAP_GB GiB (default 80: the goals are for 80 GB GPUs), writes no
checkpoint, runs in its own process group (benchmarks/trials.py) and its row goes to $OUT at once.
DeepSpeed's CPU-Adam JIT build starts in the background first (step c may need optimizer offload).

Out (under $OUT; the device tool returns at most 8 files): gpu.txt (machine, versions), steps.txt,
results.jsonl (one row per trial), summary.md (rewritten after each step), trial.log (the running
trial), trials.log (every finished trial's log tail), cpu_adam_build.log.

--dry-run: tiny preset, fp32, CPU, one step per trial, lengths 256 / 128-512 / 1024; the same code with
two failures forced: the peer's second length gets a 0.01 GiB cap (out of memory: ends its search) and
step c a 4 s timeout (killed whole, the suite goes on). To stay short on a loaded 2-core machine the
CPU-Adam build is a no-op there and step d's two pytest runs are one (every test skips without CUDA;
what it proves is that each node id still exists).
Trade-off: one process per trial (20-40 s of start-up each on a GPU) buys isolation: an OOM or a hang
cannot spoil the next figure.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import longest_context as lc  # noqa: E402
from benchmarks.trials import kill_group, run_trial, wait_gpu_free  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CUDA_TESTS = ["tests/test_varlen.py::test_each_available_kernel_equals_reference_on_cuda",
              "tests/test_gpu.py::test_varlen_attention_equals_per_sample_sdpa",
              "tests/test_ring_cuda.py::test_cuda_kernels_match_sdpa",
              "tests/test_ring_cuda.py::test_ring_through_yunchang_on_cuda_without_flash_attn",
              "tests/test_rank_decode.py::test_pixels_to_device_copies_uint8_tiles_ahead_to_cuda"]
LEVER_SMOKES = ["tests/test_gpu.py::test_one_training_step_per_lever"]
REAL = dict(preset="longvita-1.5b", precision="bf16", mfu_length=32768, peer_start=8192, peer_max=262144,
            long=[524288, 262144], trial_timeout=240, oom_peer_at=None, long_timeout=None,
            zero3_long=[1048576, 524288, 262144, 131072])
DRY = dict(preset="tiny", precision="fp32", mfu_length=256, peer_start=128, peer_max=512,
           long=[1024, 512], trial_timeout=120, oom_peer_at=256, long_timeout=4, zero3_long=[512, 256])
PLAN_MARGIN = 0.9  # step c takes a lever set whose plan is within 90% of the cap (the plan's goal: 15% of measured)
CPU_ADAM = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(); print('cpu_adam built')"


class Suite:
    def __init__(self, out: Path, budget_s: float, start: float, cap: float, dry: bool):
        self.out, self.deadline, self.dry = out, start + budget_s, dry
        self.p = argparse.Namespace(**(DRY if dry else REAL), memory_cap_gb=cap, steps=1 if dry else 3)
        self.rows: list = []
        self.record = lc.recorder(out / "results.jsonl", self.rows)
        self.longest: dict = {}
        self.t0 = start

    def left(self) -> float:
        return self.deadline - time.time()

    def step(self, name: str) -> None:
        with open(self.out / "steps.txt", "a") as f:
            f.write(f"== {name} (t={time.time() - self.t0:.0f}s, {self.left():.0f}s left)\n")
        print(f"== {name} ({self.left():.0f}s left)", flush=True)

    def keep_log(self, title: str) -> None:
        """Append the finished trial's log tail to trials.log (trial.log is the running one's)."""
        lines = (self.out / "trial.log").read_text(errors="replace").splitlines()[-150:]
        with open(self.out / "trials.log", "a") as f:
            f.write(f"\n===== {title}\n" + "\n".join(lines) + "\n")

    def trial(self, fn, title: str) -> dict:
        row = self.record({"step": title.split()[0], **fn(log=self.out / "trial.log")})
        self.keep_log(f"{title}: {row['status']}")
        return row

    def summary(self) -> None:
        text = ["# GPU suite" + (" (dry run: tiny preset on CPU)" if self.dry else ""), "",
                lc.table(self.longest, self.rows), "", "| step | who | length | status | tokens/s | MFU | peak GiB "
                "(allocated / reserved) | plan GiB | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        for r in self.rows:
            text.append(f"| {r['step']} | {r['who']} | {r.get('length', '-')} | {r['status']} | "
                        f"{fmt(r.get('tokens_per_sec'), ',.0f')} | {fmt(r.get('mfu'), '.1%')} | "
                        f"{fmt(r.get('peak_memory_gb'), '.2f')} / {fmt(r.get('peak_reserved_gb'), '.2f')} | "
                        f"{fmt(r.get('plan_gb'), '.2f')} | {r.get('wall_s')} |")
        (self.out / "summary.md").write_text("\n".join(text) + "\n")


def _estimate_s(p, length: int, tflops: float | None) -> float:
    """Seconds for one lvita.train step at ``length`` tokens, start-up (45 s) included: the step's model
    FLOPs at the TFLOP/s step a measured (400 when it measured none; a rough guide, attention's share
    grows with length)."""
    from lvita.model.flops import Shapes, causal_pairs, sequence_flops

    flops = sum(sequence_flops(Shapes.of(p.preset), ["projector", "llm"], length, causal_pairs([length]), 0,
                               length).values())
    return 45 + flops / ((tflops or 400) * 1e12)


def long_choice(p, root: Path, seconds: float, tflops: float | None, lengths=None,
                lever_sets=None) -> tuple[int, str] | None:
    """Step c's (length, lever set): the first length of ``lengths`` (``p.long``) whose estimated time fits
    ``seconds`` (not checked when ``tflops`` is None), with the first lever set of ``lever_sets``
    (``lc.LEVERS``) whose memory plan is within ``PLAN_MARGIN`` of the cap."""
    for length in lengths or p.long:
        if tflops and _estimate_s(p, length, tflops) > seconds:
            continue
        for lever, levers in (lever_sets or lc.LEVERS).items():
            path = root / "plan.json"
            path.write_text(json.dumps(lc.stage(p, root, length, levers)))
            if p.memory_cap_gb is None or lc.plan_gb(path) <= PLAN_MARGIN * p.memory_cap_gb:
                return length, lever
    return None


def run(s: Suite, root: Path) -> None:
    p = s.p
    threading.Thread(target=_warm_imports, daemon=True).start()  # the plan's imports, while step a's trial starts
    busy = wait_gpu_free(60)  # a trial of an earlier, killed run may still hold it
    if busy:
        s.step(f"warning: the GPU still holds {busy} after a minute; the figures may suffer")
    s.step("cpu-adam build (background)")
    build_cmd = [sys.executable, "-c", "pass" if s.dry else CPU_ADAM]
    build = subprocess.Popen(build_cmd, cwd=REPO, stdout=open(s.out / "cpu_adam_build.log", "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        s.step(f"a. lvita.train {p.mfu_length} tokens, checkpointing, {p.steps} step(s)")
        a = s.trial(lambda log: lc.lvita_trial(p, root, p.mfu_length, "ckpt", log, min(p.trial_timeout, s.left())),
                    f"a lvita ckpt {p.mfu_length}")
        s.summary()

        reserve = 90  # for step d
        tflops = None if s.dry else (a.get("tflops_per_gpu") or 400)  # dry run: no time estimates
        need_c = _estimate_s(p, p.long[0], tflops) if tflops else 0
        s.step(f"b. transformers peer from {p.peer_start}, doubling until out of memory "
               f"(stops {need_c + reserve:.0f}s before the deadline, for steps c and d)")
        peer = argparse.Namespace(**vars(p))
        peer.steps = 1 if s.dry else 2

        def window() -> float:  # what steps c and d leave to the peer
            return s.left() - reserve - need_c

        def peer_trial(n):
            peer.memory_cap_gb = 0.01 if n == p.oom_peer_at else p.memory_cap_gb  # dry run: a forced OOM
            return s.trial(lambda log: lc.peer_trial(peer, n, log, min(p.trial_timeout, window())), f"b peer {n}")
        s.longest["transformers"] = lc.search(peer_trial, p.peer_start, p.peer_max, 0, lambda r: r,
                                              lambda: window() - 30)  # no trial starts with under 30 s
        s.summary()

        s.step("c. lvita.train at the longest length the plan and the time left allow")
        choice = long_choice(p, root, s.left() - reserve, tflops)
        if choice is None:
            s.record({"step": "c", "who": "lvita", "status": "skipped", "ok": False,
                      "error": f"no length of {p.long} fits the cap by the plan and the {s.left() - reserve:.0f}s left"})
        else:
            length, lever = choice
            if lever == "optim" and build.poll() is None:
                s.step("c. waiting for the CPU-Adam build")
                try:
                    build.wait(timeout=max(s.left() - reserve - _estimate_s(p, length, tflops), 1))
                except subprocess.TimeoutExpired:
                    pass
            one = argparse.Namespace(**{**vars(p), "steps": 1})
            timeout = p.long_timeout or max(s.left() - 20, 1)  # worth more than step d: it may use d's reserve
            row = s.trial(lambda log: lc.lvita_trial(one, root, length, lever, log, timeout), f"c lvita {lever} {length}")
            s.longest[f"lvita {lever}"] = (length if row["ok"] else None, f"one trial at {length}: {row['status']}")
        s.summary()

        s.step("e. ZeRO-3 at pipeline 1: the longest length the plan and the time left allow")
        choice = long_choice(p, root, s.left() - reserve, tflops, p.zero3_long, lc.ZERO3_LEVERS)
        if choice is None:
            s.record({"step": "e", "who": "lvita zero3", "status": "skipped", "ok": False,
                      "error": f"no length of {p.zero3_long} fits the cap by the plan and the {s.left() - reserve:.0f}s "
                               f"left"})
        else:
            length, lever = choice
            one = argparse.Namespace(**{**vars(p), "steps": 1})
            timeout = max(min(s.left() - reserve, p.trial_timeout if s.dry else s.left()), 1)
            row = s.trial(lambda log: lc.lvita_trial(one, root, length, lever, log, timeout), f"e lvita {lever} {length}")
            s.longest[f"lvita {lever}"] = (length if row["ok"] else None, f"one trial at {length}: {row['status']}")
        s.summary()

        s.step("d. CUDA correctness tests by node id, then the lever smoke runs")
        groups = [("cuda tests", CUDA_TESTS), ("lever smokes", LEVER_SMOKES)]
        for name, ids in [("cuda tests + lever smokes", CUDA_TESTS + LEVER_SMOKES)] if s.dry else groups:
            if s.left() < 30:
                s.record({"step": "d", "who": name, "status": "skipped", "ok": False, "error": "no time left"})
                continue
            cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-s", "-p", "no:cacheprovider", "-p", "no:benchmark",
                   "-p", "no:xdist", *ids]
            row = s.trial(lambda log: _pytest_row(name, cmd, log, s.left() - 10), f"d {name}")
            print(row.get("summary", ""), flush=True)
        s.summary()
    finally:
        kill_group(build.pid)  # a build still running when the suite ends goes with it
        s.step("done")


def _warm_imports() -> None:
    import lvita.config.check  # noqa: F401
    import lvita.config.memory_plan  # noqa: F401


def _pytest_row(name: str, cmd: list, log: Path, timeout: float) -> dict:
    t = run_trial(cmd, timeout, log, env={**os.environ, "PYTHONPATH": str(REPO)})
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
    return {"who": name, "status": t.status, "ok": t.status == "ok", "wall_s": t.wall_s,
            "summary": tail[0] if tail else "", **({"error": t.error[-600:]} if t.status != "ok" else {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny preset on CPU, failures forced (see above)")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT") or "gpu_results")
    out.mkdir(parents=True, exist_ok=True)
    start = float(os.environ.get("SUITE_START") or time.time())
    cap = os.environ.get("MEMORY_CAP_GB", "80")
    suite = Suite(out, float(os.environ.get("BUDGET_S", "560")), start, None if cap == "none" else float(cap),
                  args.dry_run)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # `finally`s kill the running trial and the build
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from lvita.data.tokenizer import train_demo_tokenizer

        train_demo_tokenizer(root / "tokenizer")
        run(suite, root)
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
