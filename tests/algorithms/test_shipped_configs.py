"""The shipped configs load, and (slow) the heterogeneous ones learn end to end."""

from pathlib import Path

import pytest

from kdfl import config, experiment

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_builds(path):
    cfg = config.load(path, ["data.num_samples=4000"] if "mnist1d" in path.read_text() else [])
    fed = experiment.build(cfg)
    assert len(fed.partitions) == cfg["data"]["num_clients"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedema_distill_hetero.toml", "feddf_hetero.toml"])
def test_heterogeneous_configs_learn(name):
    cfg = config.load(Path(__file__).parents[2] / "configs" / name, ["run.rounds=5"])
    hist = experiment.run(cfg)
    assert len(set(cfg["model"]["client_archs"])) == 3
    assert hist.summary["final_accuracy"] > 0.3  # 10 classes: chance is 0.1
