"""The threat model: what the engine does to the fixed set of Byzantine clients.

Data attacks (label flipping) poison a malicious client's local data before it trains;
upload attacks rewrite what malicious clients send, key by key on the stacked uploads of
the round (``(clients, d)``), so the same attack works on weight deltas and on logits.
Omniscient attacks see the honest uploads of the same round.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kdfl.attacks import ATTACKS, make_attack
from kdfl.compression import refactor, unfactor
from kdfl.rng import generator
from kdfl.types import Client, ClientUpdate, Task, TensorData


@dataclasses.dataclass(frozen=True)
class Threat:
    """An attack bound to its hyperparameters; see ``kdfl list attacks``."""

    name: str
    hyper: dict[str, Any]
    num_classes: int

    @property
    def space(self) -> str:
        return ATTACKS[self.name].space

    def poison(self, client: Client, task: Task) -> Client:
        if self.space != "data":
            return client
        flip = make_attack(self.name, **self.hyper)
        y = flip(client.data.y, self.num_classes, rng=generator(task.seed, "poison", client.round, client.id))
        return dataclasses.replace(client, data=TensorData(client.data.x, y))

    def tamper(
        self, updates: list[ClientUpdate], malicious: list[bool], round_num: int, task: Task
    ) -> list[ClientUpdate]:
        if self.space != "upload" or not any(malicious):
            return updates
        attack = make_attack(self.name, **self.hyper)
        mask = torch.tensor(malicious)
        rng = generator(task.seed, "attack", round_num)
        # SVD-encoded matrices (FedKD) are attacked as the matrices they encode, then sent
        # at the attacker's own rank: factors of different ranks would not stack
        split = [unfactor(u.payload) for u in updates]
        payloads = [dict(p) for p, _ in split]
        for key, ref in split[0][0].items():
            same = all(key in p and p[key].shape == ref.shape for p in payloads)
            if not (same and ref.is_floating_point()):
                continue  # heterogeneous or integer entries are left alone
            x = torch.stack([p[key].reshape(-1).float() for p in payloads])  # (clients, d)
            x = attack(x, mask, rng)
            for p, row in zip(payloads, x, strict=True):
                p[key] = row.reshape(ref.shape).to(ref.dtype)
        return [dataclasses.replace(u, payload=refactor(p, ranks) if ranks else p) if bad else u
                for u, p, (_, ranks), bad in zip(updates, payloads, split, malicious, strict=True)]


def make_threat(attack_cfg: dict[str, Any], num_classes: int) -> Threat | None:
    """The threat of the ``[attack]`` config section, or None for ``name = "none"``."""
    if attack_cfg["name"] == "none" or attack_cfg.get("fraction", 0.0) <= 0:
        return None
    hyper = {k: v for k, v in attack_cfg.items() if k not in ("name", "fraction")}
    make_attack(attack_cfg["name"], **hyper)  # validate now
    return Threat(attack_cfg["name"], hyper, num_classes)
