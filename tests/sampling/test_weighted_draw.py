"""WeightedDraw: the Fenwick tree behind the balanced sampler's O(log C) draws, against plain sums and the
successive-sampling law of torch.multinomial(replacement=False)."""

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from doppel.sampling.weighted_draw import WeightedDraw


def test_prefix_sums_and_finds_match_a_plain_cumulative_sum_through_updates():
    rng = np.random.default_rng(0)
    weights = rng.random(37)
    draw = WeightedDraw(weights)
    for _ in range(200):
        cls, weight = int(rng.integers(37)), float(rng.random()) * (rng.random() > 0.2)
        draw.set(cls, weight)
        weights[cls] = weight
    cumulative = np.concatenate([[0.0], np.cumsum(weights)])
    assert np.allclose([draw.prefix(k) for k in range(38)], cumulative)
    for value in rng.random(500) * cumulative[-1]:
        expected = int(np.searchsorted(cumulative, value, side="right")) - 1
        assert draw.find(value) == expected or weights[draw.find(value)] == 0 == weights[expected]


def test_draws_follow_successive_sampling_without_replacement():
    weights = np.array([1.0, 2.0, 3.0, 4.0, 0.0])
    draw = WeightedDraw(weights)
    generator = torch.Generator().manual_seed(0)
    trials = 30000
    pairs = Counter(tuple(draw.draw(2, set(), generator)) for _ in range(trials))
    total = weights.sum()
    for i, j in itertools.permutations(range(4), 2):  # P(i then j) = w_i / W * w_j / (W - w_i)
        expected = weights[i] / total * weights[j] / (total - weights[i])
        assert abs(pairs[(i, j)] / trials - expected) < 0.008, (i, j)
    assert not any(4 in pair for pair in pairs)  # a class without weight is never drawn
    assert np.array_equal(draw.weights, weights) and draw.total() == pytest.approx(10.0)  # restored


def test_excluded_classes_are_never_drawn_and_keep_their_weight():
    draw = WeightedDraw(np.ones(6))
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        chosen = draw.draw(3, {0, 2}, generator)
        assert len(set(chosen)) == 3 and not {0, 2} & set(chosen)
    assert draw.total() == pytest.approx(6.0)
    with pytest.raises(ValueError, match="cannot draw 5 classes: only 4 have any weight left"):
        draw.draw(5, {0, 1}, generator)
