"""A Llama-3.1-8B-shaped decoder with random weights (hidden 4096, 32 heads / 8 KV heads, SwiGLU 14336,
vocab 128256, RoPE, RMSNorm) for GPU benchmarks; `layers` sets the depth. No KV cache: one forward over the
prompt, logits of the last position (the export benchmark's unit of work)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LLAMA_8B = dict(dim=4096, n_heads=32, n_kv=8, ffn=14336, vocab=128256, rope_theta=500000.0)


def rope(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, self.hd = c["dim"], c["dim"] // c["n_heads"]
        self.nh, self.nkv = c["n_heads"], c["n_kv"]
        self.wqkv = nn.Linear(d, (self.nh + 2 * self.nkv) * self.hd, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.w13 = nn.Linear(d, 2 * c["ffn"], bias=False)
        self.w2 = nn.Linear(c["ffn"], d, bias=False)
        self.n1, self.n2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = self.wqkv(self.n1(x)).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        q, k = (rope(t.view(B, T, -1, self.hd).transpose(1, 2), cos, sin) for t in (q, k))
        v = v.view(B, T, -1, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(o.transpose(1, 2).reshape(B, T, -1))
        g, u = self.w13(self.n2(x)).chunk(2, -1)
        return x + self.w2(F.silu(g) * u)


class Llama(nn.Module):
    def __init__(self, layers: int, max_seq: int = 4096, c=LLAMA_8B):
        super().__init__()
        self.emb = nn.Embedding(c["vocab"], c["dim"])
        self.layers = nn.ModuleList(Block(c) for _ in range(layers))
        self.norm = nn.RMSNorm(c["dim"], eps=1e-5)
        self.out = nn.Linear(c["dim"], c["vocab"], bias=False)
        hd = c["dim"] // c["n_heads"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(max_seq).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, ids):
        x = self.emb(ids)
        T = ids.shape[1]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.out(self.norm(x[:, -1:]))


def build(layers: int, device="cuda", dtype=torch.bfloat16, seed=0) -> Llama:
    torch.manual_seed(seed)
    with torch.device(device):
        model = Llama(layers)
    model = model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.cos, model.sin = model.cos.float(), model.sin.float()
    return model.eval()
