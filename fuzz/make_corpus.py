"""Write the seed corpora for ``fuzz/run.py`` into ``fuzz/corpus/<target>/`` (generated,
not committed): valid wire encodings of packed payloads for every codec, the shipped
configs, and small archives in the real formats. The fuzzers add what they find there."""

from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _targets import CODEC_SPECS, READERS  # noqa: E402

from kdfl import wire  # noqa: E402
from kdfl.compression import make_codec  # noqa: E402
from kdfl.transport import pack  # noqa: E402

ROOT = Path(__file__).parent


def payloads() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(8, 2, generator=g) @ torch.randn(2, 12, generator=g)
    return [
        {"w": low_rank, "b": torch.randn(12, generator=g)},
        {"logits": torch.randn(4, 10, generator=g), "n": torch.tensor([3, 4]), "m": torch.tensor([True, False])},
        {"c": torch.randn(2, 3, 4, generator=g), "s": torch.tensor(1.5), "e": torch.zeros(0, 3)},
    ]


def write(target: str, items: list[bytes]) -> None:
    d = ROOT / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    for item in items:
        (d / hashlib.sha1(item).hexdigest()[:16]).write_bytes(item)
    print(f"{target}: {len(items)} seeds in {d}")


def main() -> None:
    wire_seeds, codec_seeds = [], []
    for i, spec in enumerate(CODEC_SPECS):
        for p in payloads():
            if spec.startswith("topk"):  # a scalar is one row of one column: fewer than k
                p = {k: v for k, v in p.items() if k != "s"}
            buf = wire.encode(pack(p, make_codec(spec)))
            wire_seeds.append(buf)
            codec_seeds.append(bytes([i]) + buf)
    write("wire", wire_seeds)
    write("codecs", codec_seeds)
    write("config", [p.read_bytes() for p in sorted((ROOT.parent / "configs").glob("*.toml"))])
    rng = np.random.default_rng(0)
    images = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28)) + bytes(2 * 784)
    labels = (2049).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes([3, 7])
    batch = pickle.dumps({b"labels": [1, 2], b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}, protocol=2)
    write("datasets", [bytes([READERS.index("idx_images")]) + images, bytes([READERS.index("idx_labels")]) + labels,
                       bytes([READERS.index("cifar")]) + batch])


if __name__ == "__main__":
    main()
