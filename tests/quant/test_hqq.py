"""HQQ (data-free) on a small layer with correlated inputs: output and weight error below RTN's."""
import pytest
import torch

from qcompile.quant.grids import AffineGrid
from qcompile.quant.hqq import _error_bound, hqq_quantize, shrink_lp, shrink_threshold

from test_gptq import GRIDS, assert_on_grid, correlated_layer, output_error


@pytest.mark.parametrize("grid,group", GRIDS, ids=lambda v: getattr(v, "zero_domain", v))
def test_hqq_output_error_below_rtn(grid, group):
    X, W = correlated_layer()
    q, scale, zero = hqq_quantize(W, grid, group)
    assert_on_grid(grid, q, scale, zero, group)
    rtn = grid.dequantize(*grid.round_to_nearest(W, group), group)
    hqq = grid.dequantize(q, scale, zero, group)
    # HQQ keeps, per group, the parameters with the lowest squared error seen; RTN's are the first it sees
    assert (W - hqq).square().mean() < 0.95 * (W - rtn).square().mean()  # measured 0.73-0.93x
    assert output_error(X, W, hqq) < 0.95 * output_error(X, W, rtn)  # measured 0.75-0.92x


def test_hqq_heavy_tailed_weights():
    """Outliers stretch min/max grids; the lp<1 penalty lets HQQ give them up for the bulk."""
    grid, group = AffineGrid(bits=4, zero_domain="float"), 64
    W = torch.distributions.StudentT(2.0).sample((64, 256)) * 0.02
    X = torch.randn(512, 256)
    rtn = grid.dequantize(*grid.round_to_nearest(W, group), group)
    hqq = grid.dequantize(*hqq_quantize(W, grid, group), group)
    assert output_error(X, W, hqq) < 0.9 * output_error(X, W, rtn)


def test_range_search_beats_one_start():
    """The shrunken starting ranges reach fits the iterations from min/max alone do not."""
    grid, group = AffineGrid(bits=4, zero_domain="float", qparam_dtype=torch.bfloat16), 64
    _, W = correlated_layer()
    one_start = grid.dequantize(*hqq_quantize(W, grid, group, range_starts=(1.0,)), group)
    searched = grid.dequantize(*hqq_quantize(W, grid, group), group)
    assert (W - searched).square().mean() < 0.98 * (W - one_start).square().mean()  # measured 0.96x


@pytest.mark.parametrize("grid,group", GRIDS, ids=lambda v: getattr(v, "zero_domain", v))
def test_error_bound_holds(grid, group):
    """HQQ skips the lp step when this bound is below the shrink threshold: it must bound every error."""
    _, W = correlated_layer()
    scale, zero = grid.choose_qparams(W, group)
    scale, zero = grid.representable(scale * 0.8, zero)  # a grid that clips the extreme weights
    groups = W.reshape(W.shape[0], -1, group)
    error = (W - grid.dequantize(grid.quantize(W, scale, zero, group), scale, zero, group)).abs()
    bound = _error_bound(grid, scale, zero, groups.amin(-1), groups.amax(-1))
    assert (error.reshape(groups.shape).amax(-1) <= bound * (1 + 1e-6)).all()
    assert shrink_lp(torch.tensor([shrink_threshold(10.0)]), beta=10.0).item() == 0.0


def test_cpu_threads_restored():
    threads = torch.get_num_threads()
    hqq_quantize(torch.randn(8, 64), AffineGrid(bits=4, zero_domain="int"), 32)
    assert torch.get_num_threads() == threads


def test_shrink_lp():
    x = torch.tensor([-3.0, -0.05, 0.0, 0.05, 3.0], dtype=torch.float64)
    torch.testing.assert_close(shrink_lp(x, beta=10.0, p=1.0), torch.tensor([-2.9, 0, 0, 0, 2.9], dtype=torch.float64))
    expected = torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-12).pow(-0.3) / 10.0)
    torch.testing.assert_close(shrink_lp(x, beta=10.0, p=0.7), expected)
    with pytest.raises(ValueError, match="not divisible by group_size 48"):
        hqq_quantize(torch.randn(4, 64), AffineGrid(bits=4, zero_domain="int"), 48)
