"""Bit-plane packing along K: exact round trips and the documented byte layout."""
import pytest
import torch

from qcompile.quant.packing import pack_along_k, plane_offsets, planes, unpack_along_k


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_every_width(bits):
    u = torch.randint(0, 1 << bits, (5, 96))
    packed = pack_along_k(u, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 96 * bits // 8)
    assert torch.equal(unpack_along_k(packed, bits, 96), u.to(torch.int32))


def test_int4_low_nibble_holds_even_k():
    u = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert pack_along_k(u, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_planes_split_widest_first_with_high_bits():
    assert planes(7) == (4, 2, 1) and planes(3) == (2, 1) and planes(8) == (8,)
    # 7 bits: the 4-bit plane holds bits 3..6, the 2-bit plane bits 1..2, the 1-bit plane bit 0
    assert plane_offsets(7) == ((4, 3, 0), (2, 1, 4), (1, 0, 6))
    u = torch.tensor([[0b1011010] + [0] * 7])
    packed = pack_along_k(u, 7)  # K=8: planes of 4, 2, 1 bytes
    assert packed[0, 0] & 0xF == 0b1011 and packed[0, 4] & 0b11 == 0b01 and packed[0, 6] & 1 == 0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_along_k(torch.zeros(2, 12, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        planes(9)



def test_packs_under_symbolic_shapes():
    """Found by tests/test_randomized.py: nvfp4 packs its activation, whose M is symbolic once Dynamo marks it
    dynamic; the `<<` / `>>` tensor operators' fake-tensor meta failed on a symbolic size (now bitwise_*_shift)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    u = mode.from_tensor(torch.randint(0, 16, (5, 32), dtype=torch.int32), symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC]))
    with mode:
        for bits in (1, 3, 4):
            packed = pack_along_k(u, bits)
            assert isinstance(packed.shape[0], torch.SymInt) and unpack_along_k(packed, bits, 32).shape == u.shape
