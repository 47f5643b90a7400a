"""Client sampling, deterministic from (seed, round)."""

from __future__ import annotations

from kdfl.rng import numpy_rng


def sample_clients(num_clients: int, per_round: int, seed: int, round_num: int) -> list[int]:
    """``per_round`` distinct client ids drawn uniformly for this round, sorted."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = numpy_rng(seed, "sample", round_num)
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


def dropouts(ids: list[int], rate: float, seed: int, round_num: int) -> set[int]:
    """The sampled clients that drop out this round (each with probability ``rate``)."""
    if rate <= 0:
        return set()
    rng = numpy_rng(seed, "dropout", round_num)
    return {i for i, u in zip(ids, rng.random(len(ids)), strict=True) if u < rate}
