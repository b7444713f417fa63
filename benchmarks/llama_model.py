"""Llama-3.1-8B-shaped decoders with a static KV cache for benchmarks/llama_e2e.py: our own (fused qkv and
gate/up projections, as vLLM runs it) and transformers' LlamaForCausalLM, both with random weights.

Built on the meta device and materialized on the target device one layer at a time; a `quantize` callback
(e.g. qcompile.prepare) may turn each layer's float weights into quantized ones right after, so a quantized
model never holds all its float weights on the device. Decode shapes fit CUDA graphs: one token per sequence,
the position is a tensor input, attention reads the whole static cache under a mask (no shape depends on the
position, so one graph serves every step)."""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from llama_shapes import LLAMA_8B, rope  # noqa: E402


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv: int
    ffn: int
    vocab: int
    rope_theta: float
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


LLAMA_3_1_8B = LlamaConfig(n_layers=32, **LLAMA_8B)
# CPU smoke tests: every dimension a multiple of 128, so group-wise schemes quantize every linear
TINY = LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv=2, ffn=512, vocab=1024, rope_theta=500000.0)

Quantize = Callable[[nn.Module], None]  # called on each materialized layer and on the output head


class KVCache:
    """Per-layer K and V, [batch, kv heads, length, head dim], allocated once; their addresses never change
    (marked static, so CUDA-graph replays read and write them in place)."""

    def __init__(self, config: LlamaConfig, batch: int, length: int, device, dtype: torch.dtype):
        shape = (batch, config.n_kv, length, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        for t in (*self.k, *self.v):
            torch._dynamo.mark_static_address(t)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     input_pos: torch.Tensor) -> torch.Tensor:
    """One query token per sequence against the cache slots 0..input_pos. q: [B, heads, 1, hd]. The query heads
    of one KV head are batched as rows of one matmul (head h reads KV head h // group), so the cache is read
    once, never repeated per query head."""
    B, n_heads, _, hd = q.shape
    n_kv, length = k_cache.shape[1], k_cache.shape[2]
    q = q.reshape(B, n_kv, n_heads // n_kv, hd)
    scores = torch.matmul(q, k_cache.transpose(-1, -2)).float() * hd ** -0.5  # [B, kv, group, length]
    future = torch.arange(length, device=q.device) > input_pos
    probs = scores.masked_fill(future, float("-inf")).softmax(-1).to(q.dtype)
    return torch.matmul(probs, v_cache).reshape(B, n_heads, 1, hd)


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = c.n_heads, c.n_kv, c.head_dim
        self.wqkv = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv) * c.head_dim, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)
        self.w13 = nn.Linear(c.dim, 2 * c.ffn, bias=False)
        self.w2 = nn.Linear(c.ffn, c.dim, bias=False)
        self.n1, self.n2 = nn.RMSNorm(c.dim, eps=c.norm_eps), nn.RMSNorm(c.dim, eps=c.norm_eps)

    def forward(self, x, cos, sin, input_pos, k_cache, v_cache):
        B, T, _ = x.shape
        q, k, v = self.wqkv(self.n1(x)).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], -1)
        q, k = (rope(t.view(B, T, -1, self.hd).transpose(1, 2), cos, sin) for t in (q, k))
        v = v.view(B, T, -1, self.hd).transpose(1, 2)
        k_cache.index_copy_(2, input_pos, k)
        v_cache.index_copy_(2, input_pos, v)
        if T > 1:  # prefill into an empty cache (positions 0..T-1): causal attention within the chunk itself
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            o = decode_attention(q, k_cache, v_cache, input_pos)
        x = x + self.wo(o.transpose(1, 2).reshape(B, T, -1))
        g, u = self.w13(self.n2(x)).chunk(2, -1)
        return x + self.w2(F.silu(g) * u)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.out = nn.Linear(config.dim, config.vocab, bias=False)

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits of each sequence's last position, [B, vocab] (logits of earlier positions are never needed)."""
        x = self.emb(ids)
        hd = self.config.head_dim
        inv_freq = self.config.rope_theta ** -(torch.arange(0, hd, 2, device=ids.device, dtype=torch.float32) / hd)
        angles = input_pos.float()[:, None] * inv_freq
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            x = layer(x, cos, sin, input_pos, k_cache, v_cache)
        return self.out(self.norm(x[:, -1]))


def prefill(model: Llama, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Prompts [B, T] into an empty cache -> last-position logits [B, vocab]."""
    return model(ids, torch.arange(ids.shape[1], device=ids.device), cache)


def decode_step(model: Llama, ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per sequence [B, 1] at position input_pos [1] -> the greedy next token [B, 1]."""
    return model(ids, input_pos, cache).argmax(-1, keepdim=True)


def _init_random(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=generator)
            else:
                p.fill_(1.0)  # norm scales


def materialize(model: nn.Module, parts: list[nn.Module], device, seed: int, quantize: Quantize | None,
                quantized: set[int], on_part: Callable[[int], None] | None = None) -> None:
    """Move each of `parts` (meta) to `device` with random weights; pass the ones in `quantized` (by index) to
    `quantize` right after. Raises if anything of `model` stays on meta."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for i, part in enumerate(parts):
        part.to_empty(device=device)
        _init_random(part, generator)
        if quantize is not None and i in quantized:
            quantize(part)
        if on_part is not None:
            on_part(i)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"still on the meta device after materializing: {', '.join(left[:5])}")


def build(config: LlamaConfig, device, dtype=torch.bfloat16, seed: int = 0, quantize: Quantize | None = None,
          on_part: Callable[[int], None] | None = None) -> Llama:
    """Our Llama with random weights (normal, std 0.02; norms 1) on `device`, one layer at a time; `quantize`
    gets every decoder layer and the output head. `on_part(i)` reports progress over len(layers) + 3 parts."""
    with torch.device("meta"):
        model = Llama(config).to(dtype)
    parts = [model.emb, model.norm, *model.layers, model.out]
    materialize(model, parts, device, seed, quantize, set(range(2, len(parts))), on_part)
    return model.eval()


# --- transformers' LlamaForCausalLM -------------------------------------------------------------------------

def transformers_config(config: LlamaConfig):
    """transformers' LlamaConfig with our shapes (plain RoPE at theta 500000, as our model; Llama-3.1's
    long-context frequency scaling changes no cost)."""
    from transformers import LlamaConfig as HFLlamaConfig

    hf = HFLlamaConfig(vocab_size=config.vocab, hidden_size=config.dim, intermediate_size=config.ffn,
                       num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                       num_key_value_heads=config.n_kv, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
                       max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=0, eos_token_id=None,
                       pad_token_id=0)
    rope = getattr(hf, "rope_parameters", None)  # transformers 5 keeps theta here; older versions read rope_theta
    if isinstance(rope, dict) and rope.get("rope_theta") != config.rope_theta:
        raise RuntimeError(f"transformers did not take rope_theta={config.rope_theta}: rope_parameters={rope}")
    return hf


def build_transformers(config: LlamaConfig, device, dtype=torch.bfloat16, seed: int = 0,
                       quantize: Quantize | None = None, on_part: Callable[[int], None] | None = None):
    """transformers' LlamaForCausalLM (its own model code) with random weights, built as `build` does: meta,
    then one decoder layer at a time onto `device`, each passed to `quantize`, then the LM head."""
    from transformers import LlamaForCausalLM

    hf_config = transformers_config(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config).to(dtype)
    # rotary tables are computed buffers, not weights: build those modules again directly on the device
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                with torch.device(device):
                    setattr(parent, name, type(child)(config=hf_config))
    inner = model.model
    parts = [inner.embed_tokens, inner.norm, *inner.layers, model.lm_head]
    materialize(model, parts, device, seed, quantize, set(range(2, len(parts))), on_part)
    return model.eval()


def transformers_static_cache(model, batch: int, length: int):
    """A StaticCache allocated now (fixed addresses across generate() calls), for transformers 4.4x and 5.x."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kwargs = {"config": model.config, "max_cache_len": length}
    for name, value in (("max_batch_size", batch), ("batch_size", batch), ("device", model.device),
                        ("dtype", model.dtype)):
        if name in params:
            kwargs[name] = value
    cache = StaticCache(**kwargs)
    if hasattr(cache, "early_initialization"):  # transformers 5 allocates lazily, inside the first forward
        c = model.config
        cache.early_initialization(batch_size=batch, num_heads=c.num_key_value_heads,
                                   head_dim=c.hidden_size // c.num_attention_heads, dtype=model.dtype,
                                   device=model.device)
    return cache


def transformers_cache_nbytes(cache) -> int | None:
    """Bytes of a StaticCache's K/V tensors (transformers 5: cache.layers[i].keys; 4.4x: cache.key_cache[i])."""
    tensors = [getattr(layer, name, None) for layer in getattr(cache, "layers", ()) for name in ("keys", "values")]
    tensors += [*getattr(cache, "key_cache", ()), *getattr(cache, "value_cache", ())]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) if tensors else None
