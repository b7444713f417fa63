"""The pair decode's inline PTX (dequant._int4_pairs_ptx, _int4_raw_pairs_ptx), run instruction by instruction by a
small emulator of the few PTX instructions it uses: the interpreter runs the plain-Triton twin instead, so without
this the bit logic (PRMT selectors, LOP3 masks, magic numbers, which half holds which K offset) would first be
checked on a GPU. Every weight against (q - 8) * scale + zero rounded once to bf16 / fp16. ~1 s."""
import random
import re

import pytest
import torch

from qcompile.kernels.triton.dequant import _int4_pairs_ptx, _int4_raw_pairs_ptx

HALF = {"bf16": torch.bfloat16, "f16": torch.float16}


def _to_float(bits: int, dtype) -> float:
    return torch.tensor([bits - (1 << 16) if bits >= 1 << 15 else bits], dtype=torch.int16).view(dtype).item()


def _to_bits(value: float, dtype) -> int:
    """float64 -> dtype, rounded once to nearest even."""
    return torch.tensor([value], dtype=torch.float64).to(dtype).view(torch.int16).item() & 0xFFFF


def _packed_fma(a: int, b: int, c: int, dtype) -> int:
    """fma.rn.{bf16x2,f16x2}: per 16-bit half a * b + c, exact in float64 for these operands, rounded once."""
    out = 0
    for shift in (0, 16):
        x, y, z = (_to_float((v >> shift) & 0xFFFF, dtype) for v in (a, b, c))
        out |= _to_bits(x * y + z, dtype) << shift
    return out


def run_ptx(ptx: str, operands: dict[str, int], dtype) -> list[int]:
    """Executes the PTX block; returns its 16-bit outputs $0..$7."""
    regs, outs = dict(operands), {}

    def value(token):
        return int(token, 16) if token.startswith("0x") else int(token) if token.isdigit() else regs[token]

    for statement in ptx.strip().removeprefix("{").removesuffix("}").split(";"):
        statement = statement.strip()
        if not statement or statement.startswith(".reg"):
            continue
        op, rest = statement.split(" ", 1)
        args = [a.strip() for a in re.split(r",(?![^{]*\})", rest)]
        if op == "mov.b32" and args[0].startswith("{"):  # split into two 16-bit outputs, low half first
            low, high = re.findall(r"\$\d+", args[0])
            outs[low], outs[high] = regs[args[1]] & 0xFFFF, regs[args[1]] >> 16
        elif op == "mov.b32" and args[1].startswith("{"):  # pack two 16-bit operands
            low, high = re.findall(r"\$\d+", args[1])
            regs[args[0]] = regs[low] | regs[high] << 16
        elif op == "mov.b32":
            regs[args[0]] = value(args[1])
        elif op == "shr.u32":
            regs[args[0]] = value(args[1]) >> value(args[2])
        elif op == "prmt.b32":  # byte i of the result = byte (selector nibble i) of {b, a}
            source, selector = value(args[1]) | value(args[2]) << 32, value(args[3])
            regs[args[0]] = sum(((source >> 8 * ((selector >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op == "lop3.b32" and args[4] == "0xea":  # (a & b) | c
            regs[args[0]] = (value(args[1]) & value(args[2])) | value(args[3])
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            regs[args[0]] = _packed_fma(value(args[1]), value(args[2]), value(args[3]), dtype)
        else:
            raise NotImplementedError(f"the emulator does not know {statement!r}")
    return [outs[f"${j}"] for j in range(8)]


@pytest.mark.parametrize("name", ["bf16", "f16"])
def test_pair_decode_ptx_gives_every_weight_of_the_word(name):
    dtype, rng = HALF[name], random.Random(0)
    for _ in range(200):
        word = rng.getrandbits(32)
        scale_bits = _to_bits(rng.uniform(0.001, 0.2) * rng.choice((1, -1)), dtype)
        zero_bits = _to_bits(rng.uniform(-1, 1), dtype)
        scale, zero = _to_float(scale_bits, dtype), _to_float(zero_bits, dtype)
        codes = [(word >> 4 * j) & 15 for j in range(8)]  # K offset j of the word (quant/packing.py)
        decoded = run_ptx(_int4_pairs_ptx(name), {"$8": word, "$9": scale_bits, "$10": zero_bits}, dtype)
        assert decoded == [_to_bits((q - 8) * scale + zero, dtype) for q in codes], hex(word)
        magic = 128 if name == "bf16" else 1024
        raw = run_ptx(_int4_raw_pairs_ptx("0x43004300" if name == "bf16" else "0x64006400"), {"$8": word}, dtype)
        assert [_to_float(bits, dtype) for bits in raw] == [magic + q for q in codes], hex(word)
