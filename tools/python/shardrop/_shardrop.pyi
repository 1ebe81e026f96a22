"""Type stubs of the native module (the Rust extension); see the package docstring."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence, Tuple, Union

__version__: str

#: Any object with ``__dlpack__`` (a torch tensor, a numpy array, jax, cupy), on the CPU.
Tensor = Any
PathLike = Union[str, "os.PathLike[str]"]

class Error(Exception):
    """Every shardrop failure."""

    #: caller, not_found, rejected, refused, conflict, store or internal.
    kind: str
    #: The stable reason code (``bad_signature``, ``window_closed``, ...), or None.
    reason: Optional[str]
    #: The object (URL or path) the failure is about, or None.
    object: Optional[str]

class Rejected(Error):
    """An object was read, verified and refused; ``reason`` says why."""

class Refused(Error):
    """The call breaks a rule of the run (``window_closed``, ``model_mismatch``, ...)."""

class OptimizerState:
    """The outer optimizer's momentum buffers, kept between windows (empty for SGD)."""

    def __init__(self) -> None: ...
    @staticmethod
    def load(path: PathLike) -> OptimizerState:
        """Reads a state file (``shardrop apply --optimizer-state``'s), or the momentum of a
        folder ``shardrop.ckpt.pull`` wrote (the state after its checkpoint's window; no
        buffer when the checkpoint holds none)."""
    def save(self, path: PathLike) -> None:
        """Writes the state file atomically."""
    @property
    def run(self) -> Optional[str]: ...
    @property
    def after(self) -> Optional[int]:
        """The last window it accounts for."""
    @property
    def names(self) -> list[str]: ...

class Miner:
    """A miner of a run: publishes one shard per window from tensors in memory."""

    @property
    def peer(self) -> Optional[str]:
        """The miner's peer id (None for a rank opened without a key)."""
    @property
    def state_window(self) -> Optional[int]:
        """The last window the error-feedback state accounts for."""
    @property
    def state_dir(self) -> Optional[str]: ...
    def publish(
        self, update: Mapping[str, Tensor], window: Optional[int] = None, wait: bool = False
    ) -> dict[str, Any]:
        """Encodes, signs and puts ``update`` (name → f32/bf16/f16 CPU tensor, the whole
        model) for ``window`` (None: the one open now); ``wait`` waits for it to open.
        Returns what ``shardrop publish --json`` reports."""
    def encode_part(
        self, update: Mapping[str, Tensor], window: int, rows: Optional[Mapping[str, int]] = None
    ) -> bytes:
        """One rank of a sharded miner: encodes this rank's dimension-0 slices (``rows[name]``
        is each slice's first row in the whole tensor, see ``dim0_rows``; a tensor not in
        ``rows`` is whole) and returns the part to hand to the publishing rank. Slices must
        start (and end, unless at the tensor's end) on a multiple of the run's chunk, else
        ``Error`` with reason ``slice_misaligned``. Advances this rank's error-feedback
        buffers; the same window again returns the same part."""
    def publish_parts(
        self, parts: Sequence[bytes], window: Optional[int] = None, wait: bool = False
    ) -> dict[str, Any]:
        """The publishing rank: joins every rank's part (any order; reason
        ``parts_mismatch`` when they do not cover the model exactly once), signs and puts
        the one shard, byte-identical to ``publish`` of the whole update. Needs the key."""
    def save_state(self, dir: Optional[PathLike] = None) -> None: ...

class Run:
    """A run opened from its signed registry."""

    @staticmethod
    def open(
        registry_url: str,
        operator: Optional[str] = None,
        *,
        endpoint: Optional[str] = None,
        region: Optional[str] = None,
        access_key_id: Optional[str] = None,
        secret_access_key: Optional[str] = None,
        allow_http: Optional[bool] = None,
    ) -> Run:
        """Verifies the registry (signed by ``operator`` when given; pinned either way)."""
    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def operator(self) -> str: ...
    @property
    def revision(self) -> int: ...
    @property
    def window_secs(self) -> int: ...
    @property
    def grace_secs(self) -> int: ...
    @property
    def genesis_ms(self) -> int: ...
    @property
    def tensors(self) -> dict[str, Tuple[list[int], str]]:
        """Tensor name → (shape, dtype)."""
    def window_now(self) -> Optional[int]:
        """The window open now by this machine's clock (None before genesis)."""
    def setting_at(self, window: int) -> str: ...
    def lr_at(self, window: int) -> float: ...
    def refresh(self) -> int:
        """Reads the registry again; returns its revision."""
    def miner(
        self,
        key_path: Optional[PathLike] = None,
        state: Optional[PathLike] = None,
        device: str = "cpu",
    ) -> Miner:
        """A miner signing with ``key_path`` (a sharded miner's encoding-only ranks need no
        key); ``state`` persists its error-feedback buffers."""
    def validator(self, key_path: PathLike) -> Validator:
        """The run's validator signing with the key at ``key_path``."""
    def wait_aggregate(self, window: int, timeout: Optional[float] = None) -> bool:
        """True once the window's aggregate is there and verifies; False if not (yet)."""
    def apply_(
        self,
        params: Mapping[str, Tensor],
        window: int,
        optimizer_state: Optional[OptimizerState] = None,
        wait: Optional[float] = None,
    ) -> None:
        """Applies one window's aggregate to f32 CPU ``params`` in place."""
    def catch_up(
        self,
        params: Mapping[str, Tensor],
        from_window: Union[int, str],
        through: int,
        optimizer_state: Optional[OptimizerState] = None,
        wait: Optional[float] = None,
    ) -> int:
        """Replays every window after ``from_window`` ("genesis": from 0) through
        ``through`` in place; returns how many were applied."""

class Shard:
    """One registered miner of a judged window (``Validator.shards``)."""

    #: The miner's peer id.
    peer: str
    #: accepted, rejected, missing or error (its store could not be read).
    verdict: str
    #: The stable reason code ("" when accepted as is).
    reason: str
    #: A human detail naming the object.
    detail: str
    #: Accepted but judged a copy: scored 0 whatever its usefulness.
    copier: bool
    #: Accepted and not a copier: its usefulness counts.
    eligible: bool
    #: The step its update contributes to the aggregate: measure the loss at
    #: θ − scale · update.
    scale: float
    #: The decoded update (name → numpy f32 array) of an accepted shard, else None.
    update: Optional[dict[str, Any]]
    #: Why an accepted shard could not be read again, else None.
    error: Optional[str]

class Shards:
    """Every registered miner of a judged window, in peer-id order; iterating decodes one
    accepted miner's update at a time."""

    @property
    def window(self) -> int: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Shard]: ...
    def __next__(self) -> Shard: ...

class Validator:
    """A validator of a run, signing with its key."""

    @property
    def peer(self) -> str: ...
    def validate(
        self,
        window: int,
        evaluate: Optional[Callable[[str, dict[str, Any], float, int], Tuple[float, float]]] = None,
        prepare: Optional[Callable[[int], Any]] = None,
        name: str = "python",
        concurrency: int = 16,
        on_eval_error: Literal["refuse", "carry"] = "refuse",
    ) -> dict[str, Any]:
        """Scores ``window`` once it has closed and publishes the score table and signed
        weights (``shardrop validate``); ``evaluate(peer, update, scale, window) ->
        (loss_before, loss_after)`` measures each eligible miner on your own model,
        ``prepare(window)`` is called once first. If ``evaluate`` raises for an eligible
        miner, ``"refuse"`` publishes nothing and raises ``Refused`` (reason
        ``eval_failed``): fix it and call again; ``"carry"`` publishes with that miner's
        rating and weight carried over."""
    def shards(self, window: int, concurrency: int = 16) -> Shards:
        """Waits for ``window`` to close, checks every miner as the aggregator does and
        judges copies and agreement; iterate the result for verdicts and decoded updates."""
    def publish(
        self,
        window: int,
        usefulness: Optional[Mapping[str, Union[float, Tuple[float, float]]]] = None,
        name: str = "python",
        concurrency: int = 16,
        on_eval_error: Literal["refuse", "carry"] = "refuse",
    ) -> dict[str, Any]:
        """Scores the judged window with ``usefulness`` (peer → (loss_before, loss_after) or
        the usefulness itself) and publishes the table and weights, as ``shardrop
        validate`` would; None scores by agreement."""

def ckpt_push(
    registry_url: str,
    key_path: str,
    sources: Sequence[str],
    step: int,
    window: Optional[int] = None,
    shard_size: int = ...,
    concurrency: int = 4,
    progress_cb: Optional[Callable[[int], Any]] = None,
    endpoint: Optional[str] = None,
    allow_http: Optional[bool] = None,
    any_model: bool = False,
) -> dict[str, Any]: ...
def ckpt_pull(
    what: str,
    out: str,
    registry_url: Optional[str] = None,
    signer: Optional[str] = None,
    tensors: Sequence[str] = ...,
    tp: Optional[Tuple[int, int]] = None,
    concurrency: int = 16,
    progress_cb: Optional[Callable[[int], Any]] = None,
    endpoint: Optional[str] = None,
    allow_http: Optional[bool] = None,
    force: bool = False,
    without_momentum: bool = False,
) -> dict[str, Any]: ...
def ckpt_ls(
    registry_url: str, endpoint: Optional[str] = None, allow_http: Optional[bool] = None
) -> list[dict[str, Any]]: ...
