"""Small LightningModules and data shared by the pipeline tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["Block", "LitLM", "TiedLM", "TokenData", "TokensOnly", "LabelledIds", "make_loader", "trainer_kwargs"]

VOCAB, DIM = 32, 16


class Block(nn.Module):
    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class LitLM(L.LightningModule):
    """The issue's example model: embedding, blocks, norm, head in one nn.Sequential."""

    def __init__(self, num_blocks: int = 4, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum
        self.layers = nn.Sequential(
            nn.Embedding(VOCAB, DIM), *[Block() for _ in range(num_blocks)], nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)
        )
        self.step_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.layers(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss)
        self.step_losses.append(loss.detach().item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.layers(x).flatten(0, 1), y.flatten())
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class TiedLM(LitLM):
    """LitLM whose output head is its token embedding (``tie_word_embeddings``): first and last stage share it."""

    def __init__(self, num_blocks: int = 4, **kwargs) -> None:
        super().__init__(num_blocks, **kwargs)
        self.layers[-1].bias = None
        self.layers[-1].weight = self.layers[0].weight


class TokenData(Dataset):
    """Deterministic next-token data; ``seq_lens`` cycles per item to vary sequence length."""

    def __init__(self, num_items: int = 24, seq_len: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (num_items, seq_len + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i, :-1], self.tokens[i, 1:]


class TokensOnly(Dataset):
    """Inputs without labels (what predict reads): each item is a plain tensor."""

    def __init__(self, num_items: int) -> None:
        self.data = TokenData(num_items)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i][0]


class LabelledIds(Dataset):
    """``{"input_ids", "labels"}`` rows of random token ids, as a Hugging Face causal LM takes them."""

    def __init__(self, vocab: int, seq_len: int, num_items: int = 20, seed: int = 0) -> None:
        self.ids = torch.randint(0, vocab, (num_items, seq_len), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def varying_length_collate(items):
    """Cuts each batch to a length that depends on its content: sequence length changes per batch."""
    x = torch.stack([a for a, _ in items])
    y = torch.stack([b for _, b in items])
    length = 3 + int(x[0, 0]) % (x.shape[1] - 2)
    return x[:, :length], y[:, :length]


def make_loader(num_items=24, batch_size=8, varying=False, seq_len=8):
    return DataLoader(
        TokenData(num_items, seq_len), batch_size=batch_size, shuffle=False,
        collate_fn=varying_length_collate if varying else None,
    )


def trainer_kwargs(**overrides):
    kw = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        max_epochs=1, num_sanity_val_steps=0, use_distributed_sampler=False,
    )
    kw.update(overrides)
    return kw
