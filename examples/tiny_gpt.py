"""A small GPT written in plain PyTorch, and two offline text tasks for the examples.

The model uses nn.Linear and F.scaled_dot_product_attention, so both lora_fx front ends can trace it.
Data needs no download: the pretraining corpus is the English help text that ships with CPython (pydoc_data),
and the downstream task is a data-to-text task in the style of E2E NLG, generated from templates.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = [chr(i) for i in range(32, 127)] + ["\n"]  # printable ASCII; anything else maps to "?"
STOI = {c: i for i, c in enumerate(VOCAB)}


def encode(text: str) -> torch.Tensor:
    return torch.tensor([STOI.get(c, STOI["?"]) for c in text], dtype=torch.long)


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)),
                                           is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = len(VOCAB), d: int = 128, layers: int = 4, heads: int = 4, ctx: int = 128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(pos)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------------- data
def pydoc_corpus() -> str:
    """CPython's own help text (pydoc_data.topics): about 1 MB of English on any machine with Python."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def random_windows(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + length] for s in starts.tolist()])


NAMES = ["Aromi", "Bibimbap House", "Blue Spice", "Clowns", "Cotto", "Fitzbillies", "Giraffe", "Loch Fyne",
         "Strada", "The Eagle", "The Mill", "Wildwood", "Zizzi", "Alimentum", "Cocum", "The Punter"]
FOODS = ["Chinese", "English", "French", "Indian", "Italian", "Japanese", "fast food"]
AREAS = ["city centre", "riverside"]
PRICES = ["cheap", "moderate", "high"]


def e2e_example(name: str, food: str, area: str, price: str) -> str:
    """One meaning representation and its reference sentence, E2E NLG style."""
    mr = f"name[{name}], food[{food}], area[{area}], price[{price}]"
    text = f"{name} is a {price} {food} restaurant in the {area}."
    return f"{mr} => {text}\n"


def e2e_split(seed: int = 0) -> tuple[list[str], list[str]]:
    """Train/test split with held-out (name, food) combinations, so the test needs generalisation."""
    rng = random.Random(seed)
    combos = [(n, f) for n in NAMES for f in FOODS]
    rng.shuffle(combos)
    held_out = set(combos[: len(combos) // 5])
    train, test = [], []
    for n, f in combos:
        for a in AREAS:
            for p in PRICES:
                (test if (n, f) in held_out else train).append(e2e_example(n, f, a, p))
    return train, test


def e2e_batch(examples: list[str], batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Concatenate random examples into fixed-length windows of character ids."""
    idx = torch.randint(0, len(examples), (batch * 4,), generator=gen).tolist()
    rows, text = [], ""
    for i in idx:
        text += examples[i]
    data = encode(text)
    per = max(1, (len(data) - length - 1) // batch)
    return torch.stack([data[i * per:i * per + length] for i in range(batch)])
