"""Tensor-parallel decode (issue 10): the Llama-3.1-8B-shaped decoder of llama_model.py sharded Megatron-style
over one process per GPU (fused qkv and gate/up column-parallel, o and down row-parallel, the LM head
column-parallel with its logits gathered), decode tokens/s at batch 1 and 128 for bf16 and qcompile schemes.

    torchrun --nproc-per-node 2 benchmarks/llama_tp.py                      # 2 GPUs, NCCL; appends to --out
    torchrun --nproc-per-node 2 benchmarks/llama_tp.py --rows int4_weight_only --check
    torchrun --nproc-per-node 2 benchmarks/llama_tp.py --tiny --device cpu --rows bf16,int8_weight_only \\
        --check --out /tmp/tp.json                                          # CPU smoke test, gloo
    python benchmarks/llama_tp.py --write BENCHMARKS.md                    # renders --out, runs nothing

NVLink multicast stays off: the script sets NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 before
the process group starts. Each rank builds the whole bf16 model (same seed, so the same weights), reorders the
fused projections' rows so that each rank's Shard(0) holds its own q/k/v heads and its own gate/up columns, and
hands it to parallelize_module; `torch.compile(backend="qcompile")` then quantizes each rank's local shards.
Decode follows llama_e2e.py's protocol exactly (its decode_phase is reused: prompt fed through the step, greedy
tokens timed, best of --reps; bf16: mode="reduce-overhead", qcompile: options {"cudagraphs": True}).
--check: the issue's numerics target, against the unsharded model under the same options on rank 0's device
(logits SQNR and greedy tokens, see check_against_single_device).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (NVLS): before NCCL starts
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Replicate  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import llama_model  # noqa: E402
from harness import (INVOCATION, REPO, START, allocated, device_name, gb, git_commit, log, saver, sync,  # noqa: E402
                     table, versions, write_section)
from llama_e2e import cleanup, decode_phase, row_named  # noqa: E402
from llama_model import LLAMA_3_1_8B, TINY  # noqa: E402

from qcompile.quant.metrics import sqnr_db  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "llama_tp_results.json"
DEFAULT_ROWS = "bf16,int4_weight_only,float8_dynamic,int8_weight_only"
PHASES = ("decode_b1", "decode_b128")


def megatron_layout(block: llama_model.Block, tp: int) -> None:
    """Reorder the fused projections' output rows from [q | k | v] and [gate | up] to one block per rank,
    [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], so that Shard(0) gives rank r its own heads and FFN columns; then the
    block's head counts become per rank (its forward splits and views by them). The function is unchanged."""
    hd, tp_heads, tp_kv = block.hd, block.n_heads // tp, block.n_kv // tp
    if block.n_heads % tp or block.n_kv % tp:
        raise SystemExit(f"tensor parallel over {tp} ranks: {block.n_heads} heads / {block.n_kv} KV heads do not "
                         f"split evenly")
    with torch.no_grad():
        q, k, v = block.wqkv.weight.split([block.n_heads * hd, block.n_kv * hd, block.n_kv * hd])
        ranks = [torch.cat([q[r * tp_heads * hd:(r + 1) * tp_heads * hd], k[r * tp_kv * hd:(r + 1) * tp_kv * hd],
                            v[r * tp_kv * hd:(r + 1) * tp_kv * hd]]) for r in range(tp)]
        block.wqkv.weight.copy_(torch.cat(ranks))
        gate, up = block.w13.weight.chunk(2)
        block.w13.weight.copy_(torch.cat([torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]))
    block.n_heads, block.n_kv = tp_heads, tp_kv


def tensor_parallel_plan() -> dict:
    return {"layers.*.wqkv": ColwiseParallel(), "layers.*.wo": RowwiseParallel(),
            "layers.*.w13": ColwiseParallel(), "layers.*.w2": RowwiseParallel(),
            "out": ColwiseParallel(output_layouts=Replicate())}


def shard(model: llama_model.Llama, mesh) -> llama_model.Llama:
    tp = mesh.size()
    for block in model.layers:
        megatron_layout(block, tp)
    parallelize_module(model, mesh, tensor_parallel_plan())
    # the KV cache decode_phase allocates from model.config holds this rank's KV heads only
    model.config = dataclasses.replace(model.config, n_kv=model.config.n_kv // tp)
    return model


def over_budget(args) -> bool:
    """Whether --budget-s has passed, by rank 0's clock, so that every rank skips the same phases."""
    decision = [args.budget_s is not None and time.monotonic() - START > args.budget_s]
    dist.broadcast_object_list(decision, src=0)
    return decision[0]


def same_on_all_ranks(tokens: list[int]) -> bool:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, tokens)
    return all(g == gathered[0] for g in gathered)


def run_row(row, args, device, config, mesh, phases, save) -> dict:
    rank = dist.get_rank()
    record = {"row": row.name, "invocation": INVOCATION, "weight": row.weight, "activation": row.activation,
              "options": row.options, "started": INVOCATION, "setup": setup(args, device, config, mesh),
              "phases": {}}
    cleanup(device)
    log(f"[rank {rank}] {row.name}: building ({config.n_layers} layers, {args.dtype}), sharding over {mesh.size()}")
    start = time.perf_counter()
    with torch.no_grad():
        model = shard(llama_model.build(config, device, getattr(torch, args.dtype), seed=0), mesh)
    cleanup(device)  # the unsharded weights are garbage now
    sync(device)
    record["build_s"] = round(time.perf_counter() - start, 1)
    record["weights_gb_per_rank"] = gb(allocated(device))
    if args.check:
        record["check"] = check_against_single_device(model, row, args, device, config)
        if rank == 0:
            save(record)
    for phase in phases:
        batch = int(phase.removeprefix("decode_b"))
        if over_budget(args):
            record["phases"][phase] = {"skipped": f"--budget-s {args.budget_s} reached"}
            log(f"[rank {rank}] {row.name} {phase}: skipped, --budget-s reached")
            continue
        try:
            result = decode_phase(model, row, args, device, batch)
            result["tokens_same_on_all_ranks"] = same_on_all_ranks(result["first_tokens"])
            log(f"[rank {rank}] {row.name} {phase}: {result['tok_s']} tok/s")
        except Exception as e:  # noqa: BLE001 (recorded, the next phase runs)
            result = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
            log(f"[rank {rank}] {row.name} {phase}: FAILED\n{traceback.format_exc()}")
        record["phases"][phase] = result
        if rank == 0:
            save(record)
        torch._dynamo.reset()
        cleanup(device)
        dist.barrier()
    del model
    cleanup(device)
    return record


def check_against_single_device(model, row, args, device, config) -> dict | None:
    """The issue's numerics target, on one --prompt-len prompt: the last position's logits of the sharded model
    and of the unsharded one (rank 0, its own device), both compiled with the row's options (no CUDA graphs),
    against the unsharded model in float (bf16 eager); then --new-tokens greedy tokens of each, eagerly stepped
    through the compiled decode step. Quantization noise of a random-weight model is close to its logit gaps, so
    greedy tokens may part after a few steps where the logits agree to within the scheme's own error."""
    prompt = torch.randint(0, config.vocab, (1, args.prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(2))

    def logits_and_tokens(m):
        options = {k: v for k, v in (row.options or {}).items() if k != "cudagraphs"}
        compiled = (torch.compile(m, backend="qcompile", options=options, dynamic=False) if row.options else
                    torch.compile(m, dynamic=False))
        cache = llama_model.KVCache(m.config, 1, args.prompt_len + args.new_tokens, device, m.emb.weight.dtype)
        with torch.no_grad():
            logits = compiled(prompt, torch.arange(args.prompt_len, device=device), cache)
            tokens, token = [], logits.argmax(-1, keepdim=True)
            for i in range(args.new_tokens):
                tokens.append(token.item())
                position = torch.tensor([args.prompt_len + i], device=device)
                token = compiled(token, position, cache).argmax(-1, keepdim=True)
        return logits.float(), tokens

    tp_logits, tp_tokens = logits_and_tokens(model)
    torch._dynamo.reset()
    result = None
    if dist.get_rank() == 0:
        single = llama_model.build(config, device, getattr(torch, args.dtype), seed=0)
        with torch.no_grad():
            cache = llama_model.KVCache(single.config, 1, args.prompt_len, device, single.emb.weight.dtype)
            reference = single(prompt, torch.arange(args.prompt_len, device=device), cache).float()
        single_logits, single_tokens = logits_and_tokens(single)
        del single
        agree = next((i for i, (a, b) in enumerate(zip(tp_tokens, single_tokens)) if a != b), len(tp_tokens))
        result = {"sqnr_db_tp_vs_bf16": round(sqnr_db(reference, tp_logits), 2),
                  "sqnr_db_single_vs_bf16": round(sqnr_db(reference, single_logits), 2),
                  "sqnr_db_tp_vs_single": round(sqnr_db(single_logits, tp_logits), 2),
                  "greedy_tokens_agree": f"{agree}/{len(tp_tokens)}",
                  "tp_tokens": tp_tokens[:16], "single_tokens": single_tokens[:16]}
        log(f"  {row.name} check: {result}")
    torch._dynamo.reset()
    cleanup(device)
    dist.barrier()
    return result


def setup(args, device, config, mesh) -> dict:
    return {"command": f"torchrun --nproc-per-node {mesh.size()} benchmarks/llama_tp.py " + " ".join(args.argv),
            "device": device_name(device), "tp": mesh.size(), "versions": versions(), "commit": git_commit(),
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
            "config": {"layers": config.n_layers, "dim": config.dim, "heads": config.n_heads, "kv_heads": config.n_kv,
                       "ffn": config.ffn, "vocab": config.vocab, "tiny": args.tiny, "dtype": args.dtype},
            "protocol": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated: bf16 or qcompile schemes (group-wise "
                    f"ones at group 128; default {DEFAULT_ROWS})")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated, of " + ", ".join(PHASES))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (rank 0 appends to it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--layers", type=int, help="decoder layers (default 32; --tiny: 2)")
    ap.add_argument("--tiny", action="store_true", help="llama_model's tiny config, short prompts (CPU smoke test)")
    ap.add_argument("--new-tokens", type=int, help="tokens generated and timed (default 256; tiny 8)")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens fed through the decode step (default 32; tiny 4)")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per phase; the best is reported")
    ap.add_argument("--budget-s", type=float, help="start no phase after this many seconds (a run's time limit)")
    ap.add_argument("--write", type=Path, help="render the latest record of each row in --out into this markdown "
                    "file (its llama_tp section) and exit; needs no torchrun")
    ap.add_argument("--check", action="store_true", help="compare logits and greedy tokens with the unsharded "
                    "model under the same options (rank 0)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 256)
    args.prompt_len = args.prompt_len or (4 if args.tiny else 32)
    unknown = [p for p in args.phases.split(",") if p not in PHASES]
    if unknown:
        ap.error(f"--phases: unknown {', '.join(unknown)}; valid: {', '.join(PHASES)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.write is not None:
        write_section(args.write, "llama_tp", render(json.loads(args.out.read_text())))
        print(f"wrote the llama_tp section of {args.write} from {args.out}")
        return
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --nproc-per-node 2 benchmarks/llama_tp.py ...")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # long timeout: with --check, the other ranks wait while rank 0 compiles the unsharded model
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    try:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        config = TINY if args.tiny else LLAMA_3_1_8B
        if args.layers is not None:
            config = dataclasses.replace(config, n_layers=args.layers)
        rows = [row_named(name) for name in args.rows.split(",")]
        phases = [p for p in PHASES if p in args.phases.split(",")]
        if dist.get_rank() == 0:
            log(f"tp {mesh.size()} on {device_name(device)}; torch {torch.__version__}; rows "
                f"{', '.join(r.name for r in rows)}; phases {', '.join(phases)}; results -> {args.out}")
        save = saver(args.out)
        records = [run_row(row, args, device, config, mesh, phases, save) for row in rows]
        if dist.get_rank() == 0:
            print(summary(records), flush=True)
    finally:
        dist.destroy_process_group()


def summary(records: list[dict]) -> str:
    base = {p: r.get("tok_s") for p, r in next((rec["phases"] for rec in records if rec["row"] == "bf16"), {}).items()}
    header = [f"row (tp {records[0]['setup']['tp']})", *(f"{p} tok/s" for p in PHASES),
              "logits SQNR dB: tp / 1 device vs bf16, tp vs 1 device", "greedy tokens tp = 1 device"]
    body = []
    for rec in records:
        cells = []
        for phase in PHASES:
            r = rec["phases"].get(phase, {})
            cell = str(r.get("tok_s", r.get("error", "-")[:60]))
            if "tok_s" in r and base.get(phase) and rec["row"] != "bf16":
                cell += f" ({r['tok_s'] / base[phase]:.2f}x)"
            cells.append(cell)
        check = rec.get("check") or {}
        cells.append(" / ".join(str(check.get(k, "-")) for k in ("sqnr_db_tp_vs_bf16", "sqnr_db_single_vs_bf16"))
                     + f", {check.get('sqnr_db_tp_vs_single', '-')}")
        cells.append(str(check.get("greedy_tokens_agree", "-")))
        body.append([rec["row"], *cells])
    return table(header, body)

def render(records: list[dict]) -> str:
    """The latest record of each row (in the order rows first appear) as a table, with the run's setup."""
    latest = {}
    for record in records:
        latest.pop(record["row"], None)
        latest[record["row"]] = record
    rows = sorted(latest.values(), key=lambda r: [rec["row"] for rec in records].index(r["row"]))
    s = rows[-1]["setup"]
    c, p = s["config"], s["protocol"]
    head = (f"### Tensor parallel decode, tp {s['tp']} ({s['device']})\n\n"
            f"`{s['command']}` at commit {s['commit']}, torch {s['versions']['torch']}, env {s['env']}. "
            f"{'The tiny smoke-test config' if c['tiny'] else 'Llama-3.1-8B shapes'} ({c['layers']} layers, dim "
            f"{c['dim']}, {c['heads']}/{c['kv_heads']} heads, ffn {c['ffn']}, vocab {c['vocab']}, {c['dtype']}), "
            f"random weights, sharded Megatron-style, every linear quantized (LM head included); decode as "
            f"llama_e2e ({p['prompt_len']}-token prompt fed through the step, {p['new_tokens']} greedy tokens timed, "
            f"best of {p['reps']}); speedups against bf16 tp {s['tp']}.\n\n")
    return head + summary(rows)



if __name__ == "__main__":
    main()
