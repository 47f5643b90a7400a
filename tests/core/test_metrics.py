import math

import pytest
import torch

from kdfl import metrics


def test_ece_hand_worked_example():
    # 4 samples, 2 classes. Confidences 0.9, 0.9 (bin (0.8667, 0.9333]) and 0.61, 0.61 (bin (0.6, 0.6667]).
    # first bin: both correct -> |1.0 - 0.9| = 0.1, weight 2/4; second: one correct -> |0.5 - 0.61| = 0.11
    # ECE = 0.5*0.1 + 0.5*0.11 = 0.105
    # ECE = 0.5*0.1 + 0.5*0.1 = 0.1
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.61, 0.39], [0.61, 0.39]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    assert metrics.ece(p.log(), y) == pytest.approx(0.105, abs=1e-12)


def test_ece_separates_bins():
    # confidences 0.55 (wrong) and 0.95 (right) fall in different bins:
    # ECE = 0.5*|0 - 0.55| + 0.5*|1 - 0.95| = 0.3 (a single bin would give |0.5 - 0.75| = 0.25)
    p = torch.tensor([[0.55, 0.45], [0.95, 0.05]], dtype=torch.float64)
    assert metrics.ece(p.log(), torch.tensor([1, 0])) == pytest.approx(0.3, abs=1e-12)


def test_ece_zero_for_perfectly_calibrated_bins():
    # confidence 0.75 on 4 samples, 3 right -> acc 0.75 = conf -> ECE 0
    logits = torch.tensor([[0.75, 0.25]] * 4, dtype=torch.float64).log()
    assert metrics.ece(logits, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-9)


def test_accuracy_nll():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    assert metrics.accuracy(logits, y) == pytest.approx(2 / 3)
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (math.e + 1)) + math.log(1 / (math.exp(3) + 1))) / 3
    assert metrics.nll(logits, y) == pytest.approx(expected)


def test_rounds_to_target():
    assert metrics.rounds_to_target([1, 2, 3], [0.5, 0.8, 0.9], 0.8) == 2
    assert metrics.rounds_to_target([1, 2, 3], [0.5, 0.6, 0.7], 0.8) is None
    assert metrics.rounds_to_target([2, 4], [0.9, 0.9], None) is None
