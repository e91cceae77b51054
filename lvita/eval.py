"""Entry point of evaluation on a JSONL set; the evaluator is :mod:`lvita.infer.eval`.

    python -m lvita.eval --model DIR --data FILE.jsonl
    deepspeed --num_gpus N --module lvita.eval --model DIR --data FILE.jsonl --sp N   # context-parallel
"""
import sys

from lvita.infer.eval import main

if __name__ == "__main__":
    sys.exit(main())
