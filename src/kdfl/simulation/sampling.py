"""Client sampling and dropout, deterministic from (seed, round); client speeds and
simulated round times (stragglers), deterministic from (seed, client id)."""

from __future__ import annotations

import math

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


def client_speed(seed: int, client_id: int, spread: float) -> float:
    """Client ``client_id``'s speed relative to the median client, drawn once per run:
    ``exp(spread * z)`` with ``z`` standard normal from (seed, client id) alone (a
    lognormal of median 1 and sigma ``spread``; 1.0 for every client when ``spread`` is 0).
    The same in every round, every runtime and after a resume."""
    if spread <= 0:
        return 1.0
    z = float(numpy_rng(seed, "speed", client_id).standard_normal())
    return math.exp(spread * z)


def simulated_seconds(work: float, up_bytes: int, speed: float, examples_per_second: float,
                      upload_bandwidth: float) -> float:
    """A client's simulated time in a round: its ``work`` (training examples processed) at
    ``speed * examples_per_second``, plus ``up_bytes / upload_bandwidth`` to send its
    upload (no upload time when ``upload_bandwidth`` is 0)."""
    seconds = work / (speed * examples_per_second)
    if upload_bandwidth > 0:
        seconds += up_bytes / upload_bandwidth
    return seconds
