"""Config loading and validation: every bad input is a KdflError whose message names the
key and what is allowed."""

from __future__ import annotations

import pytest

from kdfl import config, experiment
from kdfl.types import KdflError


def error_of(overrides: list[str], build: bool = False) -> str:
    """The KdflError message of loading (and optionally building) the default config with ``overrides``."""
    with pytest.raises(KdflError) as info:
        cfg = config.load(None, overrides)
        if build:
            experiment.build(cfg)
    return str(info.value)


# ---------------------------------------------------------------------------- unknown names
def test_unknown_key_names_key_and_close_match():
    msg = error_of(["run.round=3"])
    assert "'run.round'" in msg
    assert "'rounds'" in msg  # the close match
    assert "Allowed keys in [run]" in msg


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[local]\nepoch = 2\n")
    with pytest.raises(KdflError, match=r"'local\.epoch'.*'epochs'"):
        config.load(p)


def test_unknown_section():
    msg = error_of(["runn.rounds=3"])
    assert "[runn]" in msg and "'run'" in msg  # close match
    assert "[algorithm]" in msg  # the sections are listed


def test_unknown_algorithm_lists_close_matches_and_all():
    msg = error_of(["algorithm.name=fedprx"])
    assert "'fedprx'" in msg
    assert "Did you mean 'fedprox'" in msg
    assert "Available:" in msg and "fedavg" in msg and "fedavgm" in msg


def test_unknown_dataset_and_model():
    assert "'digits'" in error_of(["data.name=digitz"])
    msg = error_of(["model.arch=cnnn"], build=True)
    assert "cnnn" in msg and "cnn" in msg


def test_algorithm_option_valid_for_fedprox_only():
    cfg = config.load(None, ["algorithm.name=fedprox", "algorithm.mu=0.1"])
    assert cfg["algorithm"] == {"name": "fedprox", "mu": 0.1}
    msg = error_of(["algorithm.name=fedavg", "algorithm.mu=0.1"])
    assert "'algorithm.mu'" in msg and "'fedavg'" in msg
    assert "fedprox" in msg  # says which algorithm has the option
    assert "aggregator" in msg  # lists what fedavg allows


def test_fedavgm_options():
    cfg = config.load(None, ["algorithm.name=fedavgm", "algorithm.momentum=0.5", "algorithm.server_lr=1"])
    assert cfg["algorithm"]["server_lr"] == 1.0 and isinstance(cfg["algorithm"]["server_lr"], float)


def test_unknown_partition_option():
    msg = error_of(["partition.name=iid", "partition.alpha=0.3"])
    assert "'partition.alpha'" in msg and "'iid'" in msg


def test_unknown_codec_and_executor():
    msg = error_of(["compression.uplink=fp8"])
    assert "fp8" in msg and "fp16" in msg
    msg = error_of(["run.executor=sequentail"])
    assert "'sequential'" in msg


def test_executor_options_are_checked_on_load():
    cfg = config.load(None, ["run.executor='parallel:workers=3,inner=vectorized'"])
    assert cfg["run"]["executor"] == "parallel:workers=3,inner=vectorized"
    msg = error_of(["run.executor='parallel:worker=3'"])
    assert "run.executor" in msg and "'worker'" in msg and "workers" in msg and "inner" in msg
    assert "must be an integer" in error_of(["run.executor='auto:workers=two'"])
    assert "must be an integer" in error_of(["run.executor='vectorized:max_chunk=2.5'"])
    assert "must be a number" in error_of(["run.executor='auto:min_round_s=fast'"])
    msg = error_of(["run.executor='parallel:inner=paralel'"])
    assert "sequential, vectorized" in msg and "'paralel'" in msg
    assert "workers >= 0" in error_of(["run.executor='auto:workers=-1'"])
    assert "max_memory_mb > 0" in error_of(["run.executor='vectorized:max_memory_mb=0'"])


# ------------------------------------------------------------------------------ wrong types
def test_wrong_type_names_expected_type():
    msg = error_of(['run.rounds="ten"'])
    assert "'run.rounds'" in msg and "must be int" in msg and "'ten'" in msg and "str" in msg


def test_float_for_int_rejected_int_for_float_accepted():
    assert "must be int" in error_of(["run.rounds=2.5"])
    cfg = config.load(None, ["local.lr=1"])
    assert cfg["local"]["lr"] == 1.0 and isinstance(cfg["local"]["lr"], float)


def test_bool_is_not_an_int():
    assert "must be int" in error_of(["run.rounds=true"])


def test_section_must_be_table(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("run = 3\n")
    with pytest.raises(KdflError, match=r"\[run\] must be a table"):
        config.load(p)


# ---------------------------------------------------------------------------- out of range
def test_attack_fraction_range():
    msg = error_of(["attack.name=sign_flip", "attack.fraction=0.7"])
    assert "attack.fraction" in msg and "[0, 0.5)" in msg and "0.7" in msg


def test_partition_alpha_negative_rejected_at_build():
    cfg = config.load(None, ["partition.alpha=-0.5"])  # the type is right; the partition checks the range
    with pytest.raises(KdflError) as info:
        experiment.build(cfg)
    msg = str(info.value)
    assert "alpha" in msg and "> 0" in msg and "-0.5" in msg


def test_local_lr_negative():
    msg = error_of(["local.lr=-1"])  # rejected on load, before any data is read
    assert "lr > 0" in msg and "lr=-1.0" in msg


def test_local_batch_size_and_optimizer():
    assert "batch_size >= 1" in error_of(["local.batch_size=0"])
    msg = error_of(["local.optimizer=adamw"])
    assert "'sgd' or 'adam'" in msg and "adamw" in msg


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("run.rounds=0", ">= 1"),
        ("run.dropout=1.5", "[0, 1)"),
        ("run.seed=-1", ">= 0"),
        ("run.eval_every=0", ">= 1"),
        ("run.target_accuracy=1.5", "[0, 1]"),
        ("data.num_clients=0", ">= 1"),
    ],
)
def test_run_ranges(override, words):
    key = override.split("=")[0]
    msg = error_of([override])
    assert key in msg and words in msg


def test_algorithm_hyperparameter_ranges():
    msg = error_of(["algorithm.name=fedprox", "algorithm.mu=-1"])
    assert "algorithm.mu" in msg and ">= 0" in msg
    msg = error_of(["algorithm.name=fedavgm", "algorithm.momentum=1.0"])
    assert "algorithm.momentum" in msg and "[0, 1)" in msg


def test_bad_device_is_a_kdfl_error():
    msg = error_of(["run.device=tpu"])
    assert "run.device" in msg and "'cpu'" in msg


def test_model_assign():
    msg = error_of(["model.assign=random"])
    assert "round_robin" in msg and "blocks" in msg


def test_shards_needs_classes_per_client():
    cfg = config.load(None, ["partition.name=shards"])
    with pytest.raises(KdflError, match="classes_per_client"):
        experiment.build(cfg)


# ----------------------------------------------------------------------------------- --set
def test_parse_override_values():
    assert config.parse_override("run.rounds=3") == ("run", "rounds", 3)
    assert config.parse_override("local.lr = 0.1") == ("local", "lr", 0.1)
    assert config.parse_override("algorithm.name=fedprox") == ("algorithm", "name", "fedprox")  # unquoted
    assert config.parse_override('algorithm.name="fedprox"') == ("algorithm", "name", "fedprox")
    assert config.parse_override('model.client_archs=["mlp", "cnn"]') == ("model", "client_archs", ["mlp", "cnn"])
    assert config.parse_override("run.seed=007") == ("run", "seed", "007")  # not valid TOML: kept as a string
    assert config.parse_override("data.data_dir=/tmp/x=y") == ("data", "data_dir", "/tmp/x=y")


@pytest.mark.parametrize("bad", ["run.rounds", "rounds=3", "run.=3", ""])
def test_parse_override_malformed(bad):
    with pytest.raises(KdflError, match="section.key=value"):
        config.parse_override(bad)


def test_override_beats_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[run]\nrounds = 10\nseed = 4\n")
    cfg = config.load(p, ["run.rounds=3"])
    assert cfg["run"]["rounds"] == 3 and cfg["run"]["seed"] == 4


def test_override_list():
    cfg = config.load(None, ['model.client_archs=["mlp", "cnn"]', "model.assign=blocks"])
    assert list(cfg["model"]["client_archs"]) == ["mlp", "cnn"]


def test_switching_algorithm_drops_old_options(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[algorithm]\nname = "fedprox"\nmu = 0.5\n')
    assert config.load(p)["algorithm"] == {"name": "fedprox", "mu": 0.5}
    # mu belongs to fedprox: switching to fedavgm must drop it, not reject it
    cfg = config.load(p, ["algorithm.name=fedavgm"])
    assert cfg["algorithm"] == {"name": "fedavgm"}
    # options given after the switch are kept
    cfg = config.load(p, ["algorithm.name=fedavgm", "algorithm.momentum=0.5"])
    assert cfg["algorithm"] == {"name": "fedavgm", "momentum": 0.5}
    # re-setting the same name keeps the options
    assert config.load(p, ["algorithm.name=fedprox"])["algorithm"] == {"name": "fedprox", "mu": 0.5}


def test_switching_partition_drops_alpha():
    cfg = config.load(None, ["partition.name=iid"])  # the default partition is dirichlet(alpha=0.5)
    assert cfg["partition"] == {"name": "iid"}


# ------------------------------------------------------------------------------ files, dumps
def test_invalid_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[run\nrounds = 3\n")
    with pytest.raises(KdflError) as info:
        config.load(p)
    assert "not valid TOML" in str(info.value) and "bad.toml" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(KdflError) as info:
        config.load(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value) and "does not exist" in str(info.value)


def test_defaults_and_dumps_roundtrip(tmp_path):
    cfg = config.load(None, ["algorithm.name=fedprox", "algorithm.mu=0.2", 'model.client_archs=["mlp"]',
                             "run.target_accuracy=0.8", 'data.data_dir=/tmp/a "b"'])
    p = tmp_path / "c.toml"
    p.write_text(config.dumps(cfg))
    assert config.load(p) == cfg


def test_quickstart_loads():
    from pathlib import Path

    cfg = config.load(Path(__file__).parents[1] / "configs" / "quickstart.toml")
    assert cfg["run"]["rounds"] == 30 and cfg["model"]["arch"] == "cnn"


# ------------------------------------------------------------------- nested settings tables
def test_distill_table_overrides_the_algorithms_own_defaults(tmp_path):
    from kdfl.algorithms import build_algorithm
    from kdfl.train import LocalSGD

    p = tmp_path / "c.toml"
    p.write_text('[algorithm]\nname = "feddf"\n\n[algorithm.distill]\nsteps = 7\n')
    cfg = config.load(p, ["algorithm.distill.lr=0.01"])
    assert cfg["algorithm"]["distill"] == {"steps": 7, "lr": 0.01}
    alg = build_algorithm("feddf", LocalSGD(), {k: v for k, v in cfg["algorithm"].items() if k != "name"})
    # the keys given replace FedDF's defaults; the others stay FedDF's (not DistillSettings')
    assert (alg.distill.steps, alg.distill.lr, alg.distill.t2, alg.distill.cosine) == (7, 0.01, False, True)
    ema = build_algorithm("fedema_distill", LocalSGD(), {"distill": {"steps": 3}})
    assert (ema.distill.steps, ema.distill.temperature, ema.distill.t2) == (3, 3.0, True)


def test_distill_table_keys_are_checked():
    msg = error_of(["algorithm.name=feddf", "algorithm.distill.step=3"])
    assert "'algorithm.distill.step'" in msg and "'steps'" in msg
    assert "must be int" in error_of(["algorithm.name=feddf", "algorithm.distill.steps=2.5"])
    assert "table" in error_of(["algorithm.name=feddf", "algorithm.distill=3"])
    assert "temperature > 0" in error_of(["algorithm.name=feddf", "algorithm.distill.temperature=0.0"])


def test_old_flat_distill_keys_say_where_they_moved():
    msg = error_of(["algorithm.name=fedema_distill", "algorithm.distill_steps=100"])
    assert "moved" in msg and "[algorithm.distill]" in msg and "steps" in msg
    assert "algorithm.distill.temperature" in error_of(["algorithm.name=feddf", "algorithm.temperature=2.0"])


def test_nested_tables_survive_dumps_and_reload(tmp_path):
    cfg = config.load(None, ["algorithm.name=fedema_distill", "algorithm.distill.steps=9", "algorithm.clip=2.0"])
    text = config.dumps(cfg)
    assert "[algorithm.distill]\nsteps = 9" in text
    p = tmp_path / "again.toml"
    p.write_text(text)
    assert config.load(p) == cfg


def test_user_algorithm_by_module_path():
    cfg = config.load(None, ["algorithm.name=toy_algorithms:ToyMutual", "algorithm.public_rows=8"])
    assert cfg["algorithm"] == {"name": "toy_algorithms:ToyMutual", "public_rows": 8}
    assert "cannot import module 'no_such_module'" in error_of(["algorithm.name=no_such_module:Algo"])
    assert "has no 'Nope'" in error_of(["algorithm.name=toy_algorithms:Nope"])
    assert "lacks" in error_of(["algorithm.name=toy_algorithms:L1ToTargets"])  # a dataclass, not an algorithm
    assert "'algorithm.bogus'" in error_of(["algorithm.name=toy_algorithms:ToyMutual", "algorithm.bogus=1"])


def test_register_makes_a_short_name(monkeypatch):
    from dataclasses import dataclass

    from kdfl import algorithms
    from kdfl.algorithms import FedAvg, register
    from kdfl.registry import Registry

    monkeypatch.setattr(algorithms, "ALGORITHMS", Registry("algorithm", dict(algorithms.ALGORITHMS.items())))

    @register("my_fedavg")
    @dataclass(frozen=True)
    class MyFedAvg(FedAvg):
        pass

    assert config.load(None, ["algorithm.name=my_fedavg"])["algorithm"]["name"] == "my_fedavg"
    with pytest.raises(KdflError, match="taken"):
        register("fedavg")(MyFedAvg)
