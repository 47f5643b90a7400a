"""The model PFLlib runs in a parity run: kdfl's ``mlp:hidden=H`` in PFLlib's layout.

PFLlib's ``main.py`` splits a model into ``base`` and ``head`` by taking its ``fc``
attribute as the head (``BaseHeadSplit``), so the last layer is called ``fc`` and
``forward`` ends with it, with no ``log_softmax`` after it (PFLlib's own ``DNN`` applies
``log_softmax`` after ``fc``; once ``fc`` is replaced by the identity its base would emit
log-probabilities of the hidden features as "features"). Layers and their order match
kdfl's MLP: Flatten -> Linear(D, H) -> ReLU -> Linear(H, C); :data:`KDFL_TO_PFLLIB` maps
kdfl's parameter names onto these.
"""

from __future__ import annotations

import torch
from torch import nn

KDFL_TO_PFLLIB = {"body.1.weight": "fc1.weight", "body.1.bias": "fc1.bias",
                  "classifier.weight": "fc.weight", "classifier.bias": "fc.bias"}


class ParityMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc1(torch.flatten(x, 1))))
