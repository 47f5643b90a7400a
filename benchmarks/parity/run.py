"""Parity runs: kdfl against PFLlib (TsingZ0/PFLlib) on the same inputs, side by side.

    python benchmarks/parity/run.py --reference-dir DIR \\
        --algorithms fedavg,fedprox,fedproto,fedgen,fedkd,fml,fedntd,fd,fedgen-as-pfllib

``DIR`` is a local PFLlib checkout (never vendored here; its commit is read with ``git
rev-parse HEAD``, or given with ``--reference-commit`` for an exported tree). For every
algorithm and seed both sides get:

- the same data and split: mnist1d (``data.num_samples`` 10,000, the package's own
  train/test split; kdfl's 8,000-row training pool), 20 clients, Dirichlet(0.1) built by
  kdfl for the seed, each client's rows split 75/25 into training and its own test split
  (``data.client_holdout = 0.25``, PFLlib's ``train_ratio``), exported in PFLlib's format
  (:mod:`pfllib`);
- the same model and initial weights: kdfl's ``mlp:hidden=128``; PFLlib runs the same
  layers (``shim/parity_models.py``) loaded with kdfl's initial global weights;
- the same optimizer (plain SGD, no momentum, no weight decay), learning rate, batch size,
  local epochs, full participation (all 20 clients every round; PFLlib's client sampling
  is not seeded, so partial participation could not be matched) and rounds;
- the same evaluation: PFLlib's ``Server.evaluate`` (correct predictions summed over every
  client's own test split / their total size, each client with the model it holds). kdfl's
  side is its per-client evaluation (``run.client_eval_every = 1``) on the same held-out
  splits, each client's accuracy weighted by its split's size, which is that same ratio.

PFLlib evaluates before each round (entry r = the model after r aggregations, r = 0..R);
kdfl after each round (r = 1..R): the table aligns them on r.

Verdict per algorithm: *parity* when |mean final accuracy (PFLlib) - mean final accuracy
(kdfl)| is below the seeds' spread (the larger of the two sides' max - min of the final
accuracy over the seeds); otherwise the difference, with the causes found by reading both
sides (``NOTES``), which the report prints under the table.

Results are cached in ``runs/parity/`` (gitignored): a finished side of a run is read back,
not run again. The report goes to ``benchmarks/results/parity.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import pfllib  # noqa: E402

DATASET = "kdflmnist1d"  # no "MNIST" in it: PFLlib's main.py picks models by that substring
KDFL_DIR = "kdfl"  # where a kdfl run goes under <seed>/<algorithm>/ ("kdfl-global-init" with --personal-init global)


def use_global_personal_init() -> None:
    """Diagnostic (``--personal-init global``): kdfl's FedProto, FML and FD clients start their
    personal models from the initial *global* weights, as every PFLlib client does (each
    copies the one ``args.model``, ``clients/clientbase.py:19``), instead of kdfl's own
    per-client draw (``kdfl.algorithms.program.fresh_weights``). Done by replacing the name
    ``fresh_weights`` in those two modules inside this process only; kdfl is not changed."""
    import kdfl.algorithms.fd as fd
    import kdfl.algorithms.fedproto as fedproto
    import kdfl.algorithms.fml as fml
    from kdfl.algorithms.kit.weights import init_params

    def global_init(task, client_id, arch):  # noqa: ANN001, ANN202 (fresh_weights' signature)
        return init_params(task, arch)

    fedproto.fresh_weights = global_init  # type: ignore[assignment]
    fd.fresh_weights = global_init  # type: ignore[assignment]
    fml.fresh_weights = global_init  # type: ignore[assignment]


@dataclass(frozen=True)
class Spec:
    """One algorithm on both sides: PFLlib's ``-algo`` and extra flags, kdfl's overrides
    (``{rounds}`` and ``{lr}`` are filled in), kdfl's per-client metric compared, what is
    evaluated, and the differences found by reading both sides."""

    pfllib: str
    pfllib_flags: tuple[str, ...] = ()
    kdfl: tuple[str, ...] = ()
    metric: str = "accuracy"
    evaluated: str = "the global model on every client's test split"
    shared: str = ""  # kdfl's per-client metric of the shared model, compared with the model PFLlib saves
    same_reference_as: str = ""  # a kdfl variant compared with another entry's PFLlib run (reused, not rerun)
    notes: tuple[str, ...] = field(default_factory=tuple)


P = "PFLlib `system/flcore/"  # PFLlib paths below are relative to its system/flcore/
COMMON_NOTES = (
    f"{P}clients/clientbase.py:59`: the training loader drops the last incomplete batch "
    "(`drop_last=True`); kdfl trains on it (`src/kdfl/train.py`, `batch_indices`). With batch 10 a client "
    "of n rows takes floor(n/10) steps in PFLlib and ceil(n/10) in kdfl per epoch.",
)

SPECS: dict[str, Spec] = {
    "fedavg": Spec("FedAvg", (), ('algorithm.name="fedavg"',), notes=COMMON_NOTES),
    "fedprox": Spec("FedProx", ("-mu", "0.01"), ('algorithm.name="fedprox"', "algorithm.mu=0.01"),
                    notes=COMMON_NOTES),
    "fedproto": Spec(
        "FedProto", ("-lam", "1.0"), ('algorithm.name="fedproto"', "algorithm.lam=1.0"), metric="proto_accuracy",
        evaluated="each client's own model with nearest-global-prototype inference on its own test split "
                  "(kdfl: `proto_accuracy`); round 1 in PFLlib already has prototypes, before them it scores 0",
        notes=COMMON_NOTES + (
            f"{P}clients/clientproto.py:56,67`: a client's uploaded prototypes are the means of the features of "
            "the training forward passes of all local epochs (model in train mode, changing as it trains); "
            f"`collect_protos` ({P}clients/clientproto.py:79`), which recomputes them after training, is never "
            "called by `servers/serverproto.py`. kdfl computes them after training in eval mode "
            "(`src/kdfl/algorithms/fedproto.py`, docstring: \"PFLlib does the same in collect_protos\", which "
            "is not what PFLlib's server runs).",
            "Personal models' initial weights: every PFLlib client copies the one `args.model` "
            f"({P}clients/clientbase.py:19`), so all start from kdfl's initial global weights here; kdfl draws "
            "a fresh initialisation per client (`fresh_weights(task, client.id, ...)`); `--personal-init global` "
            "runs kdfl with PFLlib's.",
        )),
    "fedgen": Spec(
        "FedGen", ("-nd", "32", "-hd", "256", "-se", "50", "-glr", "0.0003"), ('algorithm.name="fedgen"',),
        notes=COMMON_NOTES + (
            f"{P}clients/clientgen.py:57-60`: PFLlib's client loss is CE(f(x), y) + CE(head(G(y')), y') with y' "
            "drawn from all clients' labels: no teacher KL term, no alpha/beta weights and no decay of them; "
            f"{P}servers/servergen.py:143-160`: the generator is trained on CE of the weighted clients' heads "
            "only (no diversity loss), Adam, on batches of the local batch size. The FedGen paper and its "
            "authors' code (zhuangdizhu/FedGen), which kdfl follows, have alpha*KL + beta*CE with decay and a "
            "diversity term: this is PFLlib deviating from the paper, not kdfl.",
        )),
    "fedntd": Spec(
        "FedNTD", ("-bt", "1.0", "-tau", "3.0"),
        ('algorithm.name="fedntd"', "algorithm.beta=1.0", "algorithm.temperature=3.0"),
        notes=COMMON_NOTES + (
            f"{P}clients/clientntd.py:18,63-75`: `_ntd_loss` is tau^2 * `nn.KLDivLoss(reduction=\"batchmean\")` between the "
            "not-true softmaxes at temperature tau, the global model's side without gradient; kdfl's default "
            "`t2 = True` (commit d4d2901) matches. tau = 3 here, where the tau^2 factor matters (9x).",
        )),
    "fd": Spec(
        "FD", ("-lam", "1.0"), ('algorithm.name="fd"', "algorithm.gamma=1.0"),
        evaluated="each client's own model on its own test split",
        notes=COMMON_NOTES + (
            f"{P}clients/clientfd.py:50`: at PFLlib d832e76 (\"Update clientfd.py\", 2025-11-29) the distillation "
            "term is `nn.CrossEntropyLoss()(output, logit_new)` with the teacher's *raw* per-label logits as the "
            "soft target (not a distribution: rows need not sum to 1 and may be negative); its parent commit "
            "used `logit_new.softmax(dim=1)`, which is kdfl's CE(softmax(F_y), f(x)) at T = 1. kdfl's FD "
            "docstring says PFLlib uses CE + lambda*MSE, which neither commit does.",
            f"{P}clients/clientfd.py:52-54`: per-label logits are the means of the training forward passes "
            "(all local epochs), as kdfl's.",
            "Personal models' initial weights: PFLlib's copy `args.model`; kdfl's are a fresh per-client "
            "draw; `--personal-init global` runs kdfl with PFLlib's.",
        )),
    "fedgen-as-pfllib": Spec(
        "FedGen", ("-nd", "32", "-hd", "256", "-se", "50", "-glr", "0.0003"),
        ('algorithm.name="fedgen"', "algorithm.alpha=1.0", "algorithm.beta=0.0", "algorithm.decay=1.0",
         "algorithm.diversity=0.0", "algorithm.gen_lr_decay=1.0", "algorithm.gen_weight_decay=0.0",
         "algorithm.gen_batch_size={batch_size}", "algorithm.gen_steps=50"),
        same_reference_as="fedgen",
        notes=COMMON_NOTES + (
            "kdfl's FedGen set to PFLlib's variant (a diagnostic of the FedGen row): client loss CE + 1 * CE on "
            "generated latents (alpha 1, beta 0: no KL term, no decay), generator trained without the diversity "
            "term, Adam without weight decay or lr decay, batches of the local batch size, 50 steps.",
            "Left different: PFLlib draws a batch of generated labels per step from all clients' labels with "
            f"multiplicity ({P}clients/clientgen.py:57`) and runs the generator in train mode (BatchNorm batch "
            f"statistics; it is left in train mode after {P}servers/servergen.py:144`); kdfl draws one "
            "generated pair per private sample before training, labels uniform over the qualified ones, "
            "generator in eval mode (`src/kdfl/algorithms/fedgen.py`, docstring).",
        )),
    "fedkd": Spec(
        "FedKD", ("-mlr", "{lr}", "-Ts", "0.95", "-Te", "0.98"),
        ('algorithm.name="fedkd"', "algorithm.energy_rounds={rounds}"),
        evaluated="each client's mentor (its private model) on its own test split", shared="mentee_accuracy",
        notes=COMMON_NOTES + (
            "kdfl's FedKD (since commit c244368) follows PFLlib's client on the points that matter: "
            f"`nn.KLDivLoss()`'s reduction ({P}clients/clientkd.py:31,66-67`), the weight 1/(CE_mentor + "
            "CE_mentee) and the KL targets not detached, the hidden MSE through a learned map counted twice "
            f"(clientkd.py:68-69`), gradient norms clipped at 10 (clientkd.py:80-82`), the mentor starting from "
            f"the mentee's initial weights (clientkd.py:16`), the uniform average ({P}servers/serverkd.py:126`) "
            "and the energy schedule (serverkd.py:60`).",
            "Left different (kdfl's docstring, `src/kdfl/algorithms/fedkd.py` lines 52-55): an eps in the "
            "adaptive weight, and kdfl's map has a bias where PFLlib's `W_h` has none. The shared-model row "
            "compares PFLlib's saved global model, the uncompressed average before its SVD "
            f"({P}servers/serverkd.py:51-52`), with kdfl's `mentee_accuracy`.",
        )),
    "fml": Spec(
        "FML", ("-al", "0.5", "-bt", "0.5"), ('algorithm.name="fml"', "algorithm.alpha=0.5", "algorithm.beta=0.5"),
        evaluated="each client's personal (local) model on its own test split", shared="meme_accuracy",
        notes=COMMON_NOTES + (
            "kdfl's FML (since commit c814e9f) reduces the KL as PFLlib's `nn.KLDivLoss()` "
            f"({P}clients/clientfml.py:24,49-50`: mean over B*C) and clips gradient norms at 10 (clientfml.py:57-58`).",
            "Left different: PFLlib's KL targets `F.softmax(output_g)` / `F.softmax(output)` are not detached and "
            "both losses are back-propagated (clientfml.py:49-50,54-55`), so each model also gets the other's KL "
            "gradient; kdfl detaches the target (deep mutual learning; `src/kdfl/losses.py`, `mutual_kl`). "
            f"PFLlib averages the memes uniformly ({P}servers/serverfml.py:96-98`); kdfl weights the deltas by "
            "sample counts (`kit/weights.py::aggregate_deltas`) and has no uniform option for FML.",
            "Personal models' initial weights: PFLlib's copy `args.model` (the global initial weights); kdfl's "
            "are a fresh per-client draw; `--personal-init global` runs kdfl with PFLlib's.",
        )),
}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"rounds": args.rounds, "lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
            "hidden": args.hidden, "alpha": args.alpha, "clients": 20, "num_samples": 10000, "holdout": 0.25}


def kdfl_overrides(spec: Spec, seed: int, s: dict[str, Any]) -> list[str]:
    return [
        f"run.seed={seed}", f"run.rounds={s['rounds']}", "run.clients_per_round=0", "run.client_eval_every=1",
        "run.threads=1", 'data.name="mnist1d"', f"data.num_samples={s['num_samples']}",
        f"data.num_clients={s['clients']}", f"data.client_holdout={s['holdout']}", 'partition.name="dirichlet"',
        f"partition.alpha={s['alpha']}", f'model.arch="mlp:hidden={s["hidden"]}"', f"local.epochs={s['epochs']}",
        f"local.batch_size={s['batch_size']}", f"local.lr={s['lr']}", "local.momentum=0.0",
        *(o.format(**s) for o in spec.kdfl),
    ]


def prepare(seed: int, s: dict[str, Any], work: Path) -> tuple[Path, list[int]]:
    """Export the seed's split in PFLlib's format and write the parity model's spec with
    kdfl's initial global weights; returns (the PFLlib working root, test-split sizes)."""
    import numpy as np
    import torch

    from kdfl import config
    from kdfl.algorithms.kit.weights import init_params
    from kdfl.experiment import build

    root = work / f"seed{seed}"
    spec_path = root / "model.json"
    sizes_path = root / "test_sizes.json"
    cfg = config.load(None, kdfl_overrides(SPECS["fedavg"], seed, s))
    fed = build(cfg)
    assert fed.holdouts is not None
    train = fed.task.train
    sys.path.insert(0, str(HERE / "shim"))
    from parity_models import KDFL_TO_PFLLIB

    init = init_params(fed.task)

    def write_model_spec() -> None:
        in_dim = int(torch.tensor(fed.task.input_shape).prod())
        spec_path.write_text(json.dumps({"in_dim": in_dim, "hidden": s["hidden"], "num_classes": fed.task.num_classes,
                                         "init": str((root / "init.pt").resolve())}))

    if spec_path.is_file() and sizes_path.is_file():
        # an export made earlier (maybe by another kdfl version): reuse it only if this kdfl
        # builds the same split and initial weights, else the cached PFLlib runs are of other inputs
        saved = torch.load(root / "init.pt")
        same = (json.loads(sizes_path.read_text()) == [len(h) for h in fed.holdouts]
                and all(torch.equal(saved[KDFL_TO_PFLLIB[k]], v) for k, v in init.items()))
        for cid in range(len(fed.partitions)):
            _, ys = pfllib.read_client(root / "dataset" / DATASET, cid, train=True)
            same = same and np.array_equal(ys, train.y.numpy()[fed.partitions[cid]])
        if not same:
            raise SystemExit(f"{root} holds an export that differs from what this kdfl builds for seed {seed}: "
                             "delete it (its PFLlib runs were on other inputs) and run again")
        write_model_spec()  # the directory may have moved since
        return root, json.loads(sizes_path.read_text())
    pfllib.export(train.x.numpy(), train.y.numpy(), fed.partitions, fed.holdouts, root / "dataset" / DATASET,
                  fed.task.num_classes)
    torch.save({KDFL_TO_PFLLIB[k]: v.clone() for k, v in init.items()}, root / "init.pt")
    write_model_spec()
    sizes = [len(h) for h in fed.holdouts]
    # round 0 of PFLlib's record evaluates these weights on these splits: the same number
    # on kdfl's side checks that data, split, model, weights and metric all agree
    from kdfl.train import evaluate

    model = fed.task.new_model()
    model.load_state_dict(init)
    accs = [evaluate(model, train.subset(torch.as_tensor(h, dtype=torch.long)))["accuracy"] for h in fed.holdouts]
    (root / "init_accuracy.json").write_text(json.dumps(sum(a * n for a, n in zip(accs, sizes, strict=True)) / sum(sizes)))
    sizes_path.write_text(json.dumps(sizes))
    return root, sizes


def run_reference(name: str, spec: Spec, seed: int, s: dict[str, Any], root: Path, ref: Path) -> list[float]:
    """PFLlib's per-round accuracy (r = 0..R) for one algorithm and seed."""
    if spec.same_reference_as:
        return run_reference(spec.same_reference_as, SPECS[spec.same_reference_as], seed, s, root, ref)
    out = root / name
    done = out / "curve.json"
    if done.is_file():
        return json.loads(done.read_text())
    (out / "system").mkdir(parents=True, exist_ok=True)
    dataset_link = out / "dataset"
    if not dataset_link.exists():
        dataset_link.symlink_to((root / "dataset").resolve())
    flags = ["-data", DATASET, "-m", "CNN", "-ncl", "10", "-nc", str(s["clients"]), "-jr", "1.0",
             "-gr", str(s["rounds"]), "-ls", str(s["epochs"]), "-lbs", str(s["batch_size"]), "-lr", str(s["lr"]),
             "-dev", "cpu", "-t", "1", "-eg", "1", "-go", "parity", "-algo", spec.pfllib, *(f.format(**s) for f in spec.pfllib_flags)]
    env = dict(os.environ, PARITY_MODEL=str((root / "model.json").resolve()), OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.run(pfllib.command(sys.executable, ref, flags), cwd=out / "system", env=env,
                          capture_output=True, text=True)
    (out / "stdout.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        # a run that fails part-way (e.g. diverges to NaN) keeps the rounds it logged; the
        # report says where and why it stopped
        curve = pfllib.parse_stdout(proc.stdout)
        last = (proc.stderr.strip().splitlines() or ["(no error message)"])[-1]
        (out / "failed.txt").write_text(f"rc {proc.returncode} after {len(curve)} evaluations: {last}\n")
        done.write_text(json.dumps(curve))
        print(f"  PFLlib {spec.pfllib} seed {seed} FAILED after {len(curve)} evaluations: {last}", file=sys.stderr)
        return curve
    curve = pfllib.read_curve(out / "results", DATASET, spec.pfllib, "parity")
    logged = pfllib.parse_stdout(proc.stdout)
    if [round(a, 4) for a in curve] != logged:
        raise RuntimeError(f"PFLlib {spec.pfllib} seed {seed}: the saved record and the log disagree")
    done.write_text(json.dumps(curve))
    print(f"  PFLlib {spec.pfllib} seed {seed}: {len(curve)} evaluations, final {curve[-1]:.4f} "
          f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return curve


def run_kdfl(name: str, spec: Spec, seed: int, s: dict[str, Any], root: Path, sizes: list[int]) -> list[float]:
    """kdfl's per-round accuracy (r = 1..R): per-client held-out accuracy, size-weighted."""
    import torch

    from kdfl import config, experiment
    from kdfl.report import read_run

    out = root / name / KDFL_DIR
    done = out / "curve.json"
    if done.is_file():
        return json.loads(done.read_text())
    torch.set_num_threads(1)
    cfg = config.load(None, kdfl_overrides(spec, seed, s))
    t0 = time.time()
    experiment.run(cfg, out / "run", overwrite=True)
    records, _ = read_run(out / "run")
    curve = []
    for r in records:
        per = r.get("client_eval")
        if per is None:
            continue
        if spec.metric not in per:  # e.g. FedProto's nearest-prototype accuracy before any prototype
            curve.append(0.0)
            continue
        n = [sizes[c] for c in per["clients"]]
        curve.append(sum(a * k for a, k in zip(per[spec.metric], n, strict=True)) / sum(n))
    done.write_text(json.dumps(curve))
    print(f"  kdfl {name} seed {seed}: final {curve[-1]:.4f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return curve


def kdfl_revision() -> str:
    """Where kdfl was imported from: this repository's ``src/`` (its commit, and whether
    ``src/`` had uncommitted changes), or another tree (e.g. a ``git archive`` of a commit
    put first on PYTHONPATH, so that others' uncommitted edits do not enter the runs)."""
    import kdfl.experiment

    src = Path(kdfl.experiment.__file__).resolve().parent.parent
    if src != (ROOT / "src").resolve():
        return f"the tree `{src}`"

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src")
    return f"`{sha}`" + (" with uncommitted changes in src/" if dirty else "")


def shared_accuracy(name: str, spec: Spec, seed: int, s: dict[str, Any], root: Path,
                    sizes: list[int]) -> tuple[float, float]:
    """The shared model (FedKD's mentee, FML's meme) on every client's test split, size-
    weighted: (PFLlib, kdfl). PFLlib's ``main.py`` runs R + 1 training rounds (the last one
    after the last evaluation) and saves the global model after them
    (``servers/serverbase.py::save_global_model``); kdfl's run is resumed to R + 1 rounds
    and its per-client metric ``spec.shared`` read at that round."""
    import numpy as np
    import torch

    from kdfl import config, experiment
    from kdfl.report import read_run

    out = root / name / f"shared-{KDFL_DIR}.json"
    if out.is_file():
        a, b = json.loads(out.read_text())
        return a, b
    sys.path.insert(0, str(HERE / "shim"))
    from parity_models import ParityMLP

    saved = torch.load(root / name / "system" / "models" / DATASET / f"{spec.pfllib}_server.pt", weights_only=False)
    state = saved.state_dict() if isinstance(saved, torch.nn.Module) else saved
    rename = {"base.fc1.weight": "fc1.weight", "base.fc1.bias": "fc1.bias", "head.weight": "fc.weight",
              "head.bias": "fc.bias"}  # FedKD's BaseHeadSplit names (main.py splits off fc as the head)
    state = {rename.get(k, k): torch.as_tensor(np.asarray(v)) for k, v in state.items()}
    spec_m = json.loads((root / "model.json").read_text())
    model = ParityMLP(spec_m["in_dim"], spec_m["hidden"], spec_m["num_classes"])
    model.load_state_dict(state)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for cid in range(len(sizes)):
            x, y = pfllib.read_client(root / "dataset" / DATASET, cid, train=False)
            pred = model(torch.as_tensor(x)).argmax(1).numpy()
            correct += int((pred == y).sum())
            total += len(y)
    ref = correct / total
    cfg = config.load(None, [*kdfl_overrides(spec, seed, s), f"run.rounds={int(s['rounds']) + 1}"])
    run_dir = root / name / KDFL_DIR / "run"
    experiment.run(cfg, run_dir, resume=True)
    records, _ = read_run(run_dir)
    per = records[-1]["client_eval"]
    n = [sizes[c] for c in per["clients"]]
    ours = sum(a * k for a, k in zip(per[spec.shared], n, strict=True)) / sum(n)
    out.write_text(json.dumps([ref, ours]))
    return ref, ours


def reference_failure(root: Path, name: str) -> str | None:
    """Why the cached PFLlib run of ``name`` stopped early, or None when it finished."""
    spec = SPECS[name]
    path = root / (spec.same_reference_as or name) / "failed.txt"
    return path.read_text().strip() if path.is_file() else None


def verdict(ref: list[float], ours: list[float]) -> tuple[bool, str]:
    mr, mk = statistics.mean(ref), statistics.mean(ours)
    spread = max(max(ref) - min(ref), max(ours) - min(ours))
    diff = mk - mr
    ok = abs(diff) < spread
    paired = [b - a for a, b in zip(ref, ours, strict=True)]
    same_sign = len(paired) > 1 and (all(d > 0 for d in paired) or all(d < 0 for d in paired))
    side = "higher" if paired[0] > 0 else "lower"
    return ok, (f"final accuracy PFLlib {mr:.4f}, kdfl {mk:.4f} (mean over seeds), difference {diff:+.4f}; "
                f"seeds' spread {spread:.4f}; kdfl - PFLlib per seed: {', '.join(f'{d:+.4f}' for d in paired)}"
                + (f" (kdfl {side} on every seed)" if same_sign else ""))


def report(results: dict[str, dict[int, tuple[list[float], list[float]]]], s: dict[str, Any], commit: str,
           seeds: list[int], command: str, init0: dict[int, float],
           shared: dict[str, dict[int, tuple[float, float]]], failures: dict[str, list[str]]) -> str:
    lines = [
        "# Parity: kdfl against PFLlib",
        "",
        f"Reference: PFLlib (github.com/TsingZ0/PFLlib) at commit `{commit}`; kdfl at {kdfl_revision()} "
        "(when this report was written; each side's curve is cached in runs/parity/ from when it ran). "
        "PFLlib is run unchanged through",
        "`benchmarks/parity/shim/` (stand-ins for uninstalled packages; the model replaced by the parity MLP",
        "with kdfl's initial weights). Produced by:",
        "",
        f"    {command}",
        "",
        f"Federation: mnist1d, {s['clients']} clients, Dirichlet({s['alpha']}) from kdfl, 75/25 per-client "
        f"train/test split; MLP 40-{s['hidden']}-10 from the same initial weights; plain SGD lr {s['lr']}, "
        f"batch {s['batch_size']}, {s['epochs']} local epoch(s), all clients every round, {s['rounds']} rounds; "
        f"seeds {', '.join(map(str, seeds))} (each seed: its own partition and initial weights). "
        + ("kdfl's FedProto, FML and FD personal models start from the global initial weights as PFLlib's do "
           "(diagnostic `--personal-init global`). " if KDFL_DIR != "kdfl" else "") + "Accuracy: "
        "correct predictions over all clients' own test splits / their size, each client with the model it holds.",
        "",
        "Verdict: *parity* when the mean final accuracies differ by less than the seeds' spread (the larger of "
        "the two sides' max - min over seeds). With two seeds this is a weak test when one side's seeds "
        "disagree: read the per-seed differences beside it. Each seed gives both sides the same partition and "
        "initial weights, so a difference of the same sign on every seed points at the implementations; "
        "PFLlib's own run-to-run noise (its client order comes from an unseeded `np.random.choice`, "
        "`servers/serverbase.py:99`, and with it the data order) is not controlled by the seed.",
        "",
    ]
    lines += ["| algorithm | PFLlib final (per seed) | kdfl final (per seed) | kdfl - PFLlib | seeds' spread | verdict |",
              "|---|---|---|---|---|---|"]
    for name, per_seed in results.items():
        refs = [per_seed[k][0][-1] for k in seeds]
        ours = [per_seed[k][1][-1] for k in seeds]
        if name in failures:
            lines.append(f"| {name} | failed: {'; '.join(failures[name])} | "
                         f"{statistics.mean(ours):.4f} ({', '.join(f'{a:.4f}' for a in ours)}) | — | — | "
                         "reference failed |")
            continue
        ok, _ = verdict(refs, ours)
        spread = max(max(refs) - min(refs), max(ours) - min(ours))
        lines.append(f"| {name} | {statistics.mean(refs):.4f} ({', '.join(f'{a:.4f}' for a in refs)}) | "
                     f"{statistics.mean(ours):.4f} ({', '.join(f'{a:.4f}' for a in ours)}) | "
                     f"{statistics.mean(ours) - statistics.mean(refs):+.4f} | {spread:.4f} | "
                     f"{'parity' if ok else 'no parity'} |")
    lines.append("")
    for name, per_seed in results.items():
        spec = SPECS[name]
        refs = [per_seed[k][0][-1] for k in seeds]
        ours = [per_seed[k][1][-1] for k in seeds]
        if name in failures:
            ok, text = False, "PFLlib's run did not finish: " + "; ".join(failures[name]).rstrip(".")
            head_verdict = "reference failed"
        else:
            ok, text = verdict(refs, ours)
            head_verdict = "parity" if ok else "no parity"
        lines += [f"## {name} (PFLlib `{spec.pfllib}`)", "", f"Evaluated: {spec.evaluated}.", "",
                  f"**{head_verdict}**: {text}.", ""]
        if name in shared:
            sh = shared[name]
            ok_s, text_s = verdict([sh[k][0] for k in seeds], [sh[k][1] for k in seeds])
            per_s = "; ".join(f"seed {k}: PFLlib {sh[k][0]:.4f}, kdfl {sh[k][1]:.4f}" for k in seeds)
            lines += [f"The shared model ({spec.shared.replace('_accuracy', '')}) after {int(s['rounds']) + 1} rounds "
                      f"(the model PFLlib saves), on the same splits: {per_s}. "
                      f"**{'parity' if ok_s else 'no parity'}**: {text_s}.", ""]
        r0 = "; ".join(f"seed {k}: PFLlib {per_seed[k][0][0]:.4f}, kdfl {init0[k]:.4f}" for k in seeds)
        lines += [f"Round 0 (the shared initial weights, before any training): {r0}.", ""]
        head = "| round | " + " | ".join(f"PFLlib s{k} | kdfl s{k}" for k in seeds) + " |"
        lines += [head, "|" + "---|" * (1 + 2 * len(seeds))]
        for r in range(1, int(s["rounds"]) + 1):
            cells = []
            for k in seeds:
                ref, ours_c = per_seed[k]
                cells += [f"{ref[r]:.4f}" if r < len(ref) else "—", f"{ours_c[r - 1]:.4f}" if r - 1 < len(ours_c) else "—"]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines.append("")
        if spec.notes:
            lines += ["Differences found by reading both sides:", ""] + [f"- {n}" for n in spec.notes] + [""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", type=Path, required=True, help="a PFLlib checkout (with system/main.py)")
    p.add_argument("--reference-commit", default=None, help="its commit, when DIR is not a git work tree")
    p.add_argument("--algorithms", default="fedavg,fedprox")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--personal-init", choices=("kdfl", "global"), default="kdfl",
                   help="diagnostic: 'global' starts kdfl's FedProto/FML/FD personal models from the global initial "
                        "weights, as PFLlib does (see use_global_personal_init)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "parity")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "parity.md")
    args = p.parse_args()
    ref = args.reference_dir.resolve()
    if not (ref / "system" / "main.py").is_file():
        p.error(f"--reference-dir {ref}: no system/main.py there; pass a PFLlib checkout")
    commit = pfllib.commit_of(ref) or args.reference_commit
    if commit is None:
        p.error(f"{ref} is not a git work tree: pass its commit with --reference-commit")
    names = [a.strip().lower() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in names if a not in SPECS]
    if unknown:
        p.error(f"unknown algorithm(s) {unknown}; available: {', '.join(SPECS)}")
    seeds = [int(k) for k in args.seeds.split(",")]
    if args.personal_init == "global":
        global KDFL_DIR
        KDFL_DIR = "kdfl-global-init"
        use_global_personal_init()
    s = settings(args)
    tag = "_".join(f"{k}{v}" for k, v in s.items())
    work = args.work / tag / commit[:12]  # the reference commit: runs of two commits never share a cache
    results: dict[str, dict[int, tuple[list[float], list[float]]]] = {}
    init0: dict[int, float] = {}
    shared: dict[str, dict[int, tuple[float, float]]] = {}
    failures: dict[str, list[str]] = {}
    for name in names:
        results[name] = {}
        for seed in seeds:
            root, sizes = prepare(seed, s, work)
            init0[seed] = json.loads((root / "init_accuracy.json").read_text())
            ref_curve = run_reference(name, SPECS[name], seed, s, root, ref)
            ours = run_kdfl(name, SPECS[name], seed, s, root, sizes)
            results[name][seed] = (ref_curve, ours)
            why = reference_failure(root, name)
            if why is not None:
                failures.setdefault(name, []).append(f"seed {seed}: {why}")
            if SPECS[name].shared:
                shared.setdefault(name, {})[seed] = shared_accuracy(name, SPECS[name], seed, s, root, sizes)
    command = "python benchmarks/parity/run.py " + " ".join(
        a if not a.startswith("/") else "DIR" if Path(a).resolve() == ref else a for a in sys.argv[1:])
    text = report(results, s, commit, seeds, command, init0, shared, failures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
