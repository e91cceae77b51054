"""Entry point of a training run; the run itself is :mod:`lvita.training.loop`.

    deepspeed [--hostfile hostfiles/FILE] --module lvita.train --stage stages/.../STAGE.json [--set KEY=VALUE]...
    python -m lvita.train --stage FILE                 # one process
"""
import sys

from lvita.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
