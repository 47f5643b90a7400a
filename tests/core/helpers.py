"""Tiny hand-checkable tasks for core tests (no data files, no model zoo)."""

from __future__ import annotations

import torch
from torch import nn

from kdfl.types import Task, TensorData


def zero_linear(arch: str = "linear") -> nn.Module:
    model = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(model.weight)
    return model


def tiny_task() -> tuple[Task, list[list[int]]]:
    """Client 0: one sample x=[1,0], y=0. Client 1: three samples x=[0,2], y=1."""
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    y = torch.tensor([0, 1, 1, 1])
    data = TensorData(x, y)
    task = Task(
        train=data, test=data, proxy=x.clone(), val=None, num_classes=2, input_shape=(2,),
        server_arch="linear", client_archs=["linear", "linear"], build_model=zero_linear,
    )
    return task, [[0], [1, 2, 3]]


def blob_task(num_clients: int = 4, n: int = 240, seed: int = 0) -> tuple[Task, list[list[int]]]:
    """Separable Gaussian blobs in 2-D, 3 classes, a small MLP: learns in a few rounds."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.5]])
    y = torch.arange(n) % 3
    x = centers[y] + 0.6 * torch.randn(n, 2, generator=g)
    data = TensorData(x, y)

    def mlp(arch: str) -> nn.Module:
        return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))

    task = Task(
        train=data, test=data, proxy=x[:60].clone(), val=None, num_classes=3, input_shape=(2,),
        server_arch="mlp", client_archs=["mlp"] * num_clients, build_model=mlp, seed=seed,
    )
    parts = [list(range(i, n, num_clients)) for i in range(num_clients)]
    return task, parts
