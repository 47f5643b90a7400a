"""The ``vectorized`` executor: clients with the same program structure trained together
with ``torch.func``.

Clients whose programs (:class:`~kdfl.algorithms.program.Program`) declare the same
structure -- the same models (names, architectures, weight shapes), the same phases
(equal losses, settings, trained and frozen models, outputs, data and constant shapes)
and the same kinds of uploads -- are stacked along a leading client axis, and one
``vmap(grad(loss))`` call computes the gradients of all of them for one step of a phase;
the SGD update (momentum, weight decay, exactly as ``torch.optim.SGD``) runs on the
stacked tensors. Programs with several models and several phases batch the same way
(every model of the program is stacked; the phases run one after the other on the
stacked state). Batchability is *declared*: losses are values (frozen dataclasses), and
per-client tensors sit only in the models' weights, ``Phase.consts`` and the phase data.
What it reproduces of :func:`kdfl.algorithms.program.run_program`:

- the batch order: phase i of every client draws its batches from
  ``batch_indices(len(data), phase.local, client.generator(i))``;
- the number of steps: per phase, clients are ordered by their step count, so the
  clients still training at step t are a prefix of the chunk; finished clients leave it;
- ragged batches (the last batch of an epoch): batches are padded to the longest one and
  the loss is evaluated per sample (an inner ``vmap`` over the batch, each sample seen as
  a batch of one) and averaged over the real samples only. This equals the unpadded
  batch mean for any loss that is a batch mean of per-sample terms plus a term of the
  parameters (cross-entropy, the proximal term, batch-mean KD), which is checked on the
  first batch of every group (losses declaring ``per_sample_mean = False`` skip it and
  count as failing); losses that fail the check, and models with BatchNorm
  (whose batch statistics must not see padding), are bucketed instead: only clients with
  the same data sizes (hence identical batch sizes at every step) are stacked;
- BatchNorm keeps per-client running statistics (the stacked buffers are updated in
  place by the batched forward); GroupNorm and models without normalisation need nothing;
- the metrics (``<phase>_loss`` per phase, ``steps``); a client whose loss becomes
  NaN/inf is rerun by the reference runner, so it fails exactly as there;
- tracked statistics (``Phase.track``, e.g. per-label logit sums and label counts): the
  batched step returns the tracked model's logits as an auxiliary output of
  ``vmap(grad_and_value(loss, has_aux=True))`` and the tracker adds them for every
  active client at once (float64, padded rows masked out), exactly the update the
  reference loop makes per client; the :class:`~kdfl.algorithms.program.Tracked` upload
  and ``keep_state`` read each client's row;
- the uploads: weight deltas of all clients at once (one subtraction per tensor for the
  chunk), every other upload per client on a model that receives each client's trained
  state in turn (not even that for uploads that need no model: tracked statistics,
  constants); kept models are rows of the stacked state.

Everything else runs through the reference runner, one client at a time (logged at
debug level, with the reason): programs that say they are not batchable, losses that are
not hashable values, Adam, models with active dropout (their masks come from the global
RNG), groups of one, and any group whose batched run raises (it is rerun client by
client, so only a client that really fails becomes a
:class:`~kdfl.simulation.executors.ClientFailure`).

The batched templates run plain 1-D max-pools (``nn.MaxPool1d`` with stride equal to the
kernel) as a reshape and a max over the last axis: bit-identical values and gradients
(ties go to the first maximum either way), about 2x faster on a CPU for the large batches
of a chunk of clients (the mnist1d CNN's round, K = 100: about 16 % less CPU time).

The client axis is chunked so that the stacked parameters, optimizer state and
activations of a chunk stay under ``max_memory_mb``.

Tolerance: a vectorized client equals its sequential run up to float rounding (batched
matmuls sum in another order): about 1e-7 after one epoch of the models in kdfl's zoo;
the tests assert ``atol=1e-5``.
"""

from __future__ import annotations

import copy
import gc
import logging
import traceback
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from kdfl import tree
from kdfl.algorithms.program import (
    Const,
    Data,
    Delta,
    LabelStats,
    Phase,
    Program,
    Tracked,
    Trained,
    at_round,
    run_program,
)
from kdfl.losses import Batch, Outputs
from kdfl.simulation.executors import ClientFailure, Job, Result
from kdfl.train import _to, batch_indices, model_outputs
from kdfl.types import Algorithm, Client, ClientState, ClientUpdate, KdflError, Payload, Task, TensorData

log = logging.getLogger(__name__)


class _Unbatchable(Exception):
    """Why a program runs through the reference runner."""


@dataclass
class _Item:
    """One client of a group, ready to train."""

    pos: int  # index in the executor's job list
    client: Client
    program: Program
    datas: list[Data | TensorData] = field(default_factory=list)  # per phase (private data as it is)
    batches: list[list[Tensor]] = field(default_factory=list)  # per phase


def _tensors_key(values: Mapping[str, Any], memo: dict[int, Any] | None = None) -> tuple[Any, ...]:
    """The shapes and dtypes of per-client tensors (tensors or state dicts). ``memo``
    caches the key of each mapping by identity: clients of a round usually share the
    very same downlink weights, and computing their key 1000 times was measurable."""
    if memo is not None and id(values) in memo:
        return memo[id(values)]  # type: ignore[no-any-return]
    out: list[Any] = []
    for k, v in values.items():
        if isinstance(v, Tensor):
            out.append((k, tuple(v.shape), v.dtype))
        elif isinstance(v, Mapping) and all(isinstance(t, Tensor) for t in v.values()):
            out.append((k, _tensors_key(v, memo)))
        else:
            raise _Unbatchable(f"phase constant {k!r} is a {type(v).__name__}, not a tensor or a state dict")
    key = tuple(out)
    if memo is not None:
        memo[id(values)] = key
    return key


def _phase_key(ph: Phase, memo: dict[int, Any] | None) -> Hashable:
    """The batching-relevant structure of one phase (memoised by identity: algorithms
    usually hand every client the same Phase object)."""
    if memo is not None and id(ph) in memo:
        return memo[id(ph)]
    try:
        hash(ph.loss)
    except TypeError:
        raise _Unbatchable(f"the loss of phase {ph.name!r} is not a hashable value (declare it as a frozen "
                           "dataclass)") from None
    if ph.local.optimizer != "sgd":
        raise _Unbatchable(f"optimizer {ph.local.optimizer!r} is not batched (only SGD)")
    d = ph.data
    dkey = None if d is None else (tuple(d.x.shape[1:]), d.x.dtype, d.y is None,
                                   _tensors_key({k: v[:0] for k, v in d.targets.items()}))
    key = (ph.name, ph.loss, ph.local, ph.train, ph.frozen, ph.outputs, dkey, _tensors_key(ph.consts, memo),
           ph.track, ph.adapters)
    if memo is not None:
        memo[id(ph)] = key
    return key


def structure(program: Program, memo: dict[int, Any] | None = None) -> Hashable:
    """What must be equal for two clients' programs to train as one batched program
    (``memo``: see :func:`_tensors_key`; valid while the programs are alive)."""
    if program.batchable:
        raise _Unbatchable(program.batchable)
    models = tuple((name, m.arch, _tensors_key(m.weights, memo)) for name, m in program.models.items())
    phases = tuple(_phase_key(ph, memo) for ph in program.phases)
    uploads = tuple((type(u).__name__, getattr(u, "model", None), getattr(u, "key", None),
                     tuple(getattr(u, "payload", {}))) for u in program.upload)
    return models, phases, uploads, program.keep, program.keep_state is not None


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


class _MaxPoolLastAxis(nn.Module):
    """``nn.MaxPool1d(k)`` (stride k, no padding, no dilation) as a reshape and a max over
    the last axis: the same values and the same gradients (ties go to the first maximum
    in both), but about twice as fast forward and backward on a CPU once the clients'
    samples make one large batch (measured fwd+bwd on (3200, 16, 40): 22 ms vs 10 ms)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[-1] // self.k * self.k
        return x[..., :length].reshape(*x.shape[:-1], length // self.k, self.k).max(dim=-1).values if self.k > 1 else x


def _fast_pools(model: nn.Module) -> nn.Module:
    """The batched template of ``model``: its plain 1-D max-pools replaced by
    :class:`_MaxPoolLastAxis` (every other module as it is)."""

    def first(v: Any) -> int:
        return v if isinstance(v, int) else int(v[0])

    def kernel(m: nn.Module) -> int:
        """The kernel of a plain 1-D max-pool (stride = kernel, no padding, dilation or
        ceil mode, no indices); 0 for anything else."""
        if not isinstance(m, nn.MaxPool1d) or m.return_indices or m.ceil_mode:
            return 0
        k = first(m.kernel_size)
        return k if first(m.stride) == k and first(m.padding) == 0 and first(m.dilation) == 1 else 0

    for name, child in list(model.named_children()):
        k = kernel(child)
        if k:
            setattr(model, name, _MaxPoolLastAxis(k))
        else:
            _fast_pools(child)
    return model


class _Method(nn.Module):
    """``model.<method>`` as a forward, so ``functional_call`` can run it (``head``)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args: Tensor) -> Tensor:
        return getattr(self.model, self.method)(*args)  # type: ignore[no-any-return]


def _loss_on(models: Mapping[str, nn.Module], ph: Phase, data: Data | TensorData, rows: Tensor) -> Tensor:
    """The phase's loss on ``rows`` of ``data``, computed by the real modules."""

    def call(model: str, method: str, *args: Tensor) -> Tensor:
        return getattr(models[model], method)(*args)  # type: ignore[no-any-return]

    dev = next(models[ph.on_batch[0]].parameters()).device  # the probe runs where the models live
    x = data.x[rows].to(dev)
    values = {name: model_outputs(models[name], x, ph.outputs) for name in ph.on_batch}
    targets = getattr(data, "targets", {})
    batch = Batch(x, None if data.y is None else data.y[rows].to(dev), rows,
                  {k: v[rows].to(dev) for k, v in targets.items()})
    params = {name: dict(models[name].named_parameters()) for name in ph.forward}
    consts = {k: _to(v, dev) for k, v in ph.consts.items()}
    return ph.loss(Outputs(values, params, call), batch, consts).reshape(())


def _reference(task: Task, client: Client, program: Program) -> Result:
    try:
        return run_program(task, client, program)
    except Exception as e:  # a crashed client must not end the run
        return ClientFailure(client.id, f"{type(e).__name__}: {e}", traceback.format_exc())


def _stack(values: Sequence[Any], dev: torch.device) -> Any:
    """Per-client tensors (or state dicts) stacked on a leading client axis."""
    if isinstance(values[0], Tensor):
        return torch.stack([v.to(dev) for v in values])
    return {k: torch.stack([v[k].to(dev) for v in values]) for k in values[0]}


def _rows(state: dict[str, dict[str, Tensor]], index: Tensor) -> dict[str, dict[str, Tensor]]:
    return {m: {n: v[index] for n, v in d.items()} for m, d in state.items()}


class Vectorized:
    """Trains the clients of a round that share a program structure as one batched program.

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
        self.reasons: dict[int, str] = {}  # client id -> why it ran sequentially in the last run()

    # -- public ---------------------------------------------------------------------------
    def run(self, algorithm: Algorithm, task: Task, jobs: Sequence[Job]) -> list[Result]:
        # A round makes a few small objects per client (its program, keys, payload dicts);
        # with 1000 clients they set off the cyclic garbage collector's passes over every
        # live object many times a round. Measured (digits, K = 1000, round time including
        # the collection that follows): CNN 138-172 ms paused vs 181-205 ms not, MLP 68-72
        # vs 87-98 ms. Nothing in a round needs a cycle collected before it ends.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(algorithm, task, jobs)
        finally:
            if enabled:
                gc.enable()

    def _run(self, algorithm: Algorithm, task: Task, jobs: Sequence[Job]) -> list[Result]:
        results: list[Result | None] = [None] * len(jobs)
        self.batched, self.reasons = 0, {}
        groups: dict[Any, list[_Item]] = {}
        memo: dict[int, Any] = {}
        programs = []  # alive until the end of the grouping: ``memo`` keys are object ids
        for pos, (client, downlink) in enumerate(jobs):
            try:
                program = at_round(algorithm.client_program(task, downlink, client), client)
            except Exception as e:
                results[pos] = ClientFailure(client.id, f"{type(e).__name__}: {e}", traceback.format_exc())
                continue
            programs.append(program)
            try:
                key = structure(program, memo)
                broken = [m.arch for m in program.models.values() if m.arch in self._broken]
                if broken:
                    raise _Unbatchable(f"architecture {broken[0]!r} could not be batched earlier: "
                                       f"{self._broken[broken[0]]}")
                declined = self.declines(task, program)
                if declined:
                    raise _Unbatchable(declined)
            except _Unbatchable as why:
                self._sequential_one(task, results, pos, client, program, str(why))
                continue
            groups.setdefault(key, []).append(_Item(pos, client, program))
        for key, items in groups.items():
            for pos, res in self._run_group(task, items, key).items():
                results[pos] = res
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def declines(self, task: Task, program: Program) -> str:
        """Why a program that could batch runs one client at a time all the same ("": it
        batches). This executor batches whatever it can; subclasses decline by structure
        (see :class:`kdfl.simulation.auto.Batched`)."""
        return ""

    def _sequential_one(self, task: Task, results: list[Result | None], pos: int, client: Client,
                        program: Program, why: str) -> None:
        log.debug("vectorized: client %d runs sequentially: %s", client.id, why)
        self.reasons[client.id] = why
        results[pos] = _reference(task, client, program)

    def _sequential(self, task: Task, items: Sequence[_Item], why: str) -> dict[int, Result]:
        for it in items:
            self.reasons[it.client.id] = why
        return {it.pos: _reference(task, it.client, it.program) for it in items}

    # -- grouping -------------------------------------------------------------------------
    def _run_group(self, task: Task, items: list[_Item], key: Any) -> dict[int, Result]:
        if len(items) < self.min_group:
            return self._sequential(task, items, f"a group of {len(items)} (min_group={self.min_group})")
        lead = items[0].program
        templates = {name: _fast_pools(task.new_model(m.arch)) for name, m in lead.models.items()}
        for name, template in templates.items():
            why = _model_issue(template)
            if why:
                self._broken[lead.models[name].arch] = why
                return self._sequential(task, items, why)
        for it in items:
            it.datas = [it.client.data if ph.data is None else ph.data for ph in it.program.phases]
            it.batches = [list(batch_indices(len(d), ph.local, it.client.generator(i)))
                          for i, (ph, d) in enumerate(zip(it.program.phases, it.datas, strict=True))]
        # bucket by data sizes when padding is not allowed (BatchNorm, non-decomposable losses)
        ragged = any(len({len(b) for it in items for b in it.batches[p]}) > 1 for p in range(len(lead.phases)))
        bucket = any(_has_batchnorm(t) for t in templates.values())
        if ragged and not bucket and key not in self._decomposable_by_key:
            if len(self._decomposable_by_key) > 256:
                self._decomposable_by_key.clear()
            self._decomposable_by_key[key] = self._decomposable(templates, items[0])  # once per structure
        if ragged and not bucket and not self._decomposable_by_key.get(key, False):
            log.debug("vectorized: a loss of %s is not a batch mean of per-sample terms; bucketing", key[0])
            bucket = True
        if not bucket:
            return self._train_group(task, items, templates)
        subgroups: dict[tuple[int, ...], list[_Item]] = {}
        for it in items:
            subgroups.setdefault(tuple(len(d) for d in it.datas), []).append(it)
        out: dict[int, Result] = {}
        for sub in subgroups.values():
            if len(sub) < self.min_group:
                out.update(self._sequential(task, sub, "no other client with the same data sizes (BatchNorm or "
                                                       "a loss that is not a per-sample mean)"))
            else:
                out.update(self._train_group(task, sub, templates))
        return out

    def _decomposable(self, templates: Mapping[str, nn.Module], it: _Item) -> bool:
        """Whether every phase's loss of a padded batch can be computed per sample."""
        if any(getattr(ph.loss, "per_sample_mean", True) is False for ph in it.program.phases):
            return False
        models = {name: copy.deepcopy(t) for name, t in templates.items()}
        for name, m in it.program.models.items():
            models[name].load_state_dict(m.weights)
        for p, ph in enumerate(it.program.phases):
            idx = next((b for b in it.batches[p] if len(b) > 1), None)
            if idx is None:
                continue
            with torch.no_grad():
                for name in ph.train:
                    models[name].train()
                for name in ph.frozen:
                    models[name].eval()
                full = _loss_on(models, ph, it.datas[p], idx)
                mean = torch.stack([_loss_on(models, ph, it.datas[p], idx[i : i + 1]) for i in range(len(idx))]).mean()
            if not bool(torch.isclose(full.float(), mean.float(), rtol=1e-5, atol=1e-6)):
                return False
        return True

    # -- batched training -----------------------------------------------------------------
    def _chunk_size(self, templates: Mapping[str, nn.Module], items: Sequence[_Item]) -> int:
        n_params = sum(p.numel() for t in templates.values() for p in [*t.parameters(), *t.buffers()])
        data = items[0].datas[0] if items[0].datas else None
        bs = max((len(b) for it in items for b in it.batches[0][:1]), default=1) if items[0].batches else 1
        act = 0
        if data is not None and len(data):
            x1 = data.x[:1].to(next(iter(templates.values())).parameters().__next__().device)
            adapters = {m for ph in items[0].program.phases for m in ph.adapters}
            act = sum(_activation_values(t, x1) for name, t in templates.items() if name not in adapters)
            act += data.x[0].numel()
        # p, grad, momentum, update temporaries; forward + backward activations (x3 for vmap copies)
        per_client = 4 * (5 * n_params + 3 * bs * act)
        return max(1, min(self.max_chunk, int(self.max_memory_mb * 2**20 // max(per_client, 1))))

    def _train_group(self, task: Task, items: list[_Item], templates: Mapping[str, nn.Module]) -> dict[int, Result]:
        items = sorted(items, key=lambda it: -len(it.batches[0]) if it.batches else 0)  # phase 0: a prefix
        chunk = self._chunk_size(templates, items)
        out: dict[int, Result] = {}
        for s in range(0, len(items), chunk):
            part = items[s : s + chunk]
            try:
                state, totals, finite, tracked = self._train_chunk(task, part, templates)
            except Exception as e:  # e.g. an op without a batching rule: rerun one by one
                why = f"batched training failed ({type(e).__name__}: {e})"
                log.debug("vectorized: %s; rerunning %d clients sequentially", why, len(part))
                if s == 0:
                    for m in part[0].program.models.values():
                        self._broken[m.arch] = why
                out.update(self._sequential(task, part, why))
                continue
            self.batched += len(part)
            out.update(self._finish(task, part, templates, state, totals, finite, tracked))
        return out

    def _train_chunk(self, task: Task, items: list[_Item], templates: Mapping[str, nn.Module]
                     ) -> tuple[dict[str, dict[str, Tensor]], Tensor, Tensor, dict[str, LabelStats]]:
        """Train the clients of ``items`` together through every phase.

        Returns the stacked final state (model -> name -> (k, *shape)), the loss totals
        (k, phases), whether each client's losses stayed finite (k,) and what the
        tracking phases tracked (phase name -> stats with a leading (k,) axis).
        """
        dev, k = task.device, len(items)
        lead = items[0].program
        state: dict[str, dict[str, Tensor]] = {}
        for name, decl in lead.models.items():
            state[name] = {}
            for n in decl.weights:
                ws = [it.program.models[name].weights[n] for it in items]
                if all(w is ws[0] for w in ws):  # the shared global model: one copy, broadcast
                    state[name][n] = ws[0].to(dev).unsqueeze(0).expand(k, *ws[0].shape).clone()
                else:
                    state[name][n] = torch.stack([w.to(dev) for w in ws])
        # kept on the device and read once in _finish (a read per step would wait for its kernels)
        totals = torch.zeros(k, len(lead.phases), dtype=torch.float64, device=dev)
        finite = torch.ones(k, dtype=torch.bool, device=dev)
        tracked: dict[str, LabelStats] = {}
        for p, ph in enumerate(lead.phases):
            steps = [len(it.batches[p]) for it in items]
            order = sorted(range(k), key=lambda i: -steps[i])  # still-training clients form a prefix
            if order == list(range(k)):
                per_step, stats = self._train_phase(task, items, p, ph, state, templates)  # (m_t,): clients 0..m_t-1
                for lv in per_step:
                    totals[: lv.shape[0], p] += lv.double()
                    finite[: lv.shape[0]] &= torch.isfinite(lv)
                if stats is not None:
                    tracked[ph.name] = stats
                continue
            perm = torch.tensor(order)
            st = _rows(state, perm.to(dev))
            per_step, stats = self._train_phase(task, [items[i] for i in order], p, ph, st, templates)
            inverse = torch.argsort(perm).to(dev)
            state = _rows(st, inverse)
            if stats is not None:
                tracked[ph.name] = stats[inverse]
            for lv in per_step:
                rows = perm[: lv.shape[0]].to(dev)
                totals[rows, p] += lv.double()
                finite[rows] &= torch.isfinite(lv)
        return state, totals, finite, tracked

    def _train_phase(self, task: Task, items: list[_Item], p: int, ph: Phase, state: dict[str, dict[str, Tensor]],
                     templates: Mapping[str, nn.Module]) -> tuple[list[Tensor], LabelStats | None]:
        """One phase for clients sorted by their step count; updates ``state`` in place.
        Returns per step the losses of the clients active then ((m_t,): the first m_t),
        and the phase's tracked statistics ((k, ...), None when it tracks nothing)."""
        dev, cfg = task.device, ph.local
        param_names = {m: {n for n, _ in templates[m].named_parameters()} for m in ph.forward}
        trainable = {m: [n for n, prm in templates[m].named_parameters() if prm.requires_grad] for m in ph.train}
        frozen = {m: [n for n in state[m] if n not in trainable.get(m, ())] for m in ph.forward}
        for m in ph.train:
            templates[m].train()
        for m in ph.frozen:
            templates[m].eval()

        # constants: shared ones (the same object for every client) stay closed over
        consts = [it.program.phases[p].consts for it in items]
        shared = {c: v for c, v in consts[0].items() if all(cs[c] is v for cs in consts)}
        own = [c for c in consts[0] if c not in shared]
        stacked_consts = {c: _stack([cs[c] for cs in consts], dev) for c in own}
        shared = {c: (v.to(dev) if isinstance(v, Tensor) else {n: t.to(dev) for n, t in v.items()})
                  for c, v in shared.items()}

        # the data of the chunk, concatenated; batches index into it
        datas = [it.datas[p] for it in items]
        offsets = [0]
        for d in datas[:-1]:
            offsets.append(offsets[-1] + len(d))
        xs = torch.cat([d.x for d in datas]).to(dev)
        labelled = datas[0].y is not None
        ys = torch.cat([d.y for d in datas if d.y is not None]).to(dev) if labelled else torch.zeros(len(xs), dtype=torch.long,
                                                                                     device=dev)
        tgs = {t: torch.cat([d.targets[t] for d in datas]).to(dev)  # type: ignore[union-attr]
               for t in getattr(datas[0], "targets", {})}
        kwargs = {"features": "features" in ph.outputs, "activations": "activations" in ph.outputs}
        track = ph.track
        tracked = None if track is None else track.start(len(items), device=dev)

        def client_loss(pr: dict[str, dict[str, Tensor]], fz: dict[str, dict[str, Tensor]], x: Tensor, y: Tensor,
                        idx: Tensor, tg: dict[str, Tensor], mask: Tensor | None, cs: dict[str, Any]
                        ) -> Tensor | tuple[Tensor, Tensor]:
            values: dict[str, Any] = {}
            params: dict[str, dict[str, Tensor]] = {}
            buffers: dict[str, dict[str, Tensor]] = {}
            for m in ph.forward:
                params[m] = {**pr.get(m, {}), **{n: fz[m][n] for n in fz[m] if n in param_names[m]}}
                buffers[m] = {n: fz[m][n] for n in fz[m] if n not in param_names[m]}
                if m in ph.adapters:  # the loss applies it (out.apply)
                    continue
                out = functional_call(templates[m], (params[m], buffers[m]), (x,), kwargs if ph.outputs else None)
                values[m] = out if ph.outputs else {"logits": out}

            def call(model: str, method: str, *args: Tensor) -> Tensor:
                wrapped = {f"model.{n}": v for n, v in {**params[model], **buffers[model]}.items()}
                return functional_call(_Method(templates[model], method), wrapped, args)  # type: ignore[no-any-return]

            constants = {**shared, **cs}
            if mask is None:
                loss = ph.loss(Outputs(values, params, call), Batch(x, y if labelled else None, idx, tg), constants)
            else:
                def one(vi: dict[str, Any], xi: Tensor, yi: Tensor, ii: Tensor, ti: dict[str, Tensor]) -> Tensor:
                    batched = torch.utils._pytree.tree_map(lambda t: t[None], vi)
                    b = Batch(xi[None], yi[None] if labelled else None, ii[None], {n: t[None] for n, t in ti.items()})
                    return ph.loss(Outputs(batched, params, call), b, constants).reshape(())

                per = vmap(one)(values, x, y, idx, tg)  # (B,)
                w = mask.to(per.dtype)
                loss = (per * w).sum() / w.sum()
            if track is None:
                return loss
            return loss, values[track.model]["logits"].detach()  # auxiliary output: what the tracker adds

        aux = track is not None
        g_fn = vmap(grad_and_value(client_loss, has_aux=aux), in_dims=(0, 0, 0, 0, 0, 0, 0, 0))
        g_fn_full = vmap(grad_and_value(client_loss, has_aux=aux), in_dims=(0, 0, 0, 0, 0, 0, None, 0))
        momentum: dict[str, dict[str, Tensor]] = {}
        losses: list[Tensor] = []
        steps = [len(it.batches[p]) for it in items]
        lr, mom, wd, clip = cfg.lr, cfg.momentum, cfg.weight_decay, cfg.clip_grad_norm
        for t in range(steps[0] if steps else 0):
            active = sum(1 for s in steps if s > t)
            bidx = [items[i].batches[p][t] for i in range(active)]
            bmax = max(len(b) for b in bidx)
            ragged = any(len(b) != bmax for b in bidx)
            local = torch.zeros(active, bmax, dtype=torch.long)
            mask = torch.zeros(active, bmax, dtype=torch.bool) if ragged else None
            for i, b in enumerate(bidx):
                local[i, : len(b)] = b
                if mask is not None:
                    mask[i, : len(b)] = True
            glob = (local + torch.tensor(offsets[:active]).unsqueeze(1)).to(dev)
            x, y, tg = xs[glob], ys[glob], {n: v[glob] for n, v in tgs.items()}
            local = local.to(dev)
            pr = {mdl: {n: state[mdl][n][:active] for n in names} for mdl, names in trainable.items()}
            fz = {mdl: {n: state[mdl][n][:active] for n in names} for mdl, names in frozen.items()}
            cs = {c: (v[:active] if isinstance(v, Tensor) else {n: u[:active] for n, u in v.items()})
                  for c, v in stacked_consts.items()}
            dmask = None if mask is None else mask.to(dev)
            grads, value = (g_fn_full if dmask is None else g_fn)(pr, fz, x, y, local, tg, dmask, cs)
            if tracked is not None:  # the tracked logits (active, B, C), added for every active client at once
                assert track is not None
                loss, logits = value
                track.update(tracked[:active], logits, y, dmask)
            else:
                loss = value
            losses.append(loss.detach())
            with torch.no_grad():  # torch.optim.SGD (single-tensor path), on the stacked tensors
                for mdl, names in trainable.items():
                    if clip:  # torch.nn.utils.clip_grad_norm_ per client and model: coef = c / (norm + 1e-6), <= 1
                        norm = torch.stack([grads[mdl][n].reshape(active, -1).norm(dim=1) for n in names]).norm(dim=0)
                        coef = (clip / (norm + 1e-6)).clamp(max=1.0)
                        for n in names:
                            grads[mdl][n] = grads[mdl][n] * coef.view(-1, *([1] * (grads[mdl][n].dim() - 1)))
                    for n in names:
                        d_p = grads[mdl][n]
                        if wd != 0:
                            d_p = d_p.add(pr[mdl][n], alpha=wd)
                        if mom != 0:
                            if t == 0:
                                momentum.setdefault(mdl, {})[n] = torch.clone(d_p).detach()
                                d_p = momentum[mdl][n]
                            else:
                                buf = momentum[mdl][n][:active]
                                buf.mul_(mom).add_(d_p)
                                d_p = buf
                        pr[mdl][n].add_(d_p, alpha=-lr)
        return losses, tracked

    def _finish(self, task: Task, items: list[_Item], templates: Mapping[str, nn.Module],
                state: dict[str, dict[str, Tensor]], totals: Tensor, finite: Tensor,
                tracked: Mapping[str, LabelStats]) -> dict[int, Result]:
        """The clients' updates from the stacked trained state and tracked statistics
        (diverged clients rerun)."""
        lead = items[0].program
        out: dict[int, Result] = {}
        finite_l = finite.tolist()  # one conversion, not one tensor read per client
        ok = [i for i, f in enumerate(finite_l) if f]
        for i, f in enumerate(finite_l):
            if not f:  # diverged: the reference run raises the same error at the same step
                out[items[i].pos] = _reference(task, items[i].client, items[i].program)
        if not ok:
            return out
        rows = state if len(ok) == len(items) else _rows(state, torch.tensor(ok, device=task.device))
        parts: list[list[Payload]] = [[{} for _ in lead.upload] for _ in ok]
        per_client = []
        for j, up in enumerate(lead.upload):
            if isinstance(up, Delta):
                deltas = Delta.make_stacked([items[i].program.upload[j] for i in ok], rows[up.model])  # type: ignore[misc]
                for r, d in enumerate(deltas):
                    parts[r][j] = d
            else:
                per_client.append(j)
        keep_state = lead.keep_state is not None
        kept_by_fn: dict[int, ClientState] = {}
        if per_client or keep_state:
            # uploads of tracked statistics and constants need no model loaded with the client's state
            load = keep_state or any(not isinstance(lead.upload[j], (Tracked, Const)) for j in per_client)
            models = Trained({name: copy.deepcopy(t) for name, t in templates.items()} if load else {})
            targets = {name: m.state_dict(keep_vars=True) for name, m in models.items()}
            for r, i in enumerate(ok):
                models.tracked = {name: stats[i] for name, stats in tracked.items()}
                with torch.no_grad():
                    for name, values in (rows.items() if load else ()):
                        for n, v in values.items():
                            targets[name][n].copy_(v[r])
                for m in models.values():
                    m.train()  # as after local_train (an upload may switch to eval)
                try:
                    for j in per_client:
                        parts[r][j] = items[i].program.upload[j].make(models)
                    fn = items[i].program.keep_state
                    if fn is not None:
                        kept_by_fn[r] = fn(models, ClientState({m: tree.state_of(models[m]) for m in lead.keep}))
                except Exception as e:
                    out[items[i].pos] = ClientFailure(items[i].client.id, f"{type(e).__name__}: {e}",
                                                      traceback.format_exc())
        totals_l = totals.tolist()  # one conversion, not one float() per client and phase
        names = [f"{ph.name}_loss" for ph in lead.phases]
        for r, i in enumerate(ok):
            it, total = items[i], totals_l[i]
            if it.pos in out:
                continue
            if len(parts[r]) == 1:
                payload = parts[r][0]  # made for this client alone (no copy needed)
            else:
                payload = {}
                for part in parts[r]:
                    payload.update(part)
            steps = [len(b) for b in it.batches]
            metrics = {name: total[p] / max(steps[p], 1) for p, name in enumerate(names)}
            metrics["steps"] = float(sum(steps))
            kept = (ClientState({m: {n: v[r].clone() for n, v in rows[m].items()} for m in it.program.keep})
                    if it.program.keep else None)
            kept = kept_by_fn.get(r, kept)
            out[it.pos] = ClientUpdate(it.client.id, len(it.client.data), payload, metrics, kept)
        return out
