"""What the fork server of tests/distributed.py imports once, before it forks a test's processes:
the modules every distributed test pays for (torch, DeepSpeed with the optimizer checks it makes at
initialize, transformers' model classes, lvita's training loop and parallel layers)."""
import deepspeed  # noqa: F401
import torch  # noqa: F401

import lvita.ckpt.checkpoint  # noqa: F401
import lvita.infer.generate  # noqa: F401
import lvita.parallel.hybrid  # noqa: F401
import lvita.parallel.pipeline  # noqa: F401
import lvita.parallel.ulysses  # noqa: F401
import lvita.training.loop  # noqa: F401

try:  # deepspeed.initialize imports it to check the optimizer (and with it torch's compiler)
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
except ImportError:
    pass
