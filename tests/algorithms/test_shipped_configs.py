"""The shipped configs load, and (slow) the heterogeneous ones learn end to end."""

from pathlib import Path

import pytest

from kdfl import config, experiment

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_builds(path):
    from kdfl.types import KdflError

    cfg = config.load(path, ["data.num_samples=4000"] if "mnist1d" in path.read_text() else [])
    try:
        fed = experiment.build(cfg)
    except KdflError as e:
        if "dataset-fashion-mnist" in str(e):  # the data are not on this machine: the error says how
            pytest.skip(f"Fashion-MNIST is not installed (make fashion-mnist): {path.name} not built")
        raise
    assert len(fed.partitions) == cfg["data"]["num_clients"]


@pytest.mark.parametrize("clean, attacked", [("fedavg_fmnist.toml", "fedema_fmnist.toml"),
                                             ("fedavg_mnist1d.toml", "fedema_distill.toml")])
def test_shipped_pairs_share_the_federation(clean, attacked):
    """Each shipped FedEMA-Distill config and its clean FedAvg reference differ only in the
    algorithm, the attack and the codec: same data, partition, clients, rounds and local work."""
    root = Path(__file__).parents[2] / "configs"
    a, b = config.load(root / clean), config.load(root / attacked)
    for section in ("run", "data", "partition", "model", "local"):
        assert a[section] == b[section], section
    assert b["attack"]["fraction"] == 0.2 and a["attack"]["name"] == "none"
    assert b["algorithm"]["aggregator"].startswith(("median", "trimmed_mean"))


def test_the_seed_sweep_runs_the_shipped_fedavg_reference():
    """benchmarks/fedema_distill_seeds.toml writes configs/fedavg_mnist1d.toml as overrides of
    configs/fedema_distill.toml: the two must be the same run."""
    from kdfl import sweep

    root = Path(__file__).parents[2]
    sw = sweep.load(root / "benchmarks" / "fedema_distill_seeds.toml")
    run = next(r for r in sw.runs() if r.method == "fedavg_clean" and r.seed == 0)
    built = config.load(str(sw.base), list(run.overrides))
    shipped = config.load(root / "configs" / "fedavg_mnist1d.toml")
    for section in ("run", "data", "partition", "model", "local"):
        assert built[section] == shipped[section], section
    assert built["algorithm"]["name"] == shipped["algorithm"]["name"] == "fedavg"
    assert built["attack"]["name"] == "none" and built["compression"] == shipped["compression"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedema_distill_hetero.toml", "feddf_hetero.toml"])
def test_heterogeneous_configs_learn(name):
    cfg = config.load(Path(__file__).parents[2] / "configs" / name, ["run.rounds=5"])
    hist = experiment.run(cfg)
    assert len(set(cfg["model"]["client_archs"])) == 3
    assert hist.summary["final_accuracy"] > 0.3  # 10 classes: chance is 0.1
