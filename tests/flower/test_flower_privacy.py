"""``[privacy]`` on Flower: a Flower run under local or central DP equals the simulator's
run (same seeds, same noise), epsilon included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("dp_accounting")

from flower_grid import LocalGrid, single_threaded  # noqa: E402

from kdfl import experiment  # noqa: E402
from kdfl.flower import load_config  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "flower_app" / "fedema_mnist1d.toml"
# what differs by construction: wall time, and bytes (kdfl's wire format vs Flower's array data)
RUNTIME_KEYS = {"wall_seconds", "uplink_bytes", "downlink_bytes", "uplink_bytes_per_client",
                "downlink_bytes_per_client", "uplink_record_bytes", "downlink_record_bytes"}
PRIVACY_KEYS = ("epsilon", "delta", "privacy_mode", "noise_multiplier", "clip")


@pytest.mark.parametrize("sets", [
    ["algorithm.name=fedavg", "compression.uplink='fp32'", "privacy.mode='local'", "privacy.noise_multiplier=0.5",
     "privacy.clip=0.5"],
    ["algorithm.name=fedema_distill", "algorithm.space='logits'", "algorithm.aggregator='mean'",
     "privacy.mode='central'", "privacy.noise_multiplier=1.0", "privacy.clip=5.0", "run.clients_per_round=2"],
], ids=["fedavg-local", "fedema_distill-central"])
def test_flower_run_under_dp_equals_simulator(sets, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from kdfl.flower import server_app
    from kdfl.flower.client_app import make_client_app

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what Flower's processes set
        monkeypatch.setattr(TaskIdentity, attr, value)
    # the bit-exact reference: the ClientApp trains one client per message, as `sequential` does
    cfg = load_config(CONFIG, ["run.rounds=2", "run.executor=sequential", *sets])
    ref = single_threaded(lambda: experiment.run(cfg))
    flower = single_threaded(lambda: server_app.run(LocalGrid(make_client_app(), cfg["data"]["num_clients"]), cfg))
    for key, value in ref.state.params.items():  # bit-identical: same seeds and noise, same order, same maths
        torch.testing.assert_close(flower.state.params[key], value, rtol=0, atol=0)
    assert len(ref.records) == len(flower.records) == 2
    for a, b in zip(ref.records, flower.records, strict=True):
        assert "epsilon" in a and a["epsilon"] > 0
        assert {k: v for k, v in a.items() if k not in RUNTIME_KEYS} == {
            k: v for k, v in b.items() if k not in RUNTIME_KEYS}
    if cfg["privacy"]["mode"] == "local":
        assert "dp_upload_norm" in flower.records[0] and "dp_clipped_fraction" in flower.records[0]
    assert {k: flower.summary[k] for k in PRIVACY_KEYS} == {k: ref.summary[k] for k in PRIVACY_KEYS}
    assert flower.summary["final_accuracy"] == ref.summary["final_accuracy"]


def test_flower_refuses_what_the_simulator_refuses():
    from kdfl.flower.federation import prepare
    from kdfl.types import KdflError

    with pytest.raises(KdflError, match="central"):  # the example's median is not a mean
        prepare(load_config(CONFIG, ["privacy.mode='central'", "privacy.noise_multiplier=1.0"]))
