"""Entry point of evaluation (``python -m lvita.eval`` / ``deepspeed --module lvita.eval`` / ``lvita eval``):
every catalog entry, rescoring and prompt inspection go through :mod:`lvita.evaluation.command`.

    python -m lvita.eval --model DIR --data FILE.jsonl                          # lvita's JSONL set
    python -m lvita.eval --model DIR --benchmark MMStar --data LMUData/MMStar.tsv
    python -m lvita.eval --benchmark MMStar --score-only LMUData/MMStar-eval/predictions.jsonl
    deepspeed --num_gpus N --module lvita.eval --model DIR --data FILE.jsonl --sp N   # context-parallel
"""
import sys


def main(argv=None) -> int:
    from lvita.evaluation.command import main as evaluate

    return evaluate(argv)


if __name__ == "__main__":
    sys.exit(main())
