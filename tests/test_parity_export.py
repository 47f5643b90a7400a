"""The parity harness's PFLlib exporter (benchmarks/parity/pfllib.py) on a tiny partition:
the files are where PFLlib's ``read_data`` looks and hold exactly the chosen rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent.parent / "benchmarks" / "parity"


def _load(name: str, path: Path):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pfllib = _load("parity_pfllib", HERE / "pfllib.py")


def test_export_round_trips_rows_in_pfllib_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 1, 5)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    train = [np.array([0, 3, 4]), np.array([1, 2, 7, 11])]
    test = [np.array([6]), np.array([5, 8])]
    out = tmp_path / "dataset" / "tiny"
    config = pfllib.export(x, y, train, test, out, num_classes=3)
    for cid in range(2):
        for is_train, rows in ((True, train[cid]), (False, test[cid])):
            # where PFLlib's system/utils/data_utils.py::read_data opens it, and how
            path = out / ("train" if is_train else "test") / f"{cid}.npz"
            with open(path, "rb") as f:
                data = np.load(f, allow_pickle=True)["data"].tolist()
            assert set(data) == {"x", "y"}
            np.testing.assert_array_equal(data["x"], x[rows])
            np.testing.assert_array_equal(data["y"], y[rows])
            assert data["x"].dtype == np.float32 and data["y"].dtype == np.int64
    saved = json.loads((out / "config.json").read_text())
    assert saved == config and saved["num_clients"] == 2 and saved["num_classes"] == 3
    # client 1 holds labels 1, 2, 1 (train 1, 2, 7, 11 -> 1, 2, 1, 2; test 5, 8 -> 2, 2)
    assert saved["Size of samples for labels in clients"][1] == [[1, 2], [2, 4]]


def test_export_refuses_mismatched_parts(tmp_path: Path) -> None:
    x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="2 train parts but 1 test parts"):
        pfllib.export(x, y, [np.array([0]), np.array([1])], [np.array([2])], tmp_path, 1)


def test_curve_reading_matches_the_log(tmp_path: Path) -> None:
    # what the h5py stand-in writes for PFLlib's save_results, and PFLlib's log lines
    (tmp_path / "d_FedAvg_parity_0.h5").write_text(json.dumps({"rs_test_acc": [0.1, 0.25, 0.3125]}))
    assert pfllib.read_curve(tmp_path, "d", "FedAvg", "parity") == [0.1, 0.25, 0.3125]
    log = "Averaged Train Loss: 2.3\nAveraged Test Accuracy: 0.1000\nx\nAveraged Test Accuracy: 0.2500\n"
    assert pfllib.parse_stdout(log) == [0.1, 0.25]
