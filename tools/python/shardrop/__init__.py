"""shardrop: exchange signed, compressed gradients and checkpoints through object storage.

A thin Python face over the shardrop Rust library (the same code as the ``shardrop`` CLI):

- ``Run.open(url)`` verifies a run's registry;
- ``run.miner(key)`` publishes one shard per window from tensors in memory (a model
  sharded over ranks: ``encode_part`` on every rank, ``publish_parts`` on one);
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


def dim0_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a tensor with ``rows`` rows that rank ``rank`` of
    ``world`` holds when parameters are split on dimension 0 as FSDP2 / DTensor ``Shard(0)``
    split them (``torch.chunk``: ``ceil(rows / world)`` rows per rank, the last ranks with
    fewer or none). ``start`` is what ``Miner.encode_part`` takes in ``rows``."""
    if world < 1 or not 0 <= rank < world or rows < 0:
        raise ValueError(f"dim0_rows({rows}, {rank}, {world}): need rows >= 0 and 0 <= rank < world")
    per = -(-rows // world)
    return min(rank * per, rows), min((rank + 1) * per, rows)

__all__ = [
    "Error",
    "Miner",
    "OptimizerState",
    "Refused",
    "Rejected",
    "Run",
    "ckpt",
    "dim0_rows",
    "__version__",
]
