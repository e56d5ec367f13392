"""Tabular MLP: normalisation buffers and categorical embeddings inside the model.

Input is one float tensor ``[B, n_numeric + n_categorical]``: raw numeric values followed by
category indices (0 = unknown, 1.. = position in the vocabulary + 1). Everything needed to rebuild
the model (and to export it to a SavedModel taking raw features) is in :meth:`TabularMLP.config`.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn


class TabularMLP(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor
    log_mask: torch.Tensor

    def __init__(
        self,
        numeric: list[str],
        categorical: dict[str, list[str]],
        stats: dict[str, dict[str, float]],
        hidden: tuple[int, ...] | list[int] = (64, 32),
        embedding_dim: int = 4,
        log1p: list[str] | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.numeric = list(numeric)
        self.categorical = {k: list(v) for k, v in categorical.items()}
        self.hidden = list(hidden)
        self.embedding_dim = embedding_dim
        self.dropout = float(dropout)
        self.log1p = [n for n in numeric if n in set(log1p or [])]
        self.register_buffer("log_mask", torch.tensor([n in self.log1p for n in numeric]))
        self.register_buffer("mean", torch.tensor([stats[n]["mean"] for n in numeric]))
        self.register_buffer("std", torch.tensor([stats[n]["std"] for n in numeric]))
        self.embeddings = nn.ModuleList(
            nn.Embedding(len(v) + 1, embedding_dim) for v in self.categorical.values()
        )
        layers: list[nn.Module] = []
        width = len(numeric) + embedding_dim * len(self.categorical)
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if self.dropout:  # no module at 0: the state dict (and the export) stay as they were
                layers.append(nn.Dropout(self.dropout))
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` from encoded rows ``[B, n_numeric + n_categorical]``."""
        n = len(self.numeric)
        num = x[:, :n]
        num = torch.where(self.log_mask, torch.log1p(num.clamp(min=0)), num)
        parts = [(num - self.mean) / self.std]
        idx = x[:, n:].long()
        parts += [emb(idx[:, i]) for i, emb in enumerate(self.embeddings)]
        return self.mlp(torch.cat(parts, dim=1)).squeeze(-1)

    def config(self) -> dict[str, Any]:
        return {
            "numeric": self.numeric,
            "categorical": self.categorical,
            "stats": {
                n: {"mean": float(m), "std": float(s)}
                for n, m, s in zip(self.numeric, self.mean.tolist(), self.std.tolist(), strict=True)
            },
            "hidden": self.hidden,
            "embedding_dim": self.embedding_dim,
            "log1p": self.log1p,
            "dropout": self.dropout,
        }


def encode_frame(
    df: pd.DataFrame,
    numeric: list[str],
    categorical: dict[str, list[str]],
    stats: dict[str, dict[str, float]],
) -> np.ndarray:
    """Raw rows -> model input. Missing numbers become the training mean; unseen categories 0."""
    cols = []
    for name in numeric:
        cols.append(
            pd.to_numeric(df[name], errors="coerce")
            .astype("float64")
            .fillna(stats[name]["mean"])
            .to_numpy()
        )
    for name, vocab in categorical.items():
        # Vocabulary position + 1; unseen and missing -> 0 (hash lookup, no per-value Python).
        values = df[name]
        if not isinstance(values.dtype, pd.StringDtype):
            values = values.astype(str).where(values.notna())
        codes = pd.Categorical(values, categories=vocab).codes
        cols.append(codes.astype("float64") + 1.0)
    return np.stack(cols, axis=1).astype("float32") if cols else np.zeros((len(df), 0), "float32")


def model_from_manifest(
    manifest: dict[str, Any], hidden: tuple[int, ...], embedding_dim: int, dropout: float = 0.0
) -> TabularMLP:
    feats = manifest["features"]
    return TabularMLP(
        feats["numeric"],
        feats["categorical"],
        manifest["stats"],
        hidden,
        embedding_dim,
        feats.get("log1p", []),
        dropout,
    )


def save_model_bytes(model: TabularMLP) -> bytes:
    buf = io.BytesIO()
    torch.save({"config": model.config(), "state_dict": model.state_dict()}, buf)
    return buf.getvalue()


def load_model_bytes(data: bytes) -> TabularMLP:
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    cfg = blob["config"]
    model = TabularMLP(
        cfg["numeric"],
        cfg["categorical"],
        cfg["stats"],
        cfg["hidden"],
        cfg["embedding_dim"],
        cfg.get("log1p", []),
        cfg.get("dropout", 0.0),
    )
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model


def predict_proba(model: TabularMLP, df: pd.DataFrame, batch: int = 8192) -> np.ndarray:
    """Fraud probability per raw row."""
    x = encode_frame(df, model.numeric, model.categorical, model.config()["stats"])
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(torch.sigmoid(model(torch.from_numpy(x[i : i + batch]))).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype="float32")
