"""What the pass inserts, per scheme family, as readable graphs (expecttest: EXPECTTEST_ACCEPT=1 to update)."""
import expecttest
import torch
from torch.fx.node import map_arg

from conftest import MLP, Siblings, run_pass


def format_graph(gm) -> str:
    """One line per node: `name = op(args)`, placeholders listed first; aten/qcompile prefixes dropped."""
    lines = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            lines.append(f"input {n.name}")
        elif n.op == "output":
            lines.append(f"return {map_arg(n.args[0], lambda a: a.name)}")
        else:
            target = n.target.__name__ if callable(n.target) and not hasattr(n.target, "_schema") else str(n.target)
            target = target.replace("aten.", "").replace("qcompile.", "qcompile::").replace(".default", "")
            args = ", ".join(str(map_arg(a, lambda a: a.name)) for a in n.args)
            lines.append(f"{n.name} = {target}({args})")
    return "\n".join(lines)


def rewritten(options, model=None) -> str:
    _, (result,) = run_pass(model or MLP(), (torch.randn(4, 64),), options)
    return format_graph(result.gm)


class TestGraphs(expecttest.TestCase):
    def test_weight_only_int8(self):
        self.assertExpectedInline(rewritten({"scheme": "int8_weight_only"}), """\
input arg1_1
input arg2_1
input up_weight__qweight
input up_weight__scale
input down_weight__qweight
input down_weight__scale
up_dequantize_int8 = qcompile::dequantize_int8(up_weight__qweight, up_weight__scale, torch.float32)
up_linear = linear(arg2_1, up_dequantize_int8, arg1_1)
relu = relu(up_linear)
down_dequantize_int8 = qcompile::dequantize_int8(down_weight__qweight, down_weight__scale, torch.float32)
down_linear = linear(relu, down_dequantize_int8, None)
return ('down_linear',)""")

    def test_dynamic_int8(self):
        self.assertExpectedInline(rewritten({"scheme": "int8_dynamic"}), """\
input arg1_1
input arg2_1
input up_weight__qweight
input up_weight__scale
input down_weight__qweight
input down_weight__scale
up_quantize_int8_per_token = qcompile::quantize_int8_per_token(arg2_1)
up_q = getitem(up_quantize_int8_per_token, 0)
up_scale = getitem(up_quantize_int8_per_token, 1)
up_matmul_int8 = qcompile::matmul_int8(up_q, up_weight__qweight)
up_scale_output = qcompile::scale_output(up_matmul_int8, up_scale, up_weight__scale, arg1_1, torch.float32)
relu = relu(up_scale_output)
down_quantize_int8_per_token = qcompile::quantize_int8_per_token(relu)
down_q = getitem(down_quantize_int8_per_token, 0)
down_scale = getitem(down_quantize_int8_per_token, 1)
down_matmul_int8 = qcompile::matmul_int8(down_q, down_weight__qweight)
down_scale_output = qcompile::scale_output(down_matmul_int8, down_scale, down_weight__scale, None, torch.float32)
return ('down_scale_output',)""")

    def test_dynamic_float8_per_tensor(self):
        self.assertExpectedInline(rewritten({"scheme": "float8_dynamic", "granularity": "tensor"}), """\
input arg1_1
input arg2_1
input up_weight__qweight
input up_weight__scale
input down_weight__qweight
input down_weight__scale
up_quantize_float8 = qcompile::quantize_float8(arg2_1, tensor)
up_q = getitem(up_quantize_float8, 0)
up_scale = getitem(up_quantize_float8, 1)
up_matmul_float8 = qcompile::matmul_float8(up_q, up_weight__qweight)
up_scale_output = qcompile::scale_output(up_matmul_float8, up_scale, up_weight__scale, arg1_1, torch.float32)
relu = relu(up_scale_output)
down_quantize_float8 = qcompile::quantize_float8(relu, tensor)
down_q = getitem(down_quantize_float8, 0)
down_scale = getitem(down_quantize_float8, 1)
down_matmul_float8 = qcompile::matmul_float8(down_q, down_weight__qweight)
down_scale_output = qcompile::scale_output(down_matmul_float8, down_scale, down_weight__scale, None, torch.float32)
return ('down_scale_output',)""")

    def test_groupwise_int4_weight_only(self):
        self.assertExpectedInline(rewritten({"scheme": "int4_weight_only", "group_size": 64}), """\
input arg1_1
input arg2_1
input up_weight__qweight
input up_weight__scale
input up_weight__zero
input down_weight__qweight
input down_weight__scale
input down_weight__zero
up_dequantize_int4_tinygemm = qcompile::dequantize_int4_tinygemm(up_weight__qweight, up_weight__scale, up_weight__zero, 64, torch.float32)
up_linear = linear(arg2_1, up_dequantize_int4_tinygemm, arg1_1)
relu = relu(up_linear)
down_dequantize_int4_tinygemm = qcompile::dequantize_int4_tinygemm(down_weight__qweight, down_weight__scale, down_weight__zero, 64, torch.float32)
down_linear = linear(relu, down_dequantize_int4_tinygemm, None)
return ('down_linear',)""")

    def test_int8_activation_intx_weight(self):
        self.assertExpectedInline(rewritten({"scheme": "int8_dynamic_intx", "bits": 3}), """\
input arg1_1
input arg2_1
input up_weight__qweight
input up_weight__scale
input down_weight__qweight
input down_weight__scale
up_quantize_int8_per_token_asym = qcompile::quantize_int8_per_token_asym(arg2_1)
up_q = getitem(up_quantize_int8_per_token_asym, 0)
up_scale = getitem(up_quantize_int8_per_token_asym, 1)
up_zero = getitem(up_quantize_int8_per_token_asym, 2)
up_matmul_intx = qcompile::matmul_intx(up_q, up_zero, up_weight__qweight, up_weight__scale, None, 3, 32)
up_scale_output = qcompile::scale_output(up_matmul_intx, up_scale, None, arg1_1, torch.float32)
relu = relu(up_scale_output)
down_quantize_int8_per_token_asym = qcompile::quantize_int8_per_token_asym(relu)
down_q = getitem(down_quantize_int8_per_token_asym, 0)
down_scale = getitem(down_quantize_int8_per_token_asym, 1)
down_zero = getitem(down_quantize_int8_per_token_asym, 2)
down_matmul_intx = qcompile::matmul_intx(down_q, down_zero, down_weight__qweight, down_weight__scale, None, 3, 32)
down_scale_output = qcompile::scale_output(down_matmul_intx, down_scale, None, None, torch.float32)
return ('down_scale_output',)""")

    def test_block_scaled_mxfp8(self):
        self.assertExpectedInline(rewritten({"scheme": "mxfp8"}), """\
input arg1_1
input arg2_1
input up_weight__qweight
input up_weight__scale
input down_weight__qweight
input down_weight__scale
up_quantize_mxfp8 = qcompile::quantize_mxfp8(arg2_1)
up_q = getitem(up_quantize_mxfp8, 0)
up_scale = getitem(up_quantize_mxfp8, 1)
up_dequantize_mxfp8 = qcompile::dequantize_mxfp8(up_q, up_scale, torch.float32)
up_dequantize_mxfp8_1 = qcompile::dequantize_mxfp8(up_weight__qweight, up_weight__scale, torch.float32)
up_linear = linear(up_dequantize_mxfp8, up_dequantize_mxfp8_1, arg1_1)
relu = relu(up_linear)
down_quantize_mxfp8 = qcompile::quantize_mxfp8(relu)
down_q = getitem(down_quantize_mxfp8, 0)
down_scale = getitem(down_quantize_mxfp8, 1)
down_dequantize_mxfp8 = qcompile::dequantize_mxfp8(down_q, down_scale, torch.float32)
down_dequantize_mxfp8_1 = qcompile::dequantize_mxfp8(down_weight__qweight, down_weight__scale, torch.float32)
down_linear = linear(down_dequantize_mxfp8, down_dequantize_mxfp8_1, None)
return ('down_linear',)""")

    def test_codebook(self):
        self.assertExpectedInline(rewritten({"scheme": "codebook"}), """\
input arg1_1
input arg2_1
input up_weight__qweight
input up_weight__codebook
input up_weight__scale
input down_weight__qweight
input down_weight__codebook
input down_weight__scale
up_dequantize_codebook = qcompile::dequantize_codebook(up_weight__qweight, up_weight__codebook, up_weight__scale, torch.float32)
up_linear = linear(arg2_1, up_dequantize_codebook, arg1_1)
relu = relu(up_linear)
down_dequantize_codebook = qcompile::dequantize_codebook(down_weight__qweight, down_weight__codebook, down_weight__scale, torch.float32)
down_linear = linear(relu, down_dequantize_codebook, None)
return ('down_linear',)""")

    def test_siblings_fused_dynamic_int8(self):
        self.assertExpectedInline(rewritten({"scheme": "int8_dynamic"}, Siblings()), """\
input arg1_1
input arg2_1
input q_k_v_weight__qweight
input q_k_v_weight__scale
input gate_up_weight__qweight
input gate_up_weight__scale
input down_weight__qweight
input down_weight__scale
q_k_v_new_zeros = new_zeros(arg1_1, [32])
q_k_v_new_zeros_1 = new_zeros(arg1_1, [32])
q_k_v_cat = cat(['arg1_1', 'q_k_v_new_zeros', 'q_k_v_new_zeros_1'])
q_k_v_quantize_int8_per_token = qcompile::quantize_int8_per_token(arg2_1)
q_k_v_q = getitem(q_k_v_quantize_int8_per_token, 0)
q_k_v_scale = getitem(q_k_v_quantize_int8_per_token, 1)
q_k_v_matmul_int8 = qcompile::matmul_int8(q_k_v_q, q_k_v_weight__qweight)
q_k_v_scale_output = qcompile::scale_output(q_k_v_matmul_int8, q_k_v_scale, q_k_v_weight__scale, q_k_v_cat, torch.float32)
q_slice = slice.Tensor(q_k_v_scale_output, -1, 0, 64)
k_slice = slice.Tensor(q_k_v_scale_output, -1, 64, 96)
v_slice = slice.Tensor(q_k_v_scale_output, -1, 96, 128)
cat = cat(['k_slice', 'v_slice'], -1)
mul = mul.Tensor(q_slice, cat)
relu = relu(mul)
gate_up_quantize_int8_per_token = qcompile::quantize_int8_per_token(relu)
gate_up_q = getitem(gate_up_quantize_int8_per_token, 0)
gate_up_scale = getitem(gate_up_quantize_int8_per_token, 1)
gate_up_matmul_int8 = qcompile::matmul_int8(gate_up_q, gate_up_weight__qweight)
gate_up_scale_output = qcompile::scale_output(gate_up_matmul_int8, gate_up_scale, gate_up_weight__scale, None, torch.float32)
gate_slice = slice.Tensor(gate_up_scale_output, -1, 0, 128)
up_slice = slice.Tensor(gate_up_scale_output, -1, 128, 256)
silu = silu(gate_slice)
mul_1 = mul.Tensor(silu, up_slice)
down_quantize_int8_per_token = qcompile::quantize_int8_per_token(mul_1)
down_q = getitem(down_quantize_int8_per_token, 0)
down_scale = getitem(down_quantize_int8_per_token, 1)
down_matmul_int8 = qcompile::matmul_int8(down_q, down_weight__qweight)
down_scale_output = qcompile::scale_output(down_matmul_int8, down_scale, down_weight__scale, None, torch.float32)
return ('down_scale_output',)""")

    def test_siblings_fused_int4_weight_only(self):
        self.assertExpectedInline(rewritten({"scheme": "int4_weight_only", "group_size": 64}, Siblings()), """\
input arg1_1
input arg2_1
input q_k_v_weight__qweight
input q_k_v_weight__scale
input q_k_v_weight__zero
input gate_up_weight__qweight
input gate_up_weight__scale
input gate_up_weight__zero
input down_weight__qweight
input down_weight__scale
input down_weight__zero
q_k_v_new_zeros = new_zeros(arg1_1, [32])
q_k_v_new_zeros_1 = new_zeros(arg1_1, [32])
q_k_v_cat = cat(['arg1_1', 'q_k_v_new_zeros', 'q_k_v_new_zeros_1'])
q_k_v_dequantize_int4_tinygemm = qcompile::dequantize_int4_tinygemm(q_k_v_weight__qweight, q_k_v_weight__scale, q_k_v_weight__zero, 64, torch.float32)
q_k_v_linear = linear(arg2_1, q_k_v_dequantize_int4_tinygemm, q_k_v_cat)
q_slice = slice.Tensor(q_k_v_linear, -1, 0, 64)
k_slice = slice.Tensor(q_k_v_linear, -1, 64, 96)
v_slice = slice.Tensor(q_k_v_linear, -1, 96, 128)
cat = cat(['k_slice', 'v_slice'], -1)
mul = mul.Tensor(q_slice, cat)
relu = relu(mul)
gate_up_dequantize_int4_tinygemm = qcompile::dequantize_int4_tinygemm(gate_up_weight__qweight, gate_up_weight__scale, gate_up_weight__zero, 64, torch.float32)
gate_up_linear = linear(relu, gate_up_dequantize_int4_tinygemm, None)
gate_slice = slice.Tensor(gate_up_linear, -1, 0, 128)
up_slice = slice.Tensor(gate_up_linear, -1, 128, 256)
silu = silu(gate_slice)
mul_1 = mul.Tensor(silu, up_slice)
down_dequantize_int4_tinygemm = qcompile::dequantize_int4_tinygemm(down_weight__qweight, down_weight__scale, down_weight__zero, 64, torch.float32)
down_linear = linear(mul_1, down_dequantize_int4_tinygemm, None)
return ('down_linear',)""")
