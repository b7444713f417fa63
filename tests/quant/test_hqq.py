"""HQQ (data-free) on a small layer with correlated inputs: output and weight error below RTN's."""
import pytest
import torch

from qcompile.quant.grids import AffineGrid
from qcompile.quant.hqq import hqq_quantize, shrink_lp

from test_gptq import GRIDS, assert_on_grid, correlated_layer, output_error


@pytest.mark.parametrize("grid,group", GRIDS, ids=lambda v: getattr(v, "zero_domain", v))
def test_hqq_output_error_below_rtn(grid, group):
    X, W = correlated_layer()
    q, scale, zero = hqq_quantize(W, grid, group)
    assert_on_grid(grid, q, scale, zero, group)
    rtn = grid.dequantize(*grid.round_to_nearest(W, group), group)
    hqq = grid.dequantize(q, scale, zero, group)
    # HQQ keeps, per group, the parameters with the lowest mean |W - W'|: never worse than RTN's start
    assert (W - hqq).abs().mean() < (W - rtn).abs().mean()
    assert output_error(X, W, hqq) < 0.98 * output_error(X, W, rtn)  # measured 0.82-0.96x


def test_hqq_heavy_tailed_weights():
    """Outliers stretch min/max grids; the lp<1 penalty lets HQQ give them up for the bulk."""
    grid, group = AffineGrid(bits=4, zero_domain="float"), 64
    W = torch.distributions.StudentT(2.0).sample((64, 256)) * 0.02
    X = torch.randn(512, 256)
    rtn = grid.dequantize(*grid.round_to_nearest(W, group), group)
    hqq = grid.dequantize(*hqq_quantize(W, grid, group), group)
    assert output_error(X, W, hqq) < 0.9 * output_error(X, W, rtn)


def test_shrink_lp():
    x = torch.tensor([-3.0, -0.05, 0.0, 0.05, 3.0], dtype=torch.float64)
    torch.testing.assert_close(shrink_lp(x, beta=10.0, p=1.0), torch.tensor([-2.9, 0, 0, 0, 2.9], dtype=torch.float64))
    expected = torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-12).pow(-0.3) / 10.0)
    torch.testing.assert_close(shrink_lp(x, beta=10.0, p=0.7), expected)
    with pytest.raises(ValueError, match="not divisible by group_size 48"):
        hqq_quantize(torch.randn(4, 64), AffineGrid(bits=4, zero_domain="int"), 48)
