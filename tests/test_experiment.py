"""From config to federation: ``experiment.build`` and ``experiment.run``."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfl import config, experiment
from kdfl.attacks import choose_malicious
from kdfl.types import KdflError

ROOT = Path(__file__).parents[1]
TINY = ["data.num_clients=5", "model.arch=mlp", "local.batch_size=32", "local.momentum=0.9"]



def test_assign_archs_round_robin_and_blocks():
    assert experiment.assign_archs(4, "mlp", [], "round_robin") == ["mlp"] * 4
    assert experiment.assign_archs(5, "mlp", ["a", "b"], "round_robin") == ["a", "b", "a", "b", "a"]
    assert experiment.assign_archs(5, "mlp", ["a", "b"], "blocks") == ["a", "a", "a", "b", "b"]
    assert experiment.assign_archs(6, "mlp", ["a", "b", "c"], "blocks") == ["a", "a", "b", "b", "c", "c"]
    # more architectures than clients: blocks still gives every client a valid one
    assert experiment.assign_archs(2, "mlp", ["a", "b", "c"], "blocks") == ["a", "b"]


def test_build_assigns_client_archs():
    cfg = config.load(None, [*TINY, 'model.client_archs=["mlp", "cnn"]', "model.assign=blocks"])
    fed = experiment.build(cfg)
    assert fed.task.client_archs == ["mlp", "mlp", "mlp", "cnn", "cnn"]
    assert fed.task.server_arch == "mlp"


def test_build_rejects_unknown_client_arch_early():
    cfg = config.load(None, [*TINY, 'model.client_archs=["mlp", "cnnn"]'])
    with pytest.raises(KdflError, match="cnnn"):
        experiment.build(cfg)


def test_heterogeneous_archs_rejected_by_fedavg():
    cfg = config.load(None, [*TINY, "run.rounds=1", 'model.client_archs=["mlp", "cnn"]'])
    with pytest.raises(KdflError) as info:
        experiment.run(cfg)
    msg = str(info.value)
    assert "FedAvg averages weights" in msg and "server's architecture" in msg
    assert "['cnn', 'mlp']" in msg  # names the architectures it got


def test_partitions_cover_the_training_set():
    fed = experiment.build(config.load(None, TINY))
    allidx = np.concatenate(fed.partitions)
    assert len(allidx) == len(np.unique(allidx)) == len(fed.task.train)
    assert fed.label_counts.shape == (5, 10)
    assert fed.label_counts.sum() == len(fed.task.train)


def test_run_without_directory_returns_history():
    hist = experiment.run(config.load(None, [*TINY, "run.rounds=2"]))
    assert [r["round"] for r in hist.records] == [1, 2]
    assert hist.summary["rounds"] == 2 and hist.state is not None
    assert hist.summary["final_accuracy"] > 0.5  # 2 rounds of FedAvg on digits learn something


def test_malicious_set_and_label_table_in_run_dir(tmp_path):
    cfg = config.load(None, [*TINY, "run.rounds=1", "attack.name=sign_flip", "attack.fraction=0.2", "run.seed=3"])
    hist = experiment.run(cfg, out=tmp_path)
    malicious = json.loads((tmp_path / "malicious.json").read_text())
    assert malicious == sorted(choose_malicious(5, 0.2, 3))
    assert len(malicious) == 1  # round(0.2 * 5)
    assert hist.records[0]["malicious"] == malicious  # all clients take part, the malicious one too

    fed = experiment.build(cfg)
    lines = (tmp_path / "partition.txt").read_text().splitlines()
    assert lines[0].split() == ["client", "n", *map(str, range(10))]
    assert len(lines) == 1 + 5 + 1  # header, one row per client, total
    for i, line in enumerate(lines[1:6]):
        assert [int(v) for v in line.split()] == [i, int(fed.label_counts[i].sum()), *fed.label_counts[i]]
    assert lines[-1].split()[:2] == ["all", str(len(fed.task.train))]


def test_no_attack_no_malicious(tmp_path):
    experiment.run(config.load(None, [*TINY, "run.rounds=1", "attack.fraction=0.2"]), out=tmp_path)
    assert json.loads((tmp_path / "malicious.json").read_text()) == []  # attack.name = "none"


def test_same_seed_same_numbers():
    cfg = config.load(None, [*TINY, "run.rounds=1", "algorithm.name=fedprox", "algorithm.mu=0.1"])
    a, b = experiment.run(cfg), experiment.run(cfg)
    assert a.summary["final_accuracy"] == b.summary["final_accuracy"]
    assert all(torch.equal(a.state.params[k], b.state.params[k]) for k in a.state.params)


def test_resume_with_different_algorithm_refused(tmp_path):
    experiment.run(config.load(None, [*TINY, "run.rounds=1"]), out=tmp_path)
    cfg = config.load(None, [*TINY, "run.rounds=2", "algorithm.name=fedprox"])
    with pytest.raises(KdflError, match=r"algorithm\.name: 'fedavg' -> 'fedprox'"):
        experiment.run(cfg, out=tmp_path, resume=True)


@pytest.mark.slow
def test_quickstart_reaches_90_percent(tmp_path):
    cfg = config.load(ROOT / "configs" / "quickstart.toml")
    hist = experiment.run(cfg, out=tmp_path)
    s = hist.summary
    assert s["rounds"] == 30
    assert s["final_accuracy"] >= 0.90, s
    assert s["rounds_to_target"] is not None


@pytest.mark.parametrize("executor", ["vectorized", "batched", "auto", "parallel"])
def test_fast_executors_give_the_sequential_run(executor):
    """A whole run (FedProx, Dirichlet sizes, 3 rounds) through each fast executor ends
    where the sequential one does: within float rounding (vectorized; auto may vectorize)
    or bit for bit (parallel). Pools end with their run: no worker process is left."""
    import multiprocessing

    sets = [*TINY, "run.rounds=3", "run.threads=1", "algorithm.name=fedprox", "algorithm.mu=0.1",
            "partition.name=dirichlet", "partition.alpha=0.5"]
    ref = experiment.run(config.load(None, [*sets, "run.executor=sequential"]))  # the reference, by name
    got = experiment.run(config.load(None, [*sets, f"run.executor={executor}"]))
    for k, v in ref.state.params.items():
        if executor == "parallel":
            assert torch.equal(got.state.params[k], v), k
        else:
            torch.testing.assert_close(got.state.params[k], v, atol=1e-5, rtol=0, msg=k)
    assert [r["uplink_bytes"] for r in got.records] == [r["uplink_bytes"] for r in ref.records]
    assert abs(got.summary["final_accuracy"] - ref.summary["final_accuracy"]) <= 0.02
    assert not [p for p in multiprocessing.active_children() if "resource_tracker" not in p.name]


def test_checkpoints_of_the_old_untyped_state_are_refused_clearly(tmp_path):
    import torch

    cfg = config.load(None, ["run.rounds=1", "model.arch=mlp:hidden=8"])
    experiment.run(cfg, out=tmp_path)
    from kdfl.simulation import checkpoint

    ck = torch.load(io.BytesIO(checkpoint._read_verified(tmp_path / "checkpoint.pt")), weights_only=False)
    assert ck["format"] == 2
    del ck["format"]  # what kdfl wrote before typed states (ServerState.extra dicts)
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(KdflError, match="older kdfl .*format 1"):
        experiment.run(config.load(None, ["run.rounds=2", "model.arch=mlp:hidden=8"]), out=tmp_path, resume=True)


def test_checkpoints_carry_a_checksum_and_keep_the_previous_one(tmp_path):
    from kdfl.simulation import checkpoint

    over = ["run.rounds=2", "model.arch=mlp:hidden=8", "run.checkpoint_every=1"]
    experiment.run(config.load(None, over), out=tmp_path)
    ck, prev = tmp_path / checkpoint.FILE, tmp_path / checkpoint.PREV
    assert checkpoint.load(tmp_path)["round"] == 2 and prev.exists()  # round 1's checkpoint kept beside
    assert ck.read_bytes()[-checkpoint.TRAILER:].startswith(checkpoint.TAG)
    good = ck.read_bytes()
    # one flipped byte in the middle: torch might still read it; the checksum does not
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    ck.write_bytes(bytes(bad))
    with pytest.raises(KdflError, match=r"checksum mismatch.*checkpoint.prev.pt: rename it"):
        checkpoint.load(tmp_path)
    ck.write_bytes(good[: len(good) // 2])  # truncated: no trailer, unreadable
    with pytest.raises(KdflError, match="unreadable"):
        checkpoint.load(tmp_path)
    ck.unlink()  # a save interrupted between its two renames
    with pytest.raises(KdflError, match="only checkpoint.prev.pt"):
        checkpoint.load(tmp_path)
    os.replace(prev, ck)  # what the message says to do: resume from round 1
    assert checkpoint.load(tmp_path)["round"] == 1
    hist = experiment.run(config.load(None, [*over, "run.rounds=3"]), out=tmp_path, resume=True)
    assert [r["round"] for r in hist.records] == [1, 2, 3]


def test_a_save_never_leaves_the_run_without_its_checkpoint_name(tmp_path, monkeypatch):
    """PREV is a hard link renamed into place, so checkpoint.pt exists at every moment of a
    save; where hard links fail (the rename fallback) an interrupted save is named, with the
    file to rename, by `kdfl run --resume` itself (not "start again")."""
    from kdfl import cli
    from kdfl.simulation import checkpoint

    seen = []
    real_replace = os.replace

    def watch(src, dst):  # at every rename of a save, the checkpoint's own name exists
        seen.append((tmp_path / checkpoint.FILE).exists())
        return real_replace(src, dst)

    experiment.run(config.load(None, ["run.rounds=1", "model.arch=mlp:hidden=8"]), out=tmp_path)
    monkeypatch.setattr(checkpoint.os, "replace", watch)
    checkpoint.save(tmp_path, {"round": 1, "state": None, "client_states": {}, "records": []})
    assert seen and all(seen)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)

    # a kill between the fallback's two renames: only checkpoint.prev.pt (+ a complete .tmp)
    good = (tmp_path / checkpoint.FILE).read_bytes()
    os.replace(tmp_path / checkpoint.FILE, tmp_path / checkpoint.PREV)
    (tmp_path / (checkpoint.FILE + ".tmp")).write_bytes(good)
    args = ["run", "--out", str(tmp_path), "--resume", "--set", "run.rounds=1", "--set", "model.arch=mlp:hidden=8",
            "--quiet"]
    assert cli.main(args) == 2
    with pytest.raises(KdflError, match=r"only checkpoint.prev.pt .*checkpoint.pt.tmp is complete and newer"):
        checkpoint.load(tmp_path)
    (tmp_path / (checkpoint.FILE + ".tmp")).write_bytes(good[:100])  # an incomplete one is not offered
    with pytest.raises(KdflError, match=r"only checkpoint.prev.pt .*: rename checkpoint.prev.pt to checkpoint.pt"):
        experiment.check_run_dir(tmp_path, resume=True, overwrite=False)


def test_resume_before_the_first_checkpoint_starts_from_round_0_in_place(tmp_path):
    """A run stopped before its first checkpoint left its config, partition and some
    metrics: resume=True starts it again from round 0 there (its files replaced) and ends
    where a fresh run does; another config is still refused, as for any resume."""
    sets = [*TINY, "run.rounds=2", "run.checkpoint_every=2"]
    fresh = experiment.run(config.load(None, sets))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(config.dumps(config.load(None, sets)))
    (run_dir / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.0}\n')  # a round the checkpoint never saw
    (run_dir / "summary.md").write_text("an old report")
    with pytest.raises(KdflError, match=r"run\.seed: 0 -> 1"):
        experiment.run(config.load(None, [*sets, "run.seed=1"]), out=run_dir, resume=True)
    assert experiment.check_run_dir(run_dir, resume=True, overwrite=False, cfg=config.load(None, sets)) is False
    assert not (run_dir / "summary.md").exists() and not (run_dir / "metrics.jsonl").exists()
    hist = experiment.run(config.load(None, sets), out=run_dir, resume=True)
    assert [r["round"] for r in hist.records] == [1, 2]
    assert hist.summary["final_accuracy"] == fresh.summary["final_accuracy"]
    assert all(torch.equal(hist.state.params[k], fresh.state.params[k]) for k in fresh.state.params)
    assert experiment.check_run_dir(run_dir, resume=True, overwrite=False) is True  # now it has a checkpoint
    with pytest.raises(KdflError, match="resume needs a run directory"):
        experiment.run(config.load(None, sets), resume=True)
