"""benchmarks/gpu_suite.sh before a GPU lease: the dry run (tiny preset on CPU, about 50 s on a loaded
2-core machine) goes through every step of the real run and its failure handling, and the real run
stops with one line when the wheels are missing.

What the dry run must show (each assertion below fails if that plumbing breaks):
- step a's lvita.train launch gives tokens/s, the measured peak and the plan in results.jsonl;
- step b's peer search runs a success, then the forced out-of-memory at the second length, and stops
  there (it would go on to 512 if OOM were not told apart), reported as "out of memory at 256";
- step c's forced 4 s timeout is recorded as a timeout, not as a memory limit, and the suite goes on;
- step d's pytest node ids all exist (a renamed CUDA test makes pytest exit 4: status "error");
- every output file is in $OUT, steps ran in order, and no process or file of a trial outlives the suite.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from tests.conftest import REPO

OUT_FILES = {"gpu.txt", "steps.txt", "results.jsonl", "summary.md", "trial.log", "trials.log", "cpu_adam_build.log"}


def _suite(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path / "tmp"), "OMP_NUM_THREADS": "1",
           "BUDGET_S": "600", **env}
    env.pop("PYTHONPATH", None)  # the script puts the repository on it itself
    return subprocess.run(["bash", "benchmarks/gpu_suite.sh", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)


def _alive_with(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(cmdline.parent.name)
        except OSError:
            pass
    return found


def test_dry_run_goes_through_every_step_and_failure(tmp_path):
    proc = _suite(tmp_path, "--dry-run")
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert OUT_FILES <= {p.name for p in out.iterdir()} and len(list(out.iterdir())) <= 8  # the device returns 8
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_step = {s: [r for r in rows if r["step"] == s] for s in "abcde"}

    (a,) = by_step["a"]
    assert a["status"] == "ok" and a["tokens_per_sec"] > 0 and a["peak_memory_gb"] > 0 and a["plan_gb"] > 0
    assert "peak_reserved_gb" in a and "mfu" in a
    assert [(r["length"], r["status"]) for r in by_step["b"]] == [(128, "ok"), (256, "oom")]
    assert by_step["b"][0]["tokens_per_sec"] > 0
    (c,) = by_step["c"]
    assert (c["length"], c["status"]) == (1024, "timeout") and c["wall_s"] < 30
    (e,) = by_step["e"]  # the ZeRO-3 engine at pipeline 1, parameter and optimizer offload, plan beside the peak
    assert (e["who"], e["length"], e["status"]) == ("lvita z3-optim", 512, "ok"), e
    assert e["peak_memory_gb"] > 0 and e["plan_gb"] > 0
    (d,) = by_step["d"]
    assert d["status"] == "ok" and re.fullmatch(r"\d+ skipped in [\d.]+s", d["summary"]), d  # all skip on CPU

    summary = (out / "summary.md").read_text()
    assert "| transformers | 128 | out of memory at 256 |" in summary
    assert "| lvita ckpt | none | one trial at 1024: timeout |" in summary
    steps = [line.split()[1] for line in (out / "steps.txt").read_text().splitlines()]
    assert steps == ["cpu-adam", "a.", "b.", "c.", "e.", "d.", "done"]
    assert "===== c lvita ckpt 1024: timeout" in (out / "trials.log").read_text()
    assert "python" in (out / "gpu.txt").read_text()
    # nothing a trial wrote or started outlives the suite (the trials' stage files, data and output lived
    # there; torch's compile cache folder, which importing DeepSpeed makes, is not a trial's)
    left = [p.name for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor_")]
    assert left == [] and _alive_with(str(tmp_path / "tmp")) == []


def test_missing_wheels_stop_the_real_run_with_one_line(tmp_path):
    proc = _suite(tmp_path, WHEELS=str(tmp_path / "no-wheels"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"gpu_suite: no wheels in {tmp_path / 'no-wheels'}/: run 'bash benchmarks/"
                                        f"gpu_wheels.sh' where PyPI is reachable and carry {tmp_path / 'no-wheels'}/ "
                                        f"(or SKIP_INSTALL=1 where deepspeed and yunchang are installed)"]
