"""Entry point of greedy generation; the decoder is :mod:`lvita.infer.generate`.

    python -m lvita.generate --model DIR --prompt TEXT [--image PATH]...
    deepspeed --num_gpus N --module lvita.generate --model DIR ... --sp N [--ring R]   # context-parallel
"""
import sys

from lvita.infer.generate import main

if __name__ == "__main__":
    sys.exit(main())
