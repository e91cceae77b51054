"""Shared fixtures: a demo tokenizer and a small JSONL dataset made on the fly (no downloads).

The suite runs in two pytest-xdist workers, one test file per worker at a time (README: ``-n 2
--dist loadfile``, so module fixtures are made once). Each worker then gets one torch CPU thread,
and the processes it starts inherit OMP_NUM_THREADS=1: two workers each starting a pool of all
the cores would oversubscribe them (OpenMP steps up to 10x slower). LVITA_TEST_THREADS=N sets N
instead (tests/README.md: checking that tolerances hold on other machines).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get("LVITA_TEST_THREADS"):
    import torch

    from tests.distributed import THREADS

    os.environ["OMP_NUM_THREADS"] = THREADS
    torch.set_num_threads(int(THREADS))
if os.environ.get("LVITA_TOLERANCE_LOG"):  # margins of every float comparison (tests/tolerances.py)
    from tests.tolerances import install

    install()
COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from lvita.data.tokenizer import train_demo_tokenizer

    return train_demo_tokenizer(tmp_path_factory.mktemp("tok"))


def write_dataset(root: Path, n_captions: int = 24, n_text: int = 24, seed: int = 0) -> Path:
    """captions.jsonl (one image each) and text.jsonl under ``root``."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(n_captions):
            c = rng.choice(COLOURS)
            img = Image.new("RGB", (rng.randrange(60, 140), rng.randrange(60, 140)), "white")
            ImageDraw.Draw(img).ellipse([10, 10, 50, 50], fill=c)
            img.save(root / "images" / f"{i}.png")
            f.write(json.dumps({"id": f"cap-{i}", "images": [f"images/{i}.png"], "messages": [
                {"role": "user", "content": "<image>\nDescribe the image."},
                {"role": "assistant", "content": f"A {c} circle on a white background."}]}) + "\n")
    with open(root / "text.jsonl", "w") as f:
        for i in range(n_text):
            a, b = rng.randrange(50), rng.randrange(50)
            f.write(json.dumps({"id": f"txt-{i}", "messages": [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}) + "\n")
    return root


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


def stage_dict(tokenizer_dir: Path, data_dir: Path, out: Path, **train) -> dict:
    """A small fp32 stage over ``dataset_dir`` for tests."""
    return {
        "name": "test", "output_dir": str(out), "seed": 3, "precision": "fp32",
        "deepspeed": str(REPO / "ds_configs" / "pipeline_fp32_cpu.json"),
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir), "trainable": ["vision", "projector", "llm"],
                  "allow_random_frozen": True},  # tests freeze modules of tiny random models on purpose
        "train": {"iterations": 3, "global_batch": 4, "micro_batch": 1, "warmup_steps": 1,
                  "lr": {"vision": 1e-4, "projector": 1e-3, "llm": 1e-3}, **train},
        "data": {"root": str(data_dir), "seq_length": 192,
                 "sources": [{"name": "captions", "paths": ["captions.jsonl"]},
                             {"name": "text", "paths": ["text.jsonl"]}]},
    }


def write_stage(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path
