"""The examples' model: a small byte-level transformer LM over a public-domain text kept in
the repository (tools/data/shakespeare.txt), and its data batches."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

TEXT = Path(__file__).resolve().parents[2] / "data" / "shakespeare.txt"
CONTEXT = 64


class TinyLM(nn.Module):
    def __init__(self, width: int = 96, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 256)
        mask = torch.triu(torch.full((CONTEXT, CONTEXT), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(h)


def corpus() -> torch.Tensor:
    return torch.tensor(list(TEXT.read_bytes()), dtype=torch.long)


def batch(data: torch.Tensor, gen: torch.Generator, size: int = 16, split: str = "train"):
    cut = int(len(data) * 0.9)
    lo, hi = (0, cut) if split == "train" else (cut, len(data))
    i = torch.randint(lo, hi - CONTEXT - 1, (size,), generator=gen)
    x = torch.stack([data[j : j + CONTEXT] for j in i.tolist()])
    y = torch.stack([data[j + 1 : j + CONTEXT + 1] for j in i.tolist()])
    return x, y


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


@torch.no_grad()
def eval_loss(model: nn.Module, data: torch.Tensor, batches: int = 8) -> float:
    gen = torch.Generator().manual_seed(1234)
    return sum(loss(model, *batch(data, gen, 32, "val")).item() for _ in range(batches)) / batches


def params(model: nn.Module) -> dict:
    """The parameters as the run names them: f32 CPU tensors that apply_ updates in place."""
    return {n: p.data for n, p in model.named_parameters()}


def initial(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()
