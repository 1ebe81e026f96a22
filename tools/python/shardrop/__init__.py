"""shardrop: exchange signed, compressed gradients and checkpoints through object storage.

A thin Python face over the shardrop Rust library (the same code as the ``shardrop`` CLI):

- ``Run.open(url)`` verifies a run's registry;
- ``run.miner(key)`` publishes one shard per window from tensors in memory;
- ``run.apply_(params, window)`` and ``run.catch_up(...)`` update parameters in place;
- ``shardrop.ckpt`` pushes and pulls checkpoints.

Tensors are any objects with ``__dlpack__`` (torch, numpy >= 1.22, jax, cupy), read in
place on the CPU. Every failure raises ``shardrop.Error``; a verified-and-refused object
raises ``shardrop.Rejected`` and a call that breaks a rule of the run ``shardrop.Refused``,
both with ``.reason`` (the stable reason code) and ``.object``. Library events go to the
``logging`` logger named ``shardrop``.
"""

from ._shardrop import (
    Error,
    Miner,
    OptimizerState,
    Refused,
    Rejected,
    Run,
    __version__,
)
from . import ckpt

__all__ = [
    "Error",
    "Miner",
    "OptimizerState",
    "Refused",
    "Rejected",
    "Run",
    "ckpt",
    "__version__",
]
