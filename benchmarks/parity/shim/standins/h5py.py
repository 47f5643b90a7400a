"""Stand-in for ``h5py`` (not installed here): PFLlib writes its per-round record with
``h5py.File(path, "w").create_dataset(name, data=...)`` and reads it back with
``File(path, "r").get(name)`` (``serverbase.save_results``, ``result_utils``). This keeps
those datasets as JSON lists in the same file name; nothing else of h5py is provided."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


class File:
    def __init__(self, path: str, mode: str = "r") -> None:
        self.path, self.mode = path, mode
        self.data: dict[str, Any] = {}
        if mode == "r":
            with open(path) as f:
                self.data = json.load(f)

    def create_dataset(self, name: str, data: Any) -> None:
        self.data[name] = np.asarray(data, dtype=float).tolist()

    def get(self, name: str) -> Any:
        return np.asarray(self.data[name]) if name in self.data else None

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode != "r":
            with open(self.path, "w") as f:
                json.dump(self.data, f)
