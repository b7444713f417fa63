"""benchmarks/llama_e2e.py at a tiny size on the CPU: the static-cache decoder agrees with itself (one token at a
time vs the whole prompt), and one qcompile row runs a decode phase into the JSON file and the markdown table."""
import json
import sys
from pathlib import Path

import pytest
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


def test_transformers_rows_compile_per_layer(tmp_path):
    """transformers' LlamaForCausalLM under --compile-scope layer: each decoder layer and the LM head compiled with
    qcompile, generate() eager around them — one graph for every layer (block_views: they differ only by layer_idx)
    and one for the LM head, for the prompt and for the step, with no graph break."""
    pytest.importorskip("transformers")
    results, markdown = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n")
    llama_e2e.main(["--tiny", "--device", "cpu", "--rows", "transformers", "--compile-scope", "layer",
                    "--phases", "decode_b1", "--new-tokens", "8", "--reps", "1", "--out", str(results),
                    "--write", str(markdown)])
    [record] = json.loads(results.read_text())
    assert record["row"] == "transformers (per-layer compile)", record.get("error")
    decode = record["phases"]["decode_b1"]
    # a number (one timed repetition on a shared CPU: its sign is noise), measured without CUDA graphs on the CPU
    assert isinstance(decode["tok_s"], float) and not decode.get("cuda_graphs")
    assert (decode["graphs_compiled"], decode["graph_breaks"]) == (2 * 2, 0)
    # generate(1) and generate(8), timed: 8 decode steps and more without a recompile or a graph break
    assert (decode["graphs_compiled_while_timed"], decode["graph_breaks_while_timed"]) == (0, 0)
    assert "generate() (qcompile int4_weight_only) (per-layer compile) |" in markdown.read_text()


def test_tensor_parallel_mode_runs_the_sharded_benchmark(tmp_path):
    """--tp 2: llama_tp.py under torchrun, two gloo processes on the CPU, the model sharded Megatron-style; --check
    compares the sharded int4 model with the unsharded one (same groups on every rank: same numerics up to the
    all-reduce's summation order)."""
    results = tmp_path / "tp.json"
    llama_e2e.main(["--tp", "2", "--tiny", "--device", "cpu", "--rows", "int4_weight_only", "--phases", "decode_b1",
                    "--reps", "1", "--check", "--out", str(results)])
    [record] = json.loads(results.read_text())
    assert record["row"] == "int4_weight_only" and record["setup"]["tp"] == 2
    decode = record["phases"]["decode_b1"]
    assert decode["tok_s"] > 0 and decode["tokens_same_on_all_ranks"] and decode["graph_breaks"] == 0
    assert record["check"]["sqnr_db_tp_vs_single"] > 35, record["check"]


def test_tensor_parallel_mode_refuses_what_it_cannot_shard():
    with pytest.raises(SystemExit):
        llama_e2e.parse_args(["--tp", "2", "--compile-scope", "layer"])
    with pytest.raises(SystemExit):
        llama_e2e.parse_args(["--check"])  # --check needs --tp
    assert llama_e2e.tensor_parallel_command(["--tp=2", "--rows", "bf16"], 2)[-3:] == [
        str(llama_e2e.REPO / "benchmarks" / "llama_tp.py"), "--rows", "bf16"]


@pytest.mark.gpu
def test_per_layer_decode_step_replays_as_one_cuda_graph(monkeypatch):
    """Per-layer rows capture the whole decode step (compiled blocks + eager glue) as one CUDA graph: the replay
    reads ids / position / cache in place and gives the same tokens and cache as calling the step."""
    import types

    monkeypatch.setattr(llama_e2e, "COMPILE_SCOPE", "layer")
    config, device = llama_model.TINY, torch.device("cuda")
    model = llama_e2e.build_row_model(llama_e2e.row_named("int8_weight_only"), config,
                                      types.SimpleNamespace(dtype="bfloat16"), device)
    ids, pos = torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device)
    graphed, called = (llama_model.KVCache(config, 1, 16, device, torch.bfloat16) for _ in range(2))
    prompt = torch.randint(0, config.vocab, (6,), device=device)
    with torch.no_grad():
        llama_model.decode_step(model, ids, pos, called)  # compiles the block and the head
        replay = llama_e2e.captured_step(lambda: llama_model.decode_step(model, ids, pos, graphed), device)
        for cache in (graphed, called):  # the warm-up wrote position 0 of one cache only
            for t in cache.k + cache.v:
                t.zero_()
        for i, token in enumerate(prompt.tolist()):
            ids.fill_(token)
            pos.fill_(i)
            expected = llama_model.decode_step(model, ids, pos, called).clone()
            assert torch.equal(replay(), expected)
    for a, b in zip(graphed.k + graphed.v, called.k + called.v):
        assert torch.equal(a, b) and a[:, :, :6].abs().sum() > 0
