"""The client side of per-client metrics, and where the simulator keeps client state.

**Per-client metrics.** After a round (see ``run.client_eval_every``) every client
evaluates the model it would use for inference: its personal model (FedMD's, a local
model, a heterogeneous client's kept model) or the global model the server would send
it. The server sends each client the downlink ``configure`` would give it for the next
round (through the downlink codec, not counted as training traffic); the client turns it
into a model with the algorithm's optional ``client_model(task, downlink, client)``
method, or with :func:`default_client_model`, and evaluates it on its own held-out split
(``data.client_holdout``, drawn from its own data with its own label mix) and on the
global test set. Clients without a model (an algorithm whose clients hold none) report
nothing. An algorithm adds its own per-client metrics with the optional
``client_eval_metrics(task, downlink, client, module, data)`` method (see
:func:`evaluate_client`); they go everywhere the accuracies go.

**Client state.** :class:`ClientStore` holds the stateful clients' :class:`ClientState`
between rounds: all in memory, or the most recently used ``in_memory`` of them in memory
and the rest in files, so that 1,000 stateful clients do not need 1,000 models in RAM.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdfl.algorithms.program import Model
from kdfl.losses import MAIN
from kdfl.train import evaluate
from kdfl.types import Client, ClientState, KdflError, Payload, Task, TensorData

log = logging.getLogger(__name__)


def _state_keys(task: Task, arch: str) -> dict[str, tuple[int, ...]]:
    cache: dict[str, dict[str, tuple[int, ...]]] = task.__dict__.setdefault("_kdfl_state_keys", {})
    if arch not in cache:
        model = task.borrow_model(arch)
        cache[arch] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        task.return_model(arch, model)
    return cache[arch]


def default_client_model(task: Task, downlink: Payload, client: Client) -> Model | None:
    """The model a client uses for inference when its algorithm does not say: its kept
    main model (a personal model) if it has one; else the downlink when it is a complete
    set of weights of the client's architecture (the global model of FedAvg and its
    kin); else None (nothing to evaluate)."""
    kept = client.kept(MAIN)
    if kept is not None:
        return Model(client.arch, kept)
    keys = _state_keys(task, client.arch)
    if downlink.keys() == keys.keys() and all(tuple(downlink[k].shape) == s for k, s in keys.items()):
        return Model(client.arch, dict(downlink))
    return None


def client_model(algorithm: Any, task: Task, downlink: Payload, client: Client) -> Model | None:
    """The algorithm's ``client_model`` if it defines one, else :func:`default_client_model`."""
    fn = getattr(algorithm, "client_model", None)
    return fn(task, downlink, client) if fn is not None else default_client_model(task, downlink, client)


RESERVED = frozenset({"accuracy", "clients", "malicious"})


def extra_metrics(algorithm: Any, task: Task, downlink: Payload, client: Client, module: nn.Module,
                  data: TensorData, prefix: str = "") -> dict[str, float]:
    """The algorithm's optional ``client_eval_metrics`` on one split, its keys prefixed
    (``"test_"`` on the test set); ``{}`` for an algorithm without it."""
    fn = getattr(algorithm, "client_eval_metrics", None)
    if fn is None:
        return {}
    got = fn(task, downlink, client, module, data)
    clash = sorted(set(got) & RESERVED)
    if clash:
        raise KdflError(f"client_eval_metrics returned the reserved keys {clash}; name extra metrics otherwise "
                        "(e.g. proto_accuracy)")
    return {f"{prefix}{k}": float(v) for k, v in got.items()}


def weights_fingerprint(arch: str, weights: Mapping[str, Tensor]) -> bytes:
    """A digest of an architecture and its weights (names, dtypes, shapes and bytes): equal
    digests mean the same model, so its test-set metrics can be computed once."""
    h = hashlib.blake2b(arch.encode(), digest_size=20)
    for name, t in weights.items():
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.digest()


def evaluate_client(algorithm: Any, task: Task, downlink: Payload, client: Client,
                    holdout: TensorData | None, test_cache: dict[bytes, float] | None = None) -> dict[str, float]:
    """``{"accuracy": on the held-out split (when there is one), "test_accuracy": on the
    global test set}`` of the client's model; ``{}`` when the client has no model.

    An algorithm with the optional method ``client_eval_metrics(task, downlink, client,
    module, data) -> dict[str, float]`` adds its own metrics of the same model on the same
    splits: it is called with ``module`` (the client's model, weights loaded) and ``data``
    (the test set, then the held-out split when there is one); its keys are used as they
    are for the held-out split and prefixed with ``test_`` for the test set
    (``proto_accuracy``, ``test_proto_accuracy``).

    ``test_cache`` (fingerprint -> test accuracy), shared by the clients of one evaluation,
    lets clients holding the same model (every client of FedAvg after a round, say) share
    one pass over the test set; the result is the same."""
    model = client_model(algorithm, task, downlink, client)
    if model is None:
        return {}
    module = task.borrow_model(model.arch)
    try:
        module.load_state_dict(model.weights)
        if test_cache is None:
            acc = evaluate(module, task.test)["accuracy"]
        else:
            key = weights_fingerprint(model.arch, model.weights)
            if key not in test_cache:
                test_cache[key] = evaluate(module, task.test)["accuracy"]
            acc = test_cache[key]
        out = {"test_accuracy": acc}
        out.update(extra_metrics(algorithm, task, downlink, client, module, task.test, "test_"))
        if holdout is not None and len(holdout):
            out["accuracy"] = evaluate(module, holdout)["accuracy"]
            out.update(extra_metrics(algorithm, task, downlink, client, module, holdout))
        return out
    finally:
        task.return_model(model.arch, module)


def client_stats(values: Sequence[float], prefix: str) -> dict[str, float]:
    """``<prefix>_mean``, ``_std``, ``_worst10`` (mean of the worst 10 % of clients, at
    least one) and ``_best`` of per-client values."""
    if not len(values):
        return {}
    v = np.sort(np.asarray(values, dtype=np.float64))
    k = max(1, math.ceil(0.1 * len(v)))
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_std": float(v.std()),
            f"{prefix}_worst10": float(v[:k].mean()), f"{prefix}_best": float(v[-1])}


# ----------------------------------------------------------------------------- store
class ClientStore(MutableMapping[int, ClientState]):
    """Client states by client id, with at most ``in_memory`` of them in memory.

    Args:
        root: the directory for states that do not fit (created when first needed).
            None with ``in_memory`` set: a temporary directory, deleted with the store.
        in_memory: the most recently used states kept in memory; 0 = all (no files).

    States evicted from memory are written to ``root`` as ``<id>-<n>.pt`` (n counts
    writes, so a file is never overwritten in place); :meth:`commit` writes every state
    still in memory and returns the manifest (id -> file name) that a checkpoint records;
    files that neither the manifest of the last commit nor the current states refer to
    are deleted. :meth:`open` rebuilds a store from a manifest on resume.
    """

    def __init__(self, root: Path | None = None, in_memory: int = 0) -> None:
        if in_memory < 0:
            raise KdflError(f"run.client_states_in_memory must be >= 0 (0 = all in memory), got {in_memory}")
        self.in_memory = in_memory
        self._tmp = None
        if in_memory and root is None:
            import tempfile

            self._tmp = tempfile.TemporaryDirectory(prefix="kdfl-client-states-")
            root = Path(self._tmp.name)
        self.root = root
        self._mem: OrderedDict[int, ClientState] = OrderedDict()
        self._files: dict[int, str] = {}  # states on disk (not in memory)
        self._committed: dict[int, str] = {}
        self._writes = 0

    # -- mapping --------------------------------------------------------------------
    def __getitem__(self, cid: int) -> ClientState:
        if cid in self._mem:
            self._mem.move_to_end(cid)
            return self._mem[cid]
        if cid not in self._files:
            raise KeyError(cid)
        assert self.root is not None
        path = self.root / self._files[cid]
        try:
            state = torch.load(path, weights_only=False)
        except Exception as e:
            raise KdflError(f"the stored state of client {cid} ({path}) is unreadable ({e}); start the run "
                            "again in a new directory") from None
        self._put(cid, state)
        return state

    def __setitem__(self, cid: int, state: ClientState) -> None:
        self._put(cid, state)

    def __delitem__(self, cid: int) -> None:
        if cid in self._mem:
            del self._mem[cid]
        else:
            self._drop_file(cid)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted({*self._mem, *self._files}))

    def __len__(self) -> int:
        return len({*self._mem, *self._files})

    def __contains__(self, cid: object) -> bool:
        return cid in self._mem or cid in self._files

    # -- memory bound ----------------------------------------------------------------
    def _put(self, cid: int, state: ClientState) -> None:
        self._drop_file(cid)  # the in-memory copy is now the current one
        self._mem[cid] = state
        self._mem.move_to_end(cid)
        while self.in_memory and len(self._mem) > self.in_memory:
            old, old_state = self._mem.popitem(last=False)
            self._write(old, old_state)

    def _write(self, cid: int, state: ClientState) -> None:
        assert self.root is not None
        self.root.mkdir(parents=True, exist_ok=True)
        self._writes += 1
        name = f"{cid}-{self._writes}.pt"
        tmp = self.root / (name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.root / name)
        self._files[cid] = name

    def _drop_file(self, cid: int) -> None:
        name = self._files.pop(cid, None)
        if name is not None and self._committed.get(cid) != name and self.root is not None:
            (self.root / name).unlink(missing_ok=True)

    # -- checkpoints -----------------------------------------------------------------
    @property
    def on_disk(self) -> bool:
        return bool(self.in_memory)

    def commit(self) -> dict[int, str]:
        """Write the states held in memory, forget files no longer referenced, and return
        the manifest (client id -> file name under ``root``)."""
        if not self.on_disk:
            raise KdflError("commit() is for a store that keeps states in files (in_memory > 0)")
        for cid, state in list(self._mem.items()):
            self._write(cid, state)
        manifest = dict(self._files)
        stale = set(self._committed.values()) - set(manifest.values())
        assert self.root is not None
        for name in stale:
            (self.root / name).unlink(missing_ok=True)
        self._committed = dict(manifest)
        self._mem.clear()  # now all on disk; read back on use
        return manifest

    @classmethod
    def open(cls, root: Path, in_memory: int, manifest: dict[int, str]) -> ClientStore:
        """A store holding the states of ``manifest`` (files under ``root``)."""
        store = cls(root, in_memory)
        missing = [n for n in manifest.values() if not (root / n).exists()]
        if missing:
            raise KdflError(f"cannot resume: client state files {missing[:3]} are missing from {root}; start the "
                            "run again in a new directory")
        store._files = dict(manifest)
        store._committed = dict(manifest)
        store._writes = max((int(n.split("-")[1].split(".")[0]) for n in manifest.values()), default=0)
        for f in root.glob("*.pt*"):  # files of an interrupted round after the checkpoint
            if f.name not in manifest.values():
                f.unlink(missing_ok=True)
        return store
