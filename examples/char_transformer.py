"""Train a tiny character-level transformer (causal self-attention with SDPA, LayerNorm, dropout,
AdamW, gradient clipping) — ordinary PyTorch code written for a GPU.

    gpupool run --server HOST:PORT --token T -- python examples/char_transformer.py

DEVICE=cpu forces the CPU. Deterministic: data batches come from a CPU generator, the model is
initialised on the CPU, and the device generator (dropout) is reseeded before training.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

STEPS = int(os.environ.get("STEPS", "60"))
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us. "
) * 8


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, block: int, d: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block, d)
        self.blocks = nn.Sequential(*[Block(d, heads, 0.1) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def main() -> None:
    device = torch.device(os.environ.get("DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT], dtype=torch.long)
    block, batch = 32, 16
    torch.manual_seed(0)
    model = CharGPT(len(chars), block).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    data = data.to(device)
    g = torch.Generator().manual_seed(3)
    t0 = time.perf_counter()
    for step in range(STEPS):
        starts = torch.randint(0, len(TEXT) - block - 1, (batch,), generator=g)
        offs = (starts[:, None] + torch.arange(block + 1)).to(device)
        chunk = data[offs]
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.6f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    print(f"device: {next(model.parameters()).device}")
    print(f"final loss: {loss.item():.10e}")
    print(f"checksum: {checksum:.10e}")
    print(f"time: {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
