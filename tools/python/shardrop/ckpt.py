"""Checkpoints: sharded safetensors plus a signed manifest in the aggregator's store.

``push`` packs files (or a Hugging Face model folder) and uploads them with a signed
manifest; ``pull`` fetches and verifies one into a folder that ``safetensors.torch.load_file``
(and ``transformers.AutoModel.from_pretrained``) read; ``ls`` lists a run's checkpoints.
Each is the library code ``shardrop ckpt push|pull|ls`` runs. ``progress`` is called with
the number of bytes done since its last call (sum them for a progress bar).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Tuple, Union

from . import _shardrop

PathLike = Union[str, "os.PathLike[str]"]


def push(
    registry_url: str,
    key_path: PathLike,
    sources: Union[PathLike, Sequence[PathLike]],
    step: int,
    *,
    window: Optional[int] = None,
    shard_size: int = 2 << 30,
    concurrency: int = 4,
    progress: Optional[Callable[[int], Any]] = None,
    endpoint: Optional[str] = None,
    allow_http: Optional[bool] = None,
    any_model: bool = False,
) -> dict:
    """Pushes safetensors files, or one model folder, as checkpoint ``step``.

    ``key_path`` is the run's aggregator key (checkpoints go into its store); ``window``
    is the last window whose aggregate the parameters include (catch-up starts after it).
    The tensors must be the run's model (plus optional ``outer_momentum.*`` buffers), else
    ``Refused`` (``model_mismatch``) unless ``any_model``.
    Returns what ``shardrop ckpt push --json`` reports.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return _shardrop.ckpt_push(
        registry_url,
        os.fspath(key_path),
        [os.fspath(s) for s in sources],
        step,
        window,
        shard_size,
        concurrency,
        progress,
        endpoint,
        allow_http,
        any_model,
    )


def pull(
    what: str,
    out: PathLike,
    *,
    registry_url: Optional[str] = None,
    signer: Optional[str] = None,
    tensors: Sequence[str] = (),
    tp: Optional[Tuple[int, int]] = None,
    concurrency: int = 16,
    progress: Optional[Callable[[int], Any]] = None,
    endpoint: Optional[str] = None,
    allow_http: Optional[bool] = None,
    force: bool = False,
    without_momentum: bool = False,
) -> dict:
    """Pulls checkpoint ``what`` ("latest" or a manifest URL) into folder ``out``, verified.

    The signer is the run's aggregator (``registry_url``) or ``signer`` (a peer id).
    ``tensors``: only those matching these globs (ranged reads); ``tp=(rank, size)``: the
    tensor-parallel slice of each 2-D tensor. Resumable: run it again after an interruption.
    ``out`` must be empty, new or an earlier pull of the same run (whose files it replaces);
    a folder holding other files is refused unless ``force``, which moves them into
    ``out/.shardrop-displaced/`` first. The outer optimizer's momentum comes in files of its
    own (``momentum-*.safetensors``, which the HF index does not list, so ``from_pretrained``
    and ``load_state_dict`` see only the model); ``OptimizerState.load(out)`` reads it, and
    ``without_momentum=True`` leaves it out (a model to evaluate or fine-tune).
    Returns what ``shardrop ckpt pull --json`` reports.
    """
    return _shardrop.ckpt_pull(
        what,
        os.fspath(out),
        registry_url,
        signer,
        list(tensors),
        tp,
        concurrency,
        progress,
        endpoint,
        allow_http,
        force,
        without_momentum,
    )


def ls(
    registry_url: str,
    *,
    endpoint: Optional[str] = None,
    allow_http: Optional[bool] = None,
) -> list:
    """Lists the run's checkpoints (what ``shardrop ckpt ls --json`` reports)."""
    return _shardrop.ckpt_ls(registry_url, endpoint, allow_http)
