"""The Triton linear template against the reference `qcompile::` ops, every scheme, GEMV / tiled / split-K
variants, on fresh random inputs; and against the float64 product of the unquantized weight."""
import dataclasses

import pytest
import torch

from qcompile.kernels.triton.linear import LinearSpec, run_linear
from qcompile.kernels.triton.ops import fused_linear
from qcompile.kernels.triton.tuning import KernelConfig, candidates
from qcompile.quant.metrics import sqnr_db

from triton_cases import CASES, DEVICE, bits_of, case_id, quantized

N, K = 96, 256  # N is not a multiple of the 64-wide tiles: the masked edge is exercised
# (M, config): GEMV at M=1 (alone and split-K), tensor-core tiles with and without split-K at M=5 and 33, and
# the swapped tile (out^T = W x^T)
VARIANTS = [(1, KernelConfig(1, 32, 128, 1)), (1, KernelConfig(1, 64, 32, 4)), (5, KernelConfig(16, 64, 64, 2)),
            (33, KernelConfig(16, 64, 32, 2)), (33, KernelConfig(16, 64, 32, 2, swap_ab=True))]
LIBRARY = {"float": "dequant_mm", "int8": "int_mm", "fp8": "scaled_mm"}  # the library candidate per activation


def _inputs(dtype=torch.bfloat16, k=K):
    x = torch.randn(max(m for m, _ in VARIANTS), k, device=DEVICE, dtype=dtype)
    w = torch.randn(N, k, device=DEVICE, dtype=dtype) * 0.05
    bias = torch.randn(N, device=DEVICE, dtype=dtype)
    return x, w, bias


def _as_accurate(out, reference, exact) -> bool:
    """About as close to the unquantized float64 product as the reference numerics are, or within the bf16
    output rounding (~50 dB) where quantization error is that small."""
    return sqnr_db(exact, out.double()) > min(sqnr_db(exact, reference.double()) - 1.0, 40.0)


def _spec(case, options, weight_args, bias):
    _, w_scale, w_zero, _ = weight_args
    return LinearSpec(case.activation, case.weight_format, bits_of(case, options), options.group_size or 0,
                      w_scale_per_tensor=w_scale.numel() == 1, has_w_zero=w_zero is not None, has_bias=True)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_reference_ops(case):
    x_all, w, bias = _inputs()
    q, options = quantized(case, w)
    weight_args = case.weight_args(q)
    spec = _spec(case, options, weight_args, bias)
    for M, config in VARIANTS:
        if spec.scales_per_group_in_loop:  # one group scale per K block
            config = dataclasses.replace(config, block_k=min(config.block_k, spec.group_size))
        x = x_all[:M]
        out = run_linear(x, *weight_args, bias, spec, x.dtype, config)
        reference = case.reference(x, q, bias, options)
        exact = (x.double() @ w.double().t() + bias.double())
        assert out.shape == (M, N) and out.dtype == x.dtype
        assert torch.isfinite(out).all()
        assert sqnr_db(reference.float(), out.float()) > 30, f"M={M} {config}"
        assert _as_accurate(out, reference, exact), f"M={M} {config}"


@pytest.mark.parametrize("case", [c for c in CASES if c.scheme in ("int4_weight_only", "float8_dynamic", "nvfp4")],
                         ids=case_id)
def test_float16_activations(case):
    x_all, w, bias = _inputs(torch.float16)
    q, options = quantized(case, w)
    weight_args = case.weight_args(q)
    spec = _spec(case, options, weight_args, bias)
    for M, config in VARIANTS[1:3]:  # GEMV with split-K, and tensor-core tiles
        x = x_all[:M]
        out = run_linear(x, *weight_args, bias, spec, x.dtype, config)
        assert out.dtype == torch.float16
        assert sqnr_db(case.reference(x, q, bias, options).float(), out.float()) > 30, f"M={M} {config}"


INT8_INTX = [next(c for c in CASES if c.scheme == "int8_dynamic_int4"),
             *[dataclasses.replace(next(c for c in CASES if c.scheme == "int8_dynamic_intx"), options=(("bits", b),))
               for b in (1, 2, 3, 5, 6, 7, 8)]]


@pytest.mark.parametrize("case", INT8_INTX, ids=case_id)
def test_gemv_k_blocks_spanning_several_groups(case):
    """int8 activations with group-wise intx weights of every width (the DP4A GEMV: every bit plane's byte
    lanes): the tiles need a K block inside one group, the GEMV splits a block into its groups — here 4 groups
    of 32 per block, with split-K."""
    x_all, w, bias = _inputs()
    q, options = quantized(dataclasses.replace(case, options=tuple({**dict(case.options), "group_size": 32}.items())),
                           w)
    weight_args = case.weight_args(q)
    spec = _spec(case, options, weight_args, bias)
    config = KernelConfig(1, 32, 128, 2)
    assert spec.groups_fit(128, False, gemv=True) and not spec.groups_fit(128, False)
    out = run_linear(x_all[:1], *weight_args, bias, spec, x_all.dtype, config)
    reference = case.reference(x_all[:1], q, bias, options)
    assert sqnr_db(reference.float(), out.float()) > 30
    assert _as_accurate(out, reference, x_all[:1].double() @ w.double().t() + bias.double())
    with pytest.raises(ValueError, match="group_size=32"):  # the tile's rule still holds
        run_linear(x_all[:5], *weight_args, bias, spec, x_all.dtype, KernelConfig(16, 32, 128, 1))


@pytest.mark.parametrize("case", [c for c in CASES if LinearSpec(c.activation, c.weight_format).few_row_gemvs],
                         ids=case_id)
def test_gemvs_of_a_few_rows_over_whole_k_rows(case):
    """The M=1 candidates with 2-16 rows per program and K blocks up to 4096 (gemlite-like shapes: the elementwise
    GEMV, the int8 word GEMVs through float and DP4A), at a K they span whole."""
    x_all, w, bias = _inputs(k=4096)
    q, options = quantized(case, w)
    weight_args = case.weight_args(q)
    spec = _spec(case, options, weight_args, bias)
    configs = [c for c in candidates(spec, 1, N, 4096) if c.block_m == 1 and c.block_n <= 16 and c.split_k == 1]
    assert {c.block_k for c in configs} >= {512, 1024, 2048, 4096}
    assert any(c.reduce_each for c in configs) == spec.elementwise_gemv  # per-row sums every K block, too
    reference = case.reference(x_all[:1], q, bias, options)
    exact = x_all[:1].double() @ w.double().t() + bias.double()
    for config in configs:
        out = run_linear(x_all[:1], *weight_args, bias, spec, x_all.dtype, config)
        assert sqnr_db(reference.float(), out.float()) > 30, config
        assert _as_accurate(out, reference, exact), config


@pytest.mark.parametrize("case", [c for c in CASES if c.weight_format == "fp8"], ids=case_id)
def test_one_row_in_a_16_row_tile_for_fp8_weights(case):
    """fp8 weights at M=1 may take the 16-row tensor-core tile (the row repeated, the store masked): the H200 ran
    gate_up faster there than in any GEMV."""
    x_all, w, bias = _inputs()
    q, options = quantized(case, w)
    weight_args = case.weight_args(q)
    spec = _spec(case, options, weight_args, bias)
    config = next(c for c in candidates(spec, 1, N, K) if c.block_m == 16 and not c.swap_ab)
    x = x_all[:1]
    reference = case.reference(x, q, bias, options)
    out = run_linear(x, *weight_args, bias, spec, x_all.dtype, config)
    assert out.shape == (1, N)
    assert sqnr_db(reference.float(), out.float()) > 30
    assert _as_accurate(out, reference, x.double() @ w.double().t() + bias.double())


def test_gemvs_that_quantize_the_activation_themselves():
    """float8_dynamic per row at M=1: the GEMV candidates that take x in bf16 and quantize it to e4m3 themselves
    (one launch) give exactly what the activation kernel + the same GEMV give, split-K included."""
    case = next(c for c in CASES if c.scheme == "float8_dynamic" and dict(c.options).get("granularity") != "tensor")
    x_all, w, bias = _inputs(k=4096)
    q, options = quantized(case, w)
    weight_args = case.weight_args(q)
    spec = _spec(case, options, weight_args, bias)
    assert spec.activation == "fp8_row"
    fused = [c for c in candidates(spec, 1, N, 4096) if c.fuse_activation]
    assert len(fused) >= 8 and any(c.split_k > 1 for c in fused)
    reference = case.reference(x_all[:1], q, bias, options)
    for config in fused:
        out = run_linear(x_all[:1], *weight_args, bias, spec, x_all.dtype, config)
        apart = run_linear(x_all[:1], *weight_args, bias, spec, x_all.dtype,
                           dataclasses.replace(config, fuse_activation=False))
        assert torch.equal(out, apart), config
        assert sqnr_db(reference.float(), out.float()) > 40, config
    with pytest.raises(ValueError, match="fuse_activation"):  # tiles read a quantized activation
        run_linear(x_all[:16], *weight_args, bias, spec, x_all.dtype,
                   KernelConfig(16, 64, 128, 1, fuse_activation=True))


def test_split_k_with_an_empty_split_stores_its_zeros():
    """K=256 in three splits of 128: the last one has no K left and must still write its (zero) partial, since
    the partials buffer is not zero-filled; its memory first held NaNs here."""
    case = next(c for c in CASES if c.scheme == "int8_weight_only")
    x_all, w, bias = _inputs()
    q, options = quantized(case, w)
    weight_args = case.weight_args(q)
    spec = _spec(case, options, weight_args, bias)
    x = x_all[:5]
    one_split = run_linear(x, *weight_args, bias, spec, x.dtype, KernelConfig(16, 64, 64, 1))
    torch.full((3, 5, N), float("nan"), device=DEVICE)  # freed at once: likely the block the partials get next
    three_splits = run_linear(x, *weight_args, bias, spec, x.dtype, KernelConfig(16, 64, 64, 3))
    assert torch.isfinite(three_splits).all()
    assert sqnr_db(one_split.float(), three_splits.float()) > 40


def _library_of(spec: LinearSpec) -> str:
    return "dequant_mm" if spec.weight_format == "intx" else LIBRARY[spec.gemm_activation]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_library_candidate_matches_reference_ops(case):
    x_all, w, bias = _inputs()
    q, options = quantized(case, w)
    weight_args = case.weight_args(q)
    spec = _spec(case, options, weight_args, bias)
    if _library_of(spec) == "scaled_mm" and DEVICE == "cpu":
        pytest.skip("torch._scaled_mm needs CUDA")  # the GPU run covers it
    x = x_all[:33]
    out = run_linear(x, *weight_args, bias, spec, x.dtype, KernelConfig(0, 0, 0, library=_library_of(spec)))
    reference = case.reference(x, q, bias, options)
    assert sqnr_db(reference.float(), out.float()) > 30
    assert _as_accurate(out, reference, x.double() @ w.double().t() + bias.double())


@pytest.mark.parametrize("case", [c for c in CASES if c.scheme in ("int4_weight_only", "int8_dynamic")],
                         ids=case_id)
def test_fused_linear_op_keeps_leading_dims(case):
    x_all, w, bias = _inputs()
    q, options = quantized(case, w)
    x = x_all[:6].reshape(2, 3, K)
    qweight, w_scale, w_zero, w_aux = case.weight_args(q)
    out = fused_linear(x, qweight, w_scale, w_zero, w_aux, None, case.activation, case.weight_format,
                       bits_of(case, options), options.group_size or 0, x.dtype)
    reference = case.reference(x, q, None, options)
    assert out.shape == (2, 3, N)
    assert sqnr_db(reference.float(), out.float()) > 30


def test_every_candidate_config_fits_its_shape():
    spec = LinearSpec("int8_asym", "intx", bits=4, group_size=64)
    for M in (1, 3, 16, 100, 8192):
        for config in candidates(spec, M, 4096, 4096):
            # one group scale per K block, except in the plane decode (one per 8 weights) and the GEMVs (whole
            # groups per K block)
            assert config.library or (4096 % config.block_k == 0 and (
                config.planes or 64 % config.block_k == 0 or (config.block_m == 1 and config.block_k % 64 == 0)))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("M", [1, 16, 300])
def test_real_shapes_on_gpu(case, M):
    n, k = 4096, 4096
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    q, options = quantized(case, w)
    qweight, w_scale, w_zero, w_aux = case.weight_args(q)
    out = fused_linear(x, qweight, w_scale, w_zero, w_aux, bias, case.activation, case.weight_format,
                       bits_of(case, options), options.group_size or 0, x.dtype)
    reference = case.reference(x, q, bias, options)
    exact = x.double() @ w.double().t() + bias.double()
    assert sqnr_db(reference.float(), out.float()) > 30
    assert _as_accurate(out, reference, exact)


INTX_WO = next(c for c in CASES if c.scheme == "intx_weight_only")
PLANE_CASES = [next(c for c in CASES if c.scheme == "int4_weight_only"),
               *[c for c in CASES if c.scheme in ("int8_dynamic_int4", "float8_dynamic_int4")],
               dataclasses.replace(next(c for c in CASES if c.scheme == "int8_dynamic_intx"), options=(("bits", 3),)),
               *[dataclasses.replace(INTX_WO, options=(("bits", bits),)) for bits in (1, 2, 3, 4, 5, 6, 7)]]


@pytest.mark.parametrize("case", PLANE_CASES, ids=lambda c: f"{c.scheme}-{dict(c.options).get('bits', 4)}bit")
def test_plane_decode_matches_reference_ops(case):
    """The K-plane decode of sub-byte weights (inline PTX on the GPU, its float32 twin here) in swapped and
    plain tiles, with and without split-K, a dot per K-plane or the planes joined back into K order, at groups of 32 (parameters per word) and 256 (one per row when the K
    block lies in one group), every bit width 1-7 (several bit planes: a dot per plane)."""
    x_all, w, bias = _inputs(k=1024)
    for group in (32, 256):
        q, options = quantized(dataclasses.replace(case, options=tuple({**dict(case.options),
                                                                        "group_size": group}.items())), w)
        weight_args = case.weight_args(q)
        spec = _spec(case, options, weight_args, bias)
        assert spec.takes_planes
        block_k = spec.planes_min_block_k
        for M, config in [(1, KernelConfig(16, 64, block_k, 1, swap_ab=True, planes=True)),
                          (5, KernelConfig(16, 64, block_k, 1024 // block_k, swap_ab=True, planes=True)),
                          (33, KernelConfig(16, 64, block_k, 1, planes=True)),
                          (1, KernelConfig(16, 64, block_k, 2, swap_ab=True, planes=True, join_planes=True)),
                          (33, KernelConfig(16, 64, block_k, 1, planes=True, join_planes=True))]:
            x = x_all[:M]
            out = run_linear(x, *weight_args, bias, spec, x.dtype, config)
            reference = case.reference(x, q, bias, options)
            assert sqnr_db(reference.float(), out.float()) > 30, f"group {group} M={M} {config}"
            assert _as_accurate(out, reference, x.double() @ w.double().t() + bias.double()), \
                f"group {group} M={M} {config}"


INT4_WO = next(c for c in CASES if c.scheme == "int4_weight_only")


@pytest.mark.parametrize("group", [32, 128])
def test_pair_decode_matches_reference_ops(group):
    """The swapped int4 tile whose words decode by byte pairs into the dot's register operand (inline PTX on the
    GPU, its float32 twin here), x read in the fragment's K order: at group 128 every M from 1 to 17 (one 16-token
    tile, then two); N = 40 (not a multiple of the tiles: the masked edge); a K block over several groups,
    split-K, 32 tokens, and the group parameters applied after the dot; a group of equal weights (its range zero)
    and outliers in another; column-major group parameters as on CUDA. ~5-10 s each."""
    from qcompile.kernels.triton import layout

    n, k = 40, 256
    x_all = torch.randn(17, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.05
    bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    w[3, :group] = 0.25  # one group of equal weights
    w[7, group:group + 5] = torch.tensor([4.0, -3.0, 2.5, -6.0, 5.0], dtype=w.dtype)  # outliers in another
    case = dataclasses.replace(INT4_WO, options=(("group_size", group),))
    q, options = quantized(case, w)
    weight_args = case.weight_args(layout.for_kernels(q))
    spec = _spec(case, options, weight_args, bias)
    assert spec.takes_pair_decode
    configs = [KernelConfig(16, 64, 128, 1, swap_ab=True, pair_decode=True),
               KernelConfig(16, 32, 256, 1, swap_ab=True, pair_decode=True),
               KernelConfig(16, 32, 64, 4, swap_ab=True, pair_decode=True),
               KernelConfig(32, 64, 32, 1, swap_ab=True, pair_decode=True),
               KernelConfig(16, 64, 32, 2, swap_ab=True, pair_decode=True, scale_after_dot=True),
               KernelConfig(16, 64, 128, 1, swap_ab=True, pair_decode=True, block_product=True)]
    exact_all = x_all.double() @ w.double().t() + bias.double()
    for M in range(1, 18) if group == 128 else (1, 17):
        x = x_all[:M]
        reference = case.reference(x, q, bias, options)
        for config in configs if M in (1, 16, 17) else configs[:1]:
            out = run_linear(x, *weight_args, bias, spec, x.dtype, config)
            assert out.shape == (M, n) and torch.isfinite(out).all()
            assert sqnr_db(reference.float(), out.float()) > 40, f"M={M} {config}"
            assert _as_accurate(out, reference, exact_all[:M]), f"M={M} {config}"


GROUP_WISE = [c for c in CASES if c.scheme in ("int4_weight_only", "int8_dynamic_int4", "float8_dynamic_int4",
                                                "intx_weight_only", "int8_dynamic_intx", "mxfp8", "nvfp4")]
# the group parameters' reads do not depend on the bit width beyond the decode path it takes: of intx weight-only,
# 7 bits (planes of 4, 2 and 1 bits) and 8 (bytes) cover every path (the other widths cost ~100 s of CI here)
LAYOUT_CASES = [c for c in GROUP_WISE if c.scheme != "intx_weight_only" or dict(c.options).get("bits") in (7, 8)]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=case_id)
def test_column_major_group_parameters_give_the_same_output(case):
    """On CUDA the backend stores group parameters column-major (layout.for_kernels); every kernel path reads
    them through their strides: GEMV, tiles (swapped, split-K), the plane decode and the library dequantize."""
    from qcompile.kernels.triton import layout

    x_all, w, bias = _inputs(k=1024)  # K room for the 1-bit plane decode's BLOCK_K of 512
    q, options = quantized(case, w)
    q_column_major = layout.for_kernels(q)
    assert any(not q_column_major[k].is_contiguous() for k in layout.GROUP_PARAMETERS if k in q), case.scheme
    row_major_args, column_major_args = case.weight_args(q), case.weight_args(q_column_major)
    spec = _spec(case, options, row_major_args, bias)
    variants = list(VARIANTS)
    if spec.takes_planes:
        variants.append((5, KernelConfig(16, 64, spec.planes_min_block_k, 2, swap_ab=True, planes=True)))
        variants.append((5, KernelConfig(16, 64, spec.planes_min_block_k, 2, swap_ab=True, planes=True,
                                         join_planes=True)))
    if _library_of(spec) == "dequant_mm":
        variants.append((33, KernelConfig(0, 0, 0, library="dequant_mm")))
    for M, config in variants:
        if not (config.library or spec.groups_fit(config.block_k, config.planes, config.block_m == 1)):
            continue  # a K block must lie in one group here
        x = x_all[:M]
        expected = run_linear(x, *row_major_args, bias, spec, x.dtype, config)
        got = run_linear(x, *column_major_args, bias, spec, x.dtype, config)
        assert torch.equal(expected, got), f"M={M} {config}"


def test_kernel_variants_refuse_what_they_cannot_take():
    x_all, w, bias = _inputs()
    for scheme, config, message in [
            ("int8_weight_only", KernelConfig(16, 64, 128, 1, swap_ab=True, planes=True),
             "plane decode takes sub-byte group-wise weights"),
            ("int4_weight_only", KernelConfig(16, 64, 128, 1, swap_ab=True, join_planes=True),
             "join_planes joins the plane decode's K-planes"),
            ("int4_weight_only", KernelConfig(1, 32, 128, 1, reduce_each=True), "reduce_each is the elementwise"),
            ("int4_weight_only", KernelConfig(16, 64, 128, 1, pair_decode=True), "pair_decode is the swapped tile"),
            ("int8_weight_only", KernelConfig(16, 64, 128, 1, swap_ab=True, pair_decode=True),
             "pair_decode is the swapped tile"),
            ("int4_weight_only", KernelConfig(16, 64, 128, 1, swap_ab=True, scale_after_dot=True),
             "scale_after_dot applies"),
            ("int4_weight_only", KernelConfig(16, 64, 128, 1, swap_ab=True, block_product=True),
             "block_product adds"),
            ("float8_weight_only", KernelConfig(16, 64, 128, 1, reduce_each=True), "reduce_each is the elementwise")]:
        case = next(c for c in CASES if c.scheme == scheme)
        q, options = quantized(case, w)
        spec = _spec(case, options, case.weight_args(q), bias)
        with pytest.raises(ValueError, match=message):
            run_linear(x_all[:1], *case.weight_args(q), bias, spec, x_all.dtype, config)


def test_plane_decode_is_verified_before_autotuning_offers_it():
    from qcompile.kernels.triton.linear import planes_verified

    for bits in (1, 2, 3, 4, 5, 6, 7):
        assert planes_verified(DEVICE if DEVICE == "cpu" else "cuda:0", bits)
    spec = LinearSpec("float", "int4_tinygemm", bits=4, group_size=128, has_w_zero=True)
    assert any(c.planes and c.swap_ab for c in candidates(spec, 1, 4096, 4096))
    assert any(c.planes and not c.swap_ab for c in candidates(spec, 128, 4096, 4096))
    assert not any(c.planes for c in candidates(spec, 300, 4096, 4096))  # prefill: library GEMMs and tiles


def test_pair_decode_is_verified_before_autotuning_offers_it():
    from qcompile.kernels.triton.linear import pair_decode_verified

    assert pair_decode_verified(DEVICE if DEVICE == "cpu" else "cuda:0")
    spec = LinearSpec("float", "int4_tinygemm", bits=4, group_size=128, has_w_zero=True)
    for M, block_m in ((1, 16), (16, 16), (128, 128)):
        assert any(c.pair_decode and c.swap_ab and c.block_m == block_m for c in candidates(spec, M, 4096, 4096))
    assert candidates(spec, 16, 4096, 4096)[0] == KernelConfig(16, 64, 128, 1, 4, 4)  # never the default
    assert not any(c.pair_decode for c in candidates(spec, 300, 4096, 4096))
    group64 = LinearSpec("float", "int4_tinygemm", bits=4, group_size=64, has_w_zero=True)
    assert not any(c.scale_after_dot for c in candidates(group64, 16, 4096, 4096))  # a K block of 128: two groups
    int8 = LinearSpec("int8_asym", "intx", bits=4, group_size=128, has_w_zero=True)
    assert not any(c.pair_decode for c in candidates(int8, 16, 4096, 4096))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
def test_int4_plane_decode_on_gpu_real_shape(M):
    case = PLANE_CASES[0]
    n, k = 4096, 4096
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, options = quantized(dataclasses.replace(case, options=(("group_size", 128),)), w)
    weight_args = case.weight_args(q)
    spec = _spec(case, options, weight_args, None)
    for config in (KernelConfig(16, 128, 128, 1, swap_ab=True, planes=True),
                   KernelConfig(16, 256, 128, 4, swap_ab=True, planes=True),
                   KernelConfig(16, 128, 128, 2, swap_ab=True, planes=True, join_planes=True),
                   KernelConfig(64, 128, 128, 1, planes=True, join_planes=True)):
        out = run_linear(x, *weight_args, None, spec, x.dtype, config)
        reference = case.reference(x, q, None, options)
        assert sqnr_db(reference.float(), out.float()) > 40, config


def test_kernel_string_globals_are_one_line():
    """Inductor copies the globals a user Triton kernel reads into the source it generates; torch 2.11 writes a
    string between quotes as is, so a newline in one (inline PTX) broke every compiled CUDA model."""
    import triton.language as tl

    from qcompile.kernels.triton import activation, dequant, gemm

    for module in (activation, dequant, gemm):
        for name, value in vars(module).items():
            if isinstance(value, tl.constexpr) and isinstance(value.value, str):
                assert "\n" not in value.value and "'" not in value.value, f"{module.__name__}.{name}"


# the GEMVs with inline PTX: the group-sum GEMV of affine sub-byte weights, and the DP4A GEMV of int8
# activations with int8 or 4-bit weights
PTX_GEMV_CASES = [c for c in CASES if c.weight_format in ("int4_tinygemm", "intx")
                  or (c.weight_format == "int8" and c.activation == "int8_sym")]


@pytest.mark.gpu
@pytest.mark.parametrize("case", PTX_GEMV_CASES, ids=case_id)
def test_ptx_gemvs_on_gpu_real_shape(case):
    """The GEMVs whose inline PTX (mantissa decode, DP4A) runs only on the GPU, at a real shape, column-major
    group parameters as the backend stores them on CUDA, K blocks of one group, several groups and split-K."""
    from qcompile.kernels.triton import layout

    n, k = 4096, 4096
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    # the bias keeps the reference non-zero where the weights round to zero (symmetric 1-bit: torchao's int1
    # range is [-1, 0], so every |w| / scale <= 1/2 rounds to 0) and SQNR against it stays defined
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    grouped = case.weight_format != "int8"  # group 128, the size a real model takes
    q, options = quantized(dataclasses.replace(case, options=tuple({**dict(case.options),
                                                                    **({"group_size": 128} if grouped else {})}
                                                                   .items())), w)
    weight_args = case.weight_args(layout.for_kernels(q))
    spec = _spec(case, options, weight_args, bias)
    reference = case.reference(x, q, bias, options)
    exact = x.double() @ w.double().t() + bias.double()
    for config in (KernelConfig(1, 64, 512, 4), KernelConfig(1, 128, 128, 1), KernelConfig(1, 32, 64, 2)):
        assert spec.groups_fit(config.block_k, False, gemv=True)
        out = run_linear(x, *weight_args, bias, spec, x.dtype, config)
        assert sqnr_db(reference.float(), out.float()) > 40, config
        assert _as_accurate(out, reference, exact), config


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if LinearSpec(c.activation, c.weight_format).few_row_gemvs],
                         ids=case_id)
def test_few_row_and_fused_gemvs_on_gpu_real_shape(case):
    """Session 6's M=1 candidates at real shapes on the GPU (the other GPU tests take each bucket's first
    candidate): the few-row GEMVs over whole K rows, and for float8_dynamic per row the GEMVs that quantize the
    activation themselves with the hardware's e4m3 rounding — equal to the activation kernel + the same GEMV."""
    from qcompile.kernels.triton import layout

    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn(6144, device="cuda", dtype=torch.bfloat16)
    q, options = quantized(case, w)
    weight_args = case.weight_args(layout.for_kernels(q))
    spec = _spec(case, options, weight_args, bias)
    reference = case.reference(x, q, bias, options)
    configs = [c for c in candidates(spec, 1, 6144, 4096) if c.fuse_activation or (c.block_n <= 16 and c.split_k == 1)]
    assert configs
    for config in configs:
        out = run_linear(x, *weight_args, bias, spec, x.dtype, config)
        assert sqnr_db(reference.float(), out.float()) > 40, config
        if config.fuse_activation:
            apart = run_linear(x, *weight_args, bias, spec, x.dtype, dataclasses.replace(config, fuse_activation=False))
            assert torch.equal(out, apart), config


@pytest.mark.parametrize("case", [c for c in CASES if c.activation in ("int8_sym", "int8_asym", "fp8_row",
                                                                        "fp8_tensor")], ids=case_id)
def test_a_linear_on_an_activation_quantized_beforehand(case):
    """run_linear_quantized (fused_linear_quantized's body: the graph quantized x) on the activation kernel's
    output gives what run_linear gives on x — through the template and through dequantize-then-cuBLAS."""
    from qcompile.kernels.triton.linear import quantize_activation, run_linear_quantized

    x_all, w, bias = _inputs()
    q, options = quantized(case, w)
    weight_args = case.weight_args(q)
    spec = _spec(case, options, weight_args, bias)
    x = x_all[:4]
    xq, x_scale, x_zero = quantize_activation(x, spec.activation)
    prequantized = dataclasses.replace(spec, prequantized=True)
    for config in (candidates(prequantized, 4, N, K)[0], KernelConfig(0, 0, 0, library="dequant_mm")):
        expected = run_linear(x, *weight_args, bias, spec, x.dtype, config)
        out = run_linear_quantized(xq, x_scale, x_zero, *weight_args, bias, prequantized, x.dtype, config)
        assert sqnr_db(expected.float(), out.float()) > 40, config
