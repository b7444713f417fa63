"""Autotuning of the Triton linear template per (spec, M bucket, N, K), with the winners cached on disk.

Candidates are generated per M bucket (GEMV / split-K for decode, tiled for prefill) and filtered to those the
shape allows; library GEMMs join at large M. The cache file (QCOMPILE_CACHE_DIR, default ~/.cache/qcompile)
is keyed by device name, Triton version and a hash of the kernel sources, so a second process reuses the
choice without tuning, and an edited kernel is tuned again. The package ships the choices tuned on the H100 and the
H200 for Llama-3.1-8B's linears (tuned/*.json, read when the user's file lacks a key): a first compile on those
GPUs times nothing it has there.
QCOMPILE_AUTOTUNE=0 skips measuring and takes each bucket's first (heuristic) candidate.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import asdict, astuple, fields
from pathlib import Path
from typing import Callable

import torch
import triton

from .config import KernelConfig
from .linear import LinearSpec, pair_decode_verified, planes_verified


def m_bucket(M: int) -> int:
    """1 (GEMV), 16 (decode batches: 16-row tensor-core tiles), 64, 256, or 8192 (prefill)."""
    if M <= 1:
        return 1
    for edge in (16, 64, 256):
        if M <= edge:
            return edge
    return 8192


# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) per bucket class; BLOCK_M comes from the bucket.
# Swapped tiles (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages): the best of a sweep on the H200
# (benchmarks/experiments/gemv_lab.py) for int4 / int8 weights at M = 1 and 16; 1.25x the plain 16-row tile.
# GEMV: (64, 512, 4, 4, 2) .. (128, 512, 4, 4, 2) are the best of benchmarks/experiments/int4_bound_lab.py's sweep
# for the group-sum GEMV; the last four give each thread 8 rows (BLOCK_N = 64 x num_warps): every x value a
# thread loads, converts and scales serves 8 rows, not 2-4 — int4 4.2 SASS instructions per weight against 4.9
# at 4 rows and 6.3 at 2, 2-bit 3.8 against 4.4 / 5.5, int8 4.7 against 5.2 (sass_count.py, sm_90); split-K
# keeps the programs many.
_GEMV = [(32, 256, 1, 4, 3), (64, 128, 2, 4, 3), (32, 512, 2, 4, 2), (16, 256, 4, 2, 3), (64, 256, 4, 4, 2),
         (128, 128, 4, 4, 3), (32, 128, 8, 4, 3), (16, 512, 2, 4, 2), (32, 1024, 1, 8, 2), (16, 1024, 2, 4, 2),
         (64, 512, 4, 4, 2), (64, 128, 4, 4, 2), (128, 512, 4, 4, 2),
         (128, 128, 4, 2, 3), (128, 128, 8, 2, 3), (256, 128, 4, 4, 3), (64, 128, 8, 1, 3)]
# GEMVs of a few rows over a whole K row (gemlite's fp8 and int8 shapes at M=1: fp8 dynamic 63 us a layer against
# our 93, int8 weight-only 78 against 87): thousands of small programs, no split-K partials. Where the per-weight
# work allows (LinearSpec.few_row_gemvs): sub-byte words need wide row blocks to amortise their decode
_GEMV_ROWS = [(2, 4096, 1, 8, 1), (4, 4096, 1, 8, 1), (2, 2048, 1, 4, 1), (4, 2048, 1, 4, 1), (8, 1024, 1, 4, 2),
              (16, 512, 1, 4, 2), (8, 4096, 1, 8, 1)]
# and GEMVs that quantize the activation themselves (float8_dynamic per row): the few-row ones above and these
_GEMV_FUSED = [(32, 1024, 1, 8, 2), (32, 256, 1, 4, 3), (64, 128, 4, 4, 2)]
_SMALL = [(64, 128, 1, 4, 4), (32, 256, 2, 4, 3), (64, 128, 4, 4, 3), (128, 128, 2, 4, 3), (64, 256, 2, 4, 3),
          (128, 64, 4, 4, 4), (32, 128, 4, 4, 4), (32, 256, 4, 4, 3), (64, 128, 8, 4, 3)]
_MEDIUM = [(64, 64, 128, 1, 4, 4), (64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3), (64, 128, 128, 2, 4, 3),
           (32, 64, 128, 2, 4, 4), (64, 64, 128, 4, 4, 3)]
_SWAPPED_SMALL = [(16, 64, 128, 4, 4, 3), (16, 64, 128, 8, 4, 3), (16, 128, 128, 4, 4, 3)]
_SWAPPED_MEDIUM = [(64, 64, 128, 2, 4, 3), (128, 128, 64, 2, 8, 3)]
# plane-decoded sub-byte tiles (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages), all swapped: the
# fewest instructions per weight in an sm_90 SASS count (benchmarks/experiments/sass_count.py), split-K for
# occupancy; BLOCK_K grows to the bit width's smallest (256 for 2-bit, 512 with a 1-bit plane)
_PLANES = [(16, 128, 128, 1, 4, 3), (16, 128, 128, 2, 4, 3), (16, 128, 128, 4, 4, 3), (16, 256, 128, 2, 4, 3),
           (16, 64, 128, 4, 4, 3), (16, 128, 128, 8, 4, 2)]
# and plain (unswapped) plane-decoded tiles for mid-size M, where the decode is shared by BLOCK_M rows
_PLANES_MEDIUM = [(64, 128, 128, 1, 4, 3), (64, 64, 128, 2, 4, 3), (128, 128, 128, 2, 8, 3),
                  (128, 64, 128, 4, 4, 3)]
# swapped int4 tiles whose words decode by byte pairs straight into wgmma's register operand (pair_decode: ~2.1
# sm_90 SASS instructions per weight for the decode, 3.3-4.7 for the whole loop against 7.0 in the value-by-value
# swapped tile; sass_count.py); BLOCK_M 16 for decode (M <= 16: Triton runs 8-row tiles on mma.sync through shared
# memory), 32 / 64 / 128 tokens for M <= 256 (a bucket takes 1/4 to 1x its tokens); split-K fills the machine on the
# small linears. Unmeasured on the GPU: candidates, not defaults (benchmarks/experiments/int4_mma_lab.py times them)
_PAIR_DECODE = [(16, 128, 128, 1, 4, 3), (16, 128, 128, 2, 4, 3), (16, 128, 128, 4, 4, 3), (16, 64, 128, 4, 4, 3),
                (16, 128, 256, 2, 4, 3), (16, 256, 128, 2, 8, 3), (16, 128, 128, 8, 4, 3), (16, 64, 128, 1, 4, 3),
                (16, 64, 256, 1, 4, 3)]
# and with the group parameters applied to each K block's product (scale_after_dot: 1.1 instructions per weight
# for the decode, 2.9 for the whole loop at 16 tokens; at 128 tokens the per-block correction of the [BLOCK_N, 128]
# accumulator costs more than it saves: 10.1)
_PAIR_DECODE_AFTER_DOT = [(16, 128, 128, 1, 4, 3), (16, 128, 128, 2, 4, 3), (16, 128, 128, 4, 4, 3)]
# _PAIR_DECODE's and these each also as block_product: ptxas serializes every wgmma of the 16-token tiles and of most
# of these when the K block's product accumulates in place (C7515, sass_count.py's wgmma_serialized), not when it is
# added after — for BLOCK_M / BLOCK_K add instructions per weight (1/8 at 16 tokens, 1 at 128 x 128): found offline
# (sm_90), unmeasured on a GPU, so both forms are candidates
_PAIR_DECODE_MEDIUM = [(64, 128, 128, 1, 4, 3), (64, 128, 128, 2, 4, 3), (128, 128, 128, 1, 8, 3),
                       (128, 256, 64, 1, 8, 3), (128, 128, 128, 2, 8, 3), (64, 256, 128, 1, 8, 3),
                       (128, 256, 128, 1, 8, 3), (32, 128, 128, 2, 4, 3), (32, 256, 128, 1, 8, 3)]
_LARGE = [(128, 128, 64, 1, 8, 4), (128, 256, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3), (256, 128, 64, 1, 8, 3),
          (64, 256, 64, 1, 4, 4), (128, 64, 128, 1, 4, 4)]


def _current_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def pair_decode_tiles(bucket: int) -> list[KernelConfig]:
    """The pair-decode tiles for an M bucket up to 256 (16 tokens for M <= 16, 32 / 64 up to 64, 64 / 128 above)."""
    if bucket <= 16:
        return ([KernelConfig(*c, swap_ab=True, pair_decode=True, block_product=product) for c in _PAIR_DECODE
                 for product in (False, True)]
                + [KernelConfig(*c, swap_ab=True, pair_decode=True, scale_after_dot=True)
                   for c in _PAIR_DECODE_AFTER_DOT])
    return [KernelConfig(*c, swap_ab=True, pair_decode=True, block_product=product) for c in _PAIR_DECODE_MEDIUM
            for product in (False, True) if bucket // 4 <= c[0] <= bucket]  # each token tile decodes once more


def candidates(spec: LinearSpec, M: int, N: int, K: int) -> list[KernelConfig]:
    bucket = m_bucket(M)
    swapped = []
    if bucket <= 16:
        swapped = _SWAPPED_SMALL
    elif bucket <= 256:
        swapped = _SWAPPED_MEDIUM
    if bucket == 1:
        configs = [KernelConfig(1, *c) for c in _GEMV + (_GEMV_ROWS if spec.few_row_gemvs else [])]
        if spec.gemv_quantizes_activation:  # one launch: the GEMV quantizes x itself
            configs += [KernelConfig(1, *c, fuse_activation=True) for c in _GEMV_ROWS + _GEMV_FUSED]
        if spec.elementwise_gemv:  # the few-row GEMVs with per-row sums each K block: ~half the registers
            configs += [KernelConfig(1, *c, reduce_each=True) for c in _GEMV_ROWS]
        if spec.weight_format == "fp8":  # one row padded to a 16-row tensor-core tile: the H200 ran gate_up at M=16
            # in 33.5 us (fp8 weight-only) / 34.2 (float8_dynamic) against the best GEMV's 38.9 / 39.3 at M=1
            configs += [KernelConfig(16, *c) for c in _SMALL]
    elif bucket == 16:
        configs = [KernelConfig(16, *c) for c in _SMALL]
    else:
        configs = [KernelConfig(*c) for c in (_MEDIUM if bucket <= 256 else _LARGE)]
    configs += [KernelConfig(*c, swap_ab=True) for c in swapped]
    if bucket <= 256 and spec.takes_planes and planes_verified(_current_device(), spec.bits):
        plane_tiles = _PLANES if bucket <= 16 else _PLANES_MEDIUM
        for join in (False, True):  # joined: the 4- and 2-bit planes' K-planes in K order, one dot each
            configs += [KernelConfig(*c[:2], max(c[2], spec.planes_min_block_k), *c[3:], swap_ab=bucket <= 16,
                                     planes=True, join_planes=join) for c in plane_tiles[:None if not join else 3]]
    if bucket <= 256 and spec.takes_pair_decode and pair_decode_verified(_current_device()):
        configs += pair_decode_tiles(bucket)

    def fits(c: KernelConfig) -> bool:
        return (not (K % c.block_k or K < c.block_k * c.split_k) and spec.groups_fit(c.block_k, c.planes, c.block_m == 1)
                and not (c.scale_after_dot and spec.group_size % c.block_k))

    kept = [c for c in configs if fits(c)]
    if not kept:  # the smallest K block always fits (K % 32 == 0 is required upstream)
        kept = [KernelConfig(bucket if bucket <= 16 else 64, 32, 32, 1, 4, 2)]
    if bucket >= 256 and (spec.gemm_activation == "float" or spec.weight_format == "intx"):
        kept.append(KernelConfig(0, 0, 0, library="dequant_mm"))
    if bucket >= 64 and spec.weight_format == "fp8" and spec.gemm_activation == "fp8":
        kept.append(KernelConfig(0, 0, 0, library="scaled_mm"))
    if bucket >= 64 and spec.weight_format == "int8" and spec.activation == "int8_sym":
        kept.append(KernelConfig(0, 0, 0, library="int_mm"))
    return kept


_ID_FIELDS = 11  # KernelConfig's fields when ids were introduced: a field added since counts only when set


def config_id(config: KernelConfig) -> str:
    """A short, stable name for one candidate: a cache entry lists the candidates its choice was measured against
    (a new field at its default leaves every existing candidate's name as it was)."""
    values = astuple(config)
    defaults = [f.default for f in fields(KernelConfig)]
    used = max([_ID_FIELDS] + [i + 1 for i in range(_ID_FIELDS, len(values)) if values[i] != defaults[i]])
    return hashlib.sha256(repr(values[:used]).encode()).hexdigest()[:10]


class ConfigCache:
    """Chosen configs by key, each with the ids of the candidates it beat, mirrored to one JSON file (merged on
    write, so processes can share it)."""

    def __init__(self, path: Path | None = None, shipped: tuple[Path, ...] = ()):
        root = Path(os.environ.get("QCOMPILE_CACHE_DIR", Path.home() / ".cache" / "qcompile"))
        self.path = path or root / "triton_linear_configs.json"
        self.shipped = shipped  # read-only choices consulted after the user's file (SHIPPED)
        self._lock = threading.Lock()
        self._entries: dict[str, dict] | None = None
        self._shipped_entries: dict[str, dict] | None = None

    def _shipped(self) -> dict[str, dict]:
        if self._shipped_entries is None:
            self._shipped_entries = {}
            for path in self.shipped:
                self._shipped_entries.update(json.loads(path.read_text()))
        return self._shipped_entries

    def _load(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def get_entry(self, key: str) -> tuple[KernelConfig, frozenset[str]] | None:
        with self._lock:
            if self._entries is None:
                self._entries = self._load()
            entry = self._entries.get(key) or self._shipped().get(key)
        if entry is None or "config" not in entry:  # not this format's: tuned again
            return None
        return KernelConfig(**entry["config"]), frozenset(entry["tried"])

    def get(self, key: str) -> KernelConfig | None:
        entry = self.get_entry(key)
        return entry[0] if entry is not None else None

    def put(self, key: str, config: KernelConfig, tried: frozenset[str]) -> None:
        with self._lock:
            entries = self._load()
            entries[key] = {"config": asdict(config), "tried": sorted(tried)}
            self._entries = entries
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


# the choices tuned on the device's GPUs, one file per GPU (benchmarks/h200_seed.py adds a call's new choices)
TUNED_DIR = Path(__file__).parent / "tuned"
SHIPPED = tuple(sorted(TUNED_DIR.glob("*.json")))
CACHE = ConfigCache(shipped=SHIPPED)


# sources in this folder that do not change what a config computes or how fast: the tuner itself (its candidate
# lists: a cache entry names the candidates it was measured against) and the ops that call it
_NOT_HASHED = {"tuning.py", "ops.py"}


@functools.lru_cache(None)
def template_version() -> str:
    """A hash of the Triton kernels' sources and their launchers (this folder but _NOT_HASHED): a choice tuned for
    other kernel code is not reused — after an edit the fastest config can differ (session 4's new GEMV would have
    kept old picks). A new candidate is measured against the cached choice alone (select_config)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name not in _NOT_HASHED:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cache_key(spec: LinearSpec, M: int, N: int, K: int, device_name: str) -> str:
    return (f"{device_name}|triton {triton.__version__}|kernels {template_version()}|{spec.key()}|M{m_bucket(M)}"
            f"|N{N}|K{K}")


def _never_met(options: list[KernelConfig], tried: frozenset[str]) -> list[KernelConfig]:
    return [c for c in options if config_id(c) not in tried]


def untried_candidates(spec: LinearSpec, M: int, N: int, K: int, device_name: str) -> list[KernelConfig]:
    """The candidates that select_config would measure now: all of them without a cached choice, else those the
    choice never met."""
    options = candidates(spec, M, N, K)
    entry = CACHE.get_entry(cache_key(spec, M, N, K, device_name))
    return options if entry is None else _never_met(options, entry[1])


def autotune_enabled() -> bool:
    """QCOMPILE_AUTOTUNE=0 turns measuring off (each bucket's first candidate, or the cached choice)."""
    return os.environ.get("QCOMPILE_AUTOTUNE", "1") != "0"


def select_config(spec: LinearSpec, M: int, N: int, K: int, device_name: str,
                  measure: Callable[[KernelConfig], float] | None) -> KernelConfig:
    """The cached choice (measured against candidates added since, when `measure` is given), else the fastest
    candidate by `measure` (seconds), else the first candidate."""
    key = cache_key(spec, M, N, K, device_name)
    options = candidates(spec, M, N, K)
    can_measure = measure is not None and autotune_enabled()
    entry = CACHE.get_entry(key)
    shared_choice_unusable = entry is not None and entry[0].fuse_activation and not spec.gemv_quantizes_activation
    if shared_choice_unusable:  # a GEMV that quantizes x, for an x quantized already (the key is shared): tuned
        entry = None  # here among the rest, and not stored over the entry the other kind of call uses
    if entry is not None:
        cached, tried = entry
        new = _never_met(options, tried)
        if not new or not can_measure:
            return cached
        options = [cached] + new  # timings of another process are not comparable: the choice is timed again
    elif not can_measure or len(options) == 1:
        return options[0]
    else:
        tried = frozenset()
    timings = []
    for config in options:
        try:
            timings.append((measure(config), config))
        except Exception:  # a config the compiler rejects (shared memory, registers) just loses
            continue
    if not timings:
        return options[0]
    best = min(timings, key=lambda t: t[0])[1]
    if not shared_choice_unusable:
        CACHE.put(key, best, tried | {config_id(c) for c in options})
    return best
