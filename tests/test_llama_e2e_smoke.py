"""benchmarks/llama_e2e.py at a tiny size on the CPU: the static-cache decoder agrees with itself (one token at a
time vs the whole prompt), and one qcompile row runs a decode phase into the JSON file and the markdown table."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import llama_e2e  # noqa: E402
import llama_model  # noqa: E402


def test_decoding_one_token_at_a_time_matches_prefill():
    config = llama_model.TINY
    model = llama_model.build(config, "cpu", torch.float32)
    ids = torch.randint(0, config.vocab, (2, 12))
    whole, stepwise = (llama_model.KVCache(config, 2, 16, "cpu", torch.float32) for _ in range(2))
    with torch.no_grad():
        expected = llama_model.prefill(model, ids, whole)
        for i in range(ids.shape[1]):
            out = model(ids[:, i:i + 1], torch.tensor([i]), stepwise)
    assert torch.allclose(out, expected, atol=1e-4)
    for a, b in zip(whole.k + whole.v, stepwise.k + stepwise.v):
        assert torch.allclose(a[:, :, :12], b[:, :, :12], atol=1e-5)
        assert not b[:, :, 12:].any()  # slots past the prompt untouched


def test_a_quantized_row_runs_and_renders(tmp_path):
    results, markdown = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nearlier sections\n")
    llama_e2e.main(["--tiny", "--device", "cpu", "--rows", "int8_weight_only", "--phases", "decode_b1",
                    "--out", str(results), "--write", str(markdown)])
    [record] = json.loads(results.read_text())
    decode = record["phases"]["decode_b1"]
    assert decode["tok_s"] > 0 and len(decode["times_s"]) == 2
    assert (decode["graphs_compiled"], decode["graph_breaks"]) == (1, 0)  # one graph serves every position
    compiled = decode["compile"]  # compiled by Inductor, or served whole by AOTAutograd's cache (an earlier run's)
    assert compiled["first_call_s"] > 0 and ((compiled["inductor_s"] or 0) > 0 or compiled["aot_cache_hits"] == 1)
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nearlier sections")
    assert "| qcompile int8_weight_only | int8, per row (sym) | bf16 | — |" in text


def test_per_layer_compile_rows(tmp_path):
    """--compile-scope layer: each block and the LM head compiled on their own — one graph serves every block, so
    a phase compiles two (block, head) — under rows named apart from the whole-model ones."""
    results, markdown = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n")
    llama_e2e.main(["--tiny", "--device", "cpu", "--rows", "int8_weight_only", "--phases", "decode_b1",
                    "--compile-scope", "layer", "--out", str(results), "--write", str(markdown)])
    [record] = json.loads(results.read_text())
    assert record["row"] == "int8_weight_only (per-layer compile)" and record["setup"]["compile_scope"] == "layer"
    decode = record["phases"]["decode_b1"]
    assert decode["tok_s"] > 0 and (decode["graphs_compiled"], decode["graph_breaks"]) == (2, 0)
    assert "| qcompile int8_weight_only (per-layer compile) | int8, per row (sym) | bf16 | — |" in markdown.read_text()
