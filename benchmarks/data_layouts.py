"""Reading datasets as published: JSON-array indexing, planning speed per layout, ``lvita data check``.

    python benchmarks/data_layouts.py [--records 500000] [--out /tmp/lvita-bench] [--check-records 50000]

1. Writes a JSON array of ``--records`` LLaVA-665K-style records (``id``, ``image`` under
   ``coco/train2017/``, 1-3 human/gpt rounds of a few sentences; 100 real JPEGs referenced in turn),
   then indexes it in a fresh process: wall time and peak RSS growth (VmHWM after - VmRSS before),
   and the time to open it again from the cached index.
2. Planning samples/s per layout (template, placeholders, media headers, tiling; no pixels): the
   500K array, and each layout of ``tests/layouts.py`` (small files, cycled).
3. ``lvita data check`` records/s on the first ``--check-records`` records of the array (a JSON-array
   source of that size), headers only, with 1 and 2 workers.

Tokenizer: lvita's demo BPE (Qwen2.5's is not on this machine); tiny preset (112 px tiles).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the image shows a red bus parked beside a tall building while people walk along the street under "
         "a cloudy sky and several cars wait at the crossing").split()


def write_array(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(n):
            turns = [{"from": "human", "value": "<image>\n" + say(12) + "?"}, {"from": "gpt", "value": say(40) + "."}]
            for _ in range(rng.randrange(3)):
                turns += [{"from": "human", "value": say(10) + "?"}, {"from": "gpt", "value": say(30) + "."}]
            rec = {"id": f"{i:09d}", "image": f"coco/train2017/{i % 100:012d}.jpg", "conversations": turns}
            f.write(("," if i else "") + json.dumps(rec) + "\n")
        f.write("]\n")


INDEX_PROBE = r"""
import sys, time, re
def kb(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
from lvita.data.jsonarray import JsonArray
before = kb("VmRSS")
t0 = time.perf_counter(); a = JsonArray(sys.argv[1]); t1 = time.perf_counter()
print(len(a), t1 - t0, (kb("VmHWM") - before) / 1024)
"""


def index_run(path: Path) -> tuple[int, float, float]:
    out = subprocess.run([sys.executable, "-c", INDEX_PROBE, str(path)], capture_output=True, text=True, check=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def plan_rate(cfg, tok, specials, n: int) -> float:
    from lvita.data.plan import Planner
    from lvita.data.sources import Mixture

    mix, planner = Mixture(cfg, 0), Planner(cfg, tok, specials, 112, 16)
    t0, done = time.perf_counter(), 0
    while done < n:
        try:
            planner.plan(mix.next())
        except Exception:  # noqa: BLE001 - faults in the layout fixtures are part of the mix
            pass
        done += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--check-records", type=int, default=50_000)
    ap.add_argument("--out", default="/tmp/lvita-bench")
    args = ap.parse_args()
    from PIL import Image

    from lvita.config.schema import DataConfig, SourceConfig
    from lvita.data.jsonarray import index_path
    from lvita.data.tokenizer import load_tokenizer, special_token_ids, train_demo_tokenizer
    from tests.layouts import write_layouts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    imgs = out / "images" / "coco" / "train2017"
    imgs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    for i in range(100):
        Image.new("RGB", (rng.randrange(300, 1000), rng.randrange(300, 1000)), "gray").save(imgs / f"{i:012d}.jpg")
    arr = out / f"llava_{args.records}.json"
    if not arr.exists():  # the same seed writes the same file: reused by later runs
        t0 = time.perf_counter()
        write_array(arr, args.records)
        print(f"wrote {args.records} records in {time.perf_counter() - t0:.1f} s")
    print(f"{arr.name}: {args.records} records, {arr.stat().st_size / 2**20:.0f} MiB")
    index_path(arr).unlink(missing_ok=True)
    n, build_s, build_mb = index_run(arr)
    _, load_s, load_mb = index_run(arr)
    print(f"index: {n} records in {build_s:.2f} s ({arr.stat().st_size / 2**20 / build_s:.0f} MiB/s), peak RSS growth "
          f"{build_mb:.0f} MiB; reopening from the cached index: {load_s * 1000:.1f} ms, {load_mb:.0f} MiB")

    tok_dir = out / "tok"
    if not (tok_dir / "tokenizer.json").exists():
        train_demo_tokenizer(tok_dir)
    tok = load_tokenizer(str(tok_dir))
    sp = special_token_ids(tok)
    big = DataConfig(root=str(out), seq_length=4096, max_tiles=12, sources=[
        SourceConfig("llava-array", [arr.name], media_root="images")])
    print(f"\nplanning samples/s (no pixels), {'layout':<28}")
    print(f"  {'LLaVA JSON array':<28}{plan_rate(big, tok, sp, 3000):>8.0f}")
    lay = out / "layouts"
    shutil.rmtree(lay, ignore_errors=True)
    sources, _ = write_layouts(lay)
    for s in sources:
        cfg = DataConfig(root=str(lay), seq_length=4096, max_frames=4, sources=[SourceConfig(**s)])
        print(f"  {s['name']:<28}{plan_rate(cfg, tok, sp, 600):>8.0f}")

    sub = out / f"llava_{args.check_records}.json"
    if not sub.exists():
        write_array(sub, args.check_records)
    stage = out / "check_stage.json"
    stage.write_text(json.dumps({"model": {"preset": "tiny", "tokenizer": str(tok_dir)}, "data": {
        "root": str(out), "seq_length": 4096, "sources": [{"name": "llava", "paths": [sub.name],
                                                           "media_root": "images"}]}}))
    print(f"\nlvita data check, {args.check_records} LLaVA records (JSON array), headers only")
    for workers in (1, 2):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "lvita.cli", "data", "check", "--stage", str(stage), "--workers",
                            str(workers), "--json"], capture_output=True, text=True, cwd=REPO,
                           env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        dt = time.perf_counter() - t0
        got = json.loads(r.stdout)
        inner = got["seconds"]
        print(f"  {workers} worker(s): {args.check_records / inner:.0f} records/s in the scan ({inner:.1f} s; "
              f"{dt:.1f} s with start-up), {got['sources'][0]['usable']} usable")


if __name__ == "__main__":
    main()
