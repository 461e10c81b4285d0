"""Update balance: the Gini coefficient and the per-layer magnitudes behind the heat-maps."""

from __future__ import annotations

import pytest
import torch

from genie_dg.diagnostics.balance import gini, max_normalised, mean_absolute_change, min_max_normalised, rms_change


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_gini_of_equal_updates_is_zero(n):
    assert gini(torch.full((n,), 0.37)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n", [2, 5, 64])
def test_gini_of_a_single_moving_layer_is_n_minus_one_over_n(n):
    one_hot = torch.zeros(n)
    one_hot[n // 2] = 4.0
    assert gini(one_hot) == pytest.approx((n - 1) / n, abs=1e-12)


def test_gini_matches_the_pairwise_definition_and_ignores_scale_and_order():
    values = torch.tensor([3.0, 1.0, 2.0])
    # sum_ij |x_i - x_j| = 2 * (1 + 2 + 1) = 8; 2 n sum x = 2 * 3 * 6 = 36.
    assert gini(values) == pytest.approx(8 / 36, abs=1e-12)
    assert gini(10 * values.flip(0)) == pytest.approx(8 / 36, abs=1e-12)
    assert gini(torch.zeros(4)) == 0.0


def test_layer_magnitudes_are_per_coordinate_sizes():
    before = {"big": torch.zeros(100), "small": torch.zeros(4)}
    after = {"big": torch.full((100,), 0.5), "small": torch.tensor([0.5, -0.5, 0.5, -0.5])}
    # Every coordinate of both layers moved by 0.5: equal magnitudes despite the sizes.
    assert rms_change(before, after).tolist() == pytest.approx([0.5, 0.5])
    assert mean_absolute_change(before, after).tolist() == pytest.approx([0.5, 0.5])
    assert gini(rms_change(before, after)) == pytest.approx(0.0, abs=1e-12)


def test_column_normalisations():
    columns = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [2.0, 0.0, 2.0]], dtype=torch.float64)
    assert max_normalised(columns)[:, 0].tolist() == pytest.approx([1 / 3, 1.0, 2 / 3])
    assert min_max_normalised(columns)[:, 0].tolist() == pytest.approx([0.0, 1.0, 0.5])
    # All-zero and constant columns stay finite.
    assert max_normalised(columns)[:, 1].tolist() == [0.0, 0.0, 0.0]
    assert min_max_normalised(columns)[:, 2].tolist() == [0.0, 0.0, 0.0]
