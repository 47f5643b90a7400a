"""Stand-in for ``calmsize`` (not installed here): PFLlib's memory report formats
``calmsize.size(num_bytes)`` with ``'{:.2f}'``; this returns the byte count as a float."""


def size(num_bytes: float) -> float:
    return float(num_bytes)
