"""The ``vectorized`` executor: same-architecture clients trained together with ``torch.func``.

Clients whose jobs (:class:`~kdfl.algorithms.base.LocalJob`) share an architecture, the
local-training settings and the *form* of their loss are stacked along a leading client
axis (``stack``), and one ``vmap(grad(loss))`` call computes the gradients of all of them
for one step; the SGD update (momentum, weight decay, exactly as ``torch.optim.SGD``)
runs on the stacked tensors. What it reproduces of :func:`kdfl.train.local_train`:

- the batch order: every client's batches come from
  ``batch_indices(len(data), job.local, client.generator())``, as in ``local_train``;
- the number of steps: clients are sorted by their step count, so the clients still
  training at step t are a prefix of the chunk; finished clients simply leave it;
- ragged batches (the last batch of an epoch): batches are padded to the longest one and
  the loss is evaluated per sample (an inner ``vmap`` over the batch, each sample seen as
  a batch of one) and averaged over the real samples only. This equals the unpadded
  batch mean for any loss that is a batch mean of per-sample terms plus a term of the
  parameters (cross-entropy, the proximal term, batch-mean KD), which is checked on the
  first batch of every group; losses that fail the check, and models with BatchNorm
  (whose batch statistics must not see padding), are bucketed instead: only clients with
  the same number of examples (hence identical batch sizes at every step) are stacked;
- BatchNorm keeps per-client running statistics (the stacked buffers are updated in
  place by the batched forward); GroupNorm and models without normalisation need nothing;
- ``stats`` = ``{"train_loss": mean loss over the steps, "steps": steps}``; a client
  whose loss becomes NaN/inf is rerun sequentially, so it fails exactly as in
  ``local_train``;
- ``finish``: called per client on one model that receives each client's trained state
  in turn, unless the algorithm has ``finish_stacked(task, jobs, state, stats)`` (defined
  by the class that defines ``finish``, or below it), which turns the stacked states of
  all clients into their updates at once (FedAvg-family deltas: one subtraction per
  tensor for the whole chunk instead of one ``finish`` per client).

Losses are per-client closures (``cross_entropy()`` returns a new function per call):
two jobs are batched together when their loss closures have the same code and the same
constants, with tensors in the closures either shared (the same object, e.g. FedProx's
anchor) or of equal shape; per-client tensors are stacked and sliced inside ``vmap``.

Everything else runs sequentially, one job at a time (logged at debug level): algorithms
without ``prepare``/``finish``, Adam, models with active dropout (their masks come from
the global RNG), groups of one, and any group whose batched run raises (it is rerun
client by client, so only a client that really fails becomes a
:class:`~kdfl.simulation.executors.ClientFailure`).

The client axis is chunked so that the stacked parameters, optimizer state and
activations of a chunk stay under ``max_memory_mb``.

Tolerance: a vectorized client equals its sequential run up to float rounding (batched
matmuls sum in another order): about 1e-7 after one epoch of the models in kdfl's zoo;
the tests assert ``atol=1e-5``.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from kdfl.algorithms.base import LocalJob, LocalTraining
from kdfl.losses import Batch
from kdfl.simulation.executors import Job, Result, run_one
from kdfl.train import batch_indices
from kdfl.types import Algorithm, Client, KdflError, Payload, Task

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- loss lifting
Builder = Callable[[Sequence[Any]], Any]
_CONST = (int, float, bool, str, bytes, type(None), complex)


def _lift(obj: Any, leaves: list[Tensor], depth: int = 0) -> tuple[Any, Builder]:
    """Split ``obj`` (a loss closure, and what it captures) into a hashable structure key,
    the tensors it holds (appended to ``leaves``) and a builder that rebuilds it from new
    tensors (``builder(leaves)``). Objects it cannot look into count by identity."""
    if isinstance(obj, Tensor):
        i = len(leaves)
        leaves.append(obj)
        return ("T", tuple(obj.shape), obj.dtype, obj.device), lambda ls: ls[i]
    if isinstance(obj, _CONST) and not (isinstance(obj, float) and math.isnan(obj)):
        return ("C", type(obj), obj), lambda ls: obj
    if depth < 8:
        if type(obj) in (dict, list, tuple) and len(obj) <= 4096:
            items = list(obj.items()) if isinstance(obj, dict) else list(enumerate(obj))
            if all(isinstance(k, (str, int)) for k, _ in items):
                parts = [(k, *_lift(v, leaves, depth + 1)) for k, v in items]
                key: tuple[Any, ...] = (type(obj).__name__, tuple((k, pk) for k, pk, _ in parts))
                if isinstance(obj, dict):
                    return key, lambda ls: {k: b(ls) for k, _, b in parts}
                kind = type(obj)
                return key, lambda ls: kind(b(ls) for _, _, b in parts)
        if isinstance(obj, types.FunctionType):
            cells: list[tuple[Any, Any]] = []
            for cell in obj.__closure__ or ():
                try:
                    cells.append(_lift(cell.cell_contents, leaves, depth + 1))
                except ValueError:  # an empty cell
                    cells.append((("EMPTY",), None))
            dkey, dbuild = _lift(obj.__defaults__, leaves, depth + 1)
            kwkey, kwbuild = _lift(obj.__kwdefaults__, leaves, depth + 1)
            key = ("F", obj.__code__, id(obj.__globals__), dkey, kwkey, tuple(k for k, _ in cells))

            def build_fn(ls: Sequence[Any], fn: types.FunctionType = obj) -> Any:
                closure = tuple(types.CellType() if b is None else types.CellType(b(ls)) for _, b in cells)
                new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, dbuild(ls), closure)
                new.__kwdefaults__ = kwbuild(ls)
                return new

            return key, build_fn
        if isinstance(obj, functools.partial):
            fkey, fb = _lift(obj.func, leaves, depth + 1)
            akey, ab = _lift(obj.args, leaves, depth + 1)
            kkey, kb = _lift(dict(obj.keywords), leaves, depth + 1)
            return ("P", fkey, akey, kkey), lambda ls: functools.partial(fb(ls), *ab(ls), **kb(ls))
    return ("O", id(obj)), lambda ls: obj


@dataclass
class _Item:
    """One job of a group, ready to train."""

    pos: int  # index in the executor's job list
    client: Client
    downlink: Payload
    job: LocalJob
    leaves: list[Tensor]
    batches: list[Tensor] = field(default_factory=list)


def _stacked_finish(algorithm: Algorithm) -> Callable[..., list[Any]] | None:
    """``algorithm.finish_stacked`` when it stands for the algorithm's ``finish``: defined
    by the class that defines ``finish`` or by a subclass of it (a subclass that overrides
    only ``finish`` must not be bypassed)."""
    mro = type(algorithm).__mro__
    owner = next((c for c in mro if "finish_stacked" in c.__dict__), None)
    finish_owner = next((c for c in mro if "finish" in c.__dict__), None)
    if owner is None or finish_owner is None or not issubclass(owner, finish_owner):
        return None
    return algorithm.finish_stacked  # type: ignore[attr-defined, no-any-return]


def _model_issue(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.AlphaDropout)) and m.p > 0:
            return f"dropout layer {name!r} draws its masks from the global RNG"
    return None


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _activation_values(model: nn.Module, x: Tensor) -> int:
    """Values of all module outputs for one sample (a memory estimate of the forward)."""
    total = 0

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal total
        if isinstance(out, Tensor):
            total += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


class Vectorized:
    """Trains the clients of a round that share an architecture as one batched model.

    Args:
        max_memory_mb: budget for one chunk of stacked clients (parameters, optimizer
            state, gradients and activations); the client axis is cut into chunks under it.
        max_chunk: at most this many clients per chunk (larger chunks stop paying off on
            CPU once the per-step Python overhead is amortised).
        min_group: groups smaller than this run sequentially.
    """

    name = "vectorized"

    def __init__(self, max_memory_mb: float = 1024, max_chunk: int = 512, min_group: int = 2) -> None:
        if max_memory_mb <= 0 or max_chunk < 1 or min_group < 1:
            raise KdflError(f"vectorized needs max_memory_mb > 0, max_chunk >= 1 and min_group >= 1; got "
                            f"max_memory_mb={max_memory_mb}, max_chunk={max_chunk}, min_group={min_group}")
        self.max_memory_mb, self.max_chunk, self.min_group = max_memory_mb, max_chunk, min_group
        self._broken: dict[str, str] = {}  # arch -> why batching it failed (skip it next time)
        self._decomposable_by_key: dict[Any, bool] = {}  # group key -> padding check result
        self.batched = 0  # clients of the last run() that were trained batched (the rest sequentially)

    # -- public ---------------------------------------------------------------------------
    def run(self, algorithm: Algorithm, task: Task, jobs: Sequence[Job]) -> list[Result]:
        results: list[Result | None] = [None] * len(jobs)
        self.batched = 0
        if not isinstance(algorithm, LocalTraining):
            log.debug("vectorized: %s has no prepare/finish; running its clients sequentially",
                      type(algorithm).__name__)
            return [run_one(algorithm, task, c, d) for c, d in jobs]
        groups: dict[Any, list[_Item]] = {}
        for pos, (client, downlink) in enumerate(jobs):
            try:
                job = algorithm.prepare(task, downlink, client)
            except Exception:
                results[pos] = run_one(algorithm, task, client, downlink)  # fails the same way
                continue
            why = self._job_issue(job)
            if why:
                log.debug("vectorized: client %d runs sequentially: %s", client.id, why)
                results[pos] = run_one(algorithm, task, client, downlink)
                continue
            leaves: list[Tensor] = []
            loss_key, _ = _lift(job.loss, leaves)
            wkey = tuple((k, tuple(v.shape), v.dtype) for k, v in job.weights.items())
            key = (job.arch, job.local, loss_key, wkey)
            groups.setdefault(key, []).append(_Item(pos, client, downlink, job, leaves))
        for key, items in groups.items():
            for pos, res in self._run_group(algorithm, task, items, key).items():
                results[pos] = res
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    # -- grouping -------------------------------------------------------------------------
    def _job_issue(self, job: LocalJob) -> str | None:
        if job.local.optimizer != "sgd":
            return f"optimizer {job.local.optimizer!r} is not batched (only SGD)"
        if job.arch in self._broken:
            return f"architecture {job.arch!r} could not be batched earlier: {self._broken[job.arch]}"
        return None

    def _sequential(self, algorithm: Algorithm, task: Task, items: Sequence[_Item]) -> dict[int, Result]:
        return {it.pos: run_one(algorithm, task, it.client, it.downlink) for it in items}

    def _run_group(self, algorithm: Algorithm, task: Task, items: list[_Item], key: Any = None) -> dict[int, Result]:
        if len(items) < self.min_group:
            return self._sequential(algorithm, task, items)
        lead = items[0].job
        template = task.new_model(lead.arch)
        why = _model_issue(template)
        if why:
            log.debug("vectorized: %s runs sequentially: %s", lead.arch, why)
            self._broken[lead.arch] = why
            return self._sequential(algorithm, task, items)
        for it in items:
            it.batches = list(batch_indices(len(it.client.data), it.job.local, it.client.generator()))
        # bucket by data size when padding is not allowed (BatchNorm, non-decomposable losses)
        ragged = len({len(b) for it in items for b in it.batches}) > 1
        bucket = _has_batchnorm(template)
        if ragged and not bucket and key is not None and key not in self._decomposable_by_key:
            if len(self._decomposable_by_key) > 256:  # keys of opaque loss parts hold object ids
                self._decomposable_by_key.clear()
            self._decomposable_by_key[key] = self._decomposable(template, items[0])  # once per form of job
        if ragged and not bucket and not self._decomposable_by_key.get(key, False):
            log.debug("vectorized: the loss of %s is not a batch mean of per-sample terms; bucketing", lead.arch)
            bucket = True
        if bucket:
            subgroups: dict[int, list[_Item]] = {}
            for it in items:
                subgroups.setdefault(len(it.client.data), []).append(it)
            out: dict[int, Result] = {}
            for sub in subgroups.values():
                if len(sub) < self.min_group:
                    out.update(self._sequential(algorithm, task, sub))
                else:
                    out.update(self._train_group(algorithm, task, sub, template))
            return out
        return self._train_group(algorithm, task, items, template)

    def _decomposable(self, model: nn.Module, it: _Item) -> bool:
        """Whether the loss of a padded batch can be computed per sample (checked once)."""
        idx = next((b for b in it.batches if len(b) > 1), None)
        if idx is None:
            return True
        model = copy.deepcopy(model)
        model.load_state_dict(it.job.weights)
        params = dict(model.named_parameters())
        data = it.client.data
        dev = next(model.parameters()).device
        with torch.no_grad():
            x, y = data.x[idx].to(dev), data.y[idx].to(dev)
            logits = model(x)
            full = it.job.loss(logits, Batch(x, y, idx), params)
            per = [it.job.loss(logits[i : i + 1], Batch(x[i : i + 1], y[i : i + 1], idx[i : i + 1]), params)
                   for i in range(len(idx))]
            mean = torch.stack([p.reshape(()) for p in per]).mean()
        return bool(torch.isclose(full.reshape(()).float(), mean.float(), rtol=1e-5, atol=1e-6))

    # -- batched training -----------------------------------------------------------------
    def _chunk_size(self, template: nn.Module, items: Sequence[_Item]) -> int:
        n_params = sum(p.numel() for p in template.parameters()) + sum(b.numel() for b in template.buffers())
        data = items[0].client.data
        bs = max(len(b) for it in items for b in it.batches[:1]) if items[0].batches else 1
        act = _activation_values(template, data.x[:1].to(next(template.parameters()).device)) if len(data) else 0
        # p, grad, momentum, update temporaries; forward + backward activations (x3 for vmap copies)
        per_client = 4 * (5 * n_params + 3 * bs * (act + data.x[0].numel() if len(data) else act))
        return max(1, min(self.max_chunk, int(self.max_memory_mb * 2**20 // max(per_client, 1))))

    def _train_group(self, algorithm: Algorithm, task: Task, items: list[_Item],
                     template: nn.Module) -> dict[int, Result]:
        items = sorted(items, key=lambda it: -len(it.batches))  # still-training clients form a prefix
        chunk = self._chunk_size(template, items)
        out: dict[int, Result] = {}
        for s in range(0, len(items), chunk):
            part = items[s : s + chunk]
            try:
                states, losses = self._train_chunk(task, part, template)
            except Exception as e:  # e.g. an op without a batching rule: rerun one by one
                log.debug("vectorized: batched training of %s failed (%s: %s); rerunning %d clients sequentially",
                          part[0].job.arch, type(e).__name__, e, len(part))
                if s == 0:
                    self._broken[part[0].job.arch] = f"{type(e).__name__}: {e}"
                out.update(self._sequential(algorithm, task, part))
                continue
            self.batched += len(part)
            out.update(self._finish(algorithm, task, part, template, states, losses))
        return out

    def _train_chunk(self, task: Task, items: list[_Item],
                     template: nn.Module) -> tuple[dict[str, Tensor], list[list[Tensor]]]:
        """Train the clients of ``items`` (sorted by steps, descending) together.

        Returns the stacked final state (parameters and buffers, (k, *shape)) and, per
        step, the losses of the clients active at that step ((m_t,) tensors).
        """
        dev = task.device
        k = len(items)
        cfg = items[0].job.local
        lead = items[0].job
        trainable = [n for n, p in template.named_parameters() if p.requires_grad]
        state: dict[str, Tensor] = {}
        for name in lead.weights:
            ws = [it.job.weights[name] for it in items]
            if all(w is ws[0] for w in ws):  # the shared global model: one copy, broadcast
                state[name] = ws[0].to(dev).unsqueeze(0).expand(k, *ws[0].shape).clone()
            else:
                state[name] = torch.stack([w.to(dev) for w in ws])
        param_names = {n for n, _ in template.named_parameters()}
        train_set = set(trainable)
        frozen = [n for n in state if n not in train_set]  # buffers and frozen parameters

        # loss leaves: shared ones stay closed over, per-client ones are stacked
        n_leaves = len(items[0].leaves)
        shared = [all(it.leaves[j] is items[0].leaves[j] for it in items) for j in range(n_leaves)]
        own = [j for j in range(n_leaves) if not shared[j]]
        stacked_leaves = [torch.stack([it.leaves[j].to(dev) for it in items]) for j in own]
        _, build_loss = _lift(lead.loss, [])

        # the data of the chunk, concatenated; batches index into it
        sizes = [len(it.client.data) for it in items]
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        xs = torch.cat([it.client.data.x for it in items]).to(dev)
        ys = torch.cat([it.client.data.y for it in items]).to(dev)

        def client_loss(p: dict[str, Tensor], fz: dict[str, Tensor], x: Tensor, y: Tensor, idx: Tensor,
                        mask: Tensor | None, lv: list[Tensor]) -> Tensor:
            leaves: list[Tensor] = list(items[0].leaves)
            for j, v in zip(own, lv, strict=True):
                leaves[j] = v
            loss_fn = build_loss(leaves)
            params = {**p, **{n: fz[n] for n in fz if n in param_names}}
            buffers = {n: fz[n] for n in fz if n not in param_names}
            logits = functional_call(template, (params, buffers), (x,))
            if mask is None:
                return loss_fn(logits, Batch(x, y, idx), params)

            def one(li: Tensor, xi: Tensor, yi: Tensor, ii: Tensor) -> Tensor:
                return loss_fn(li[None], Batch(xi[None], yi[None], ii[None]), params).reshape(())

            per = vmap(one)(logits, x, y, idx)  # (B,)
            m = mask.to(per.dtype)
            return (per * m).sum() / m.sum()

        g_fn = vmap(grad_and_value(client_loss), in_dims=(0, 0, 0, 0, 0, 0, 0))
        g_fn_full = vmap(grad_and_value(client_loss), in_dims=(0, 0, 0, 0, 0, None, 0))
        momentum: dict[str, Tensor] = {}
        losses: list[list[Tensor]] = []
        steps = [len(it.batches) for it in items]
        lr, mom, wd = cfg.lr, cfg.momentum, cfg.weight_decay
        template.train()
        for t in range(steps[0] if steps else 0):
            m = sum(1 for s in steps if s > t)
            bidx = [items[i].batches[t] for i in range(m)]
            bmax = max(len(b) for b in bidx)
            ragged = any(len(b) != bmax for b in bidx)
            local = torch.zeros(m, bmax, dtype=torch.long)
            mask = torch.zeros(m, bmax, dtype=torch.bool) if ragged else None
            for i, b in enumerate(bidx):
                local[i, : len(b)] = b
                if mask is not None:
                    mask[i, : len(b)] = True
            glob = (local + torch.tensor(offsets[:m]).unsqueeze(1)).to(dev)
            x, y = xs[glob], ys[glob]
            local = local.to(dev)
            p = {n: state[n][:m] for n in trainable}
            fz = {n: state[n][:m] for n in frozen}
            lv = [v[:m] for v in stacked_leaves]
            if mask is None:
                grads, loss = g_fn_full(p, fz, x, y, local, None, lv)
            else:
                grads, loss = g_fn(p, fz, x, y, local, mask.to(dev), lv)
            losses.append([loss.detach()])
            with torch.no_grad():  # torch.optim.SGD (single-tensor path), on the stacked tensors
                for n in trainable:
                    d_p = grads[n]
                    if wd != 0:
                        d_p = d_p.add(p[n], alpha=wd)
                    if mom != 0:
                        if t == 0:
                            momentum[n] = torch.clone(d_p).detach()
                            d_p = momentum[n]
                        else:
                            buf = momentum[n][:m]
                            buf.mul_(mom).add_(d_p)
                            d_p = buf
                    p[n].add_(d_p, alpha=-lr)
        return state, losses

    def _finish(self, algorithm: Algorithm, task: Task, items: list[_Item], template: nn.Module,
                state: dict[str, Tensor], losses: list[list[Tensor]]) -> dict[int, Result]:
        k = len(items)
        per_step = [step[0] for step in losses]
        totals = torch.zeros(k, dtype=torch.float64)
        finite = torch.ones(k, dtype=torch.bool)
        for lv in per_step:
            m = lv.shape[0]
            totals[:m] += lv.double().cpu()
            finite[:m] &= torch.isfinite(lv).cpu()
        totals_l, finite_l = totals.tolist(), finite.tolist()
        out: dict[int, Result] = {}
        stats = [{"train_loss": totals_l[i] / max(len(it.batches), 1), "steps": float(len(it.batches))}
                 for i, it in enumerate(items)]
        stacked = _stacked_finish(algorithm)
        if stacked is not None:
            ok = [i for i in range(k) if finite_l[i]]
            rows = state if len(ok) == k else {n: v[ok] for n, v in state.items()}
            try:
                updates = stacked(task, [(items[i].client, items[i].downlink) for i in ok], rows,
                                  [stats[i] for i in ok])
            except Exception as e:  # fall back to one finish per client, which fails (or not) on its own
                log.debug("vectorized: %s.finish_stacked failed (%s: %s); finishing client by client",
                          type(algorithm).__name__, type(e).__name__, e)
            else:
                out.update({items[i].pos: u for i, u in zip(ok, updates, strict=True)})
                for i in range(k):
                    if not finite_l[i]:  # diverged: the sequential run raises the same error at the same step
                        out[items[i].pos] = run_one(algorithm, task, items[i].client, items[i].downlink)
                return out
        model = copy.deepcopy(template)
        model.train()
        targets = model.state_dict(keep_vars=True)
        for i, it in enumerate(items):
            if not finite_l[i]:  # diverged: the sequential run raises the same error at the same step
                out[it.pos] = run_one(algorithm, task, it.client, it.downlink)
                continue
            with torch.no_grad():
                for name, value in state.items():
                    targets[name].copy_(value[i])
            if not model.training:  # as after local_train (a finish may have switched to eval)
                model.train()
            before = sys.getrefcount(model)
            try:
                out[it.pos] = algorithm.finish(  # type: ignore[attr-defined]  # LocalTraining, checked in prepare
                    task, it.downlink, it.client, model, stats[i])
            except Exception:
                out[it.pos] = run_one(algorithm, task, it.client, it.downlink)
            if sys.getrefcount(model) != before:  # finish kept the model: give the next client its own
                model = copy.deepcopy(template)
                model.train()
                targets = model.state_dict(keep_vars=True)
        return out
