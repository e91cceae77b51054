"""Entry point of evaluation: lvita's JSONL sets (:mod:`lvita.infer.eval`) or, with ``--benchmark NAME`` /
``--score-only``, a published benchmark scored as its leaderboard (:mod:`lvita.evaluation.command`).

    python -m lvita.eval --model DIR --data FILE.jsonl
    python -m lvita.eval --model DIR --benchmark MMStar --data LMUData/MMStar.tsv
    python -m lvita.eval --benchmark MMStar --score-only LMUData/MMStar-eval/predictions.jsonl
    deepspeed --num_gpus N --module lvita.eval --model DIR --data FILE.jsonl --sp N   # context-parallel
"""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from lvita.evaluation.command import wants_benchmark

    if wants_benchmark(argv):
        from lvita.evaluation.command import main as benchmark

        return benchmark(argv)
    from lvita.infer.eval import main as jsonl

    return jsonl(argv)


if __name__ == "__main__":
    sys.exit(main())
