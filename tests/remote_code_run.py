"""Load an exported Long-VITA directory as the official tools do, and print what it computes (JSON).

    python tests/remote_code_run.py EXPORT_DIR [--modules-cache DIR]

Runs in the suite's environment and, as a subprocess, in one with transformers 4.49 (the official
pin; ``tests/test_remote_code.py``). Imports torch, transformers and the fixture recipe only (never
lvita: the export must stand on its own). It loads the directory with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (float32, eager attention as the
fixtures were made, unless --attn), feeds token ids (no tokenizer load: a tokenizer saved by
transformers 5 does not load in 4.49) and prints: the class loaded, the logits at the recipe's
columns and the log-sum-exp of every position of ``multimodal_input`` (images passed as
``images`` / ``image_indices``, as the official inference script passes them), the same without the
pixels, and the greedy tokens of ``generate`` with and without the KV cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "longvita_official"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--modules-cache", help="HF_MODULES_CACHE (where transformers copies remote code)")
    ap.add_argument("--attn", default="eager")
    args = ap.parse_args()
    if args.modules_cache:
        os.environ["HF_MODULES_CACHE"] = args.modules_cache  # read when transformers is imported
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(FIXTURES))
    import model_recipe as recipe

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.export, trust_remote_code=True, torch_dtype=torch.float32,
                                                 attn_implementation=args.attn).eval()
    ids, positions, n_tiles = recipe.multimodal_input()
    index = torch.tensor(positions).view(n_tiles, recipe.TOKENS_PER_TILE)
    image_indices = torch.stack([torch.zeros_like(index), index])  # (2: batch row, position; tiles, tokens)
    stop = [2, 0]  # the fixture tokenizer's <|im_end|>, <|endoftext|>
    with torch.no_grad():
        logits = model(input_ids=ids, images=recipe.pixel_values(n_tiles), image_indices=image_indices,
                       use_cache=False).logits[0].float()
        blank = model(input_ids=ids, images=torch.zeros(n_tiles, 3, recipe.TILE, recipe.TILE),
                      image_indices=image_indices, use_cache=False).logits[0].float()
        prompt = torch.tensor([recipe.greedy_prompt_ids()])
        greedy = {}
        for cache in (True, False):
            out = model.generate(inputs=prompt, max_new_tokens=recipe.MAX_NEW_TOKENS, do_sample=False,
                                 use_cache=cache, eos_token_id=stop, pad_token_id=0)
            greedy[str(cache)] = out[0, prompt.shape[1]:].tolist()
        # generate with images (the official call), with and without the cache (images merged at the prefill only,
        # or at every step): the same tokens, the first one the argmax of the logits' last row
        mm = {str(cache): model.generate(inputs=ids, images=recipe.pixel_values(n_tiles), image_indices=image_indices,
                                         max_new_tokens=3, do_sample=False, use_cache=cache, eos_token_id=stop,
                                         pad_token_id=0)[0, ids.shape[1]:].tolist() for cache in (True, False)}
    print(json.dumps({
        "transformers": transformers.__version__, "class": type(model).__name__,
        "module": type(model).__module__, "config_class": type(model.config).__name__,
        "logits_at_ids": logits[:, recipe.LOGIT_IDS].tolist(), "logsumexp": torch.logsumexp(logits, -1).tolist(),
        "argmax": logits.argmax(-1).tolist(), "last_row": logits[-1].tolist(),
        "blank_max_diff": float((blank - logits).abs().max()),
        "greedy_cache": greedy["True"], "greedy_no_cache": greedy["False"],
        "mm_generate_cache": mm["True"], "mm_generate_no_cache": mm["False"]}))


if __name__ == "__main__":
    main()
