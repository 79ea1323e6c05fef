"""How fast the exact slots' split-K loop can read HBM on its own, by how it loads (issue 7, benchmark 1's why).

The exact splits of the linear combine (``_decode_split`` with a KV group of 1, :func:`_exact_rows`) run one program
a multiprocessor beside the Vague chain, and at 128k they read their 176 MB at about 1.9 TB/s. This script takes
that loop alone, on the exact store's shapes (Llama-2-7B: 32 KV heads of one query head each, head_dim 128, bf16;
the exact tokens of a 10% budget at the paper's split, 9% of the context), and times it by how its keys and values
reach the registers:

* ``plain``: pointer loads, not pipelined (``num_stages=1``): each step waits for its own loads;
* ``pipelined``: the same loads through Triton's software pipeline (``tl.range(num_stages=S)``, asynchronous copies
  into shared memory on Hopper);
* ``tma``: tensor-descriptor loads (Hopper's TMA) through the same pipeline.

``--gather`` says how each step masks the slots that are not attendable: 0, not at all (every slot attends); 1, as
the decode kernel does, by reading the slots' positions and gathering a part-map byte at each; 2, by reading a byte a
slot, contiguous (a per-slot kind that the store would keep up to date). Each program keeps a running max, sum and
output per slot lane, as :func:`_exact_rows` does, and writes its partial result; the splits are merged in torch and
checked against an fp32 softmax over the store before any time is taken. Beside it, in the same run: SDPA (flash)
over the same keys and values, and a device-to-device copy.

Timing: CUDA-graph replays with an L2 flush before each (flush time subtracted), medians, as benchmark 1.
One JSON line per build to ``--out``.

Usage on a GPU machine: PYTHONPATH=. python3 benchmarks/bench_exact_loop.py [--contexts 131072,32768]
[--modes plain,pipelined,tma] [--stages 3,4] [--per-sm 1,2] [--warps 4,8] [--block 32] [--gather 0,1,2]
[--logits 0,1] [--splits 0,5]
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from cli_args import BenchmarkParser, int_list, require_cuda, require_triton

require_triton()  # before the imports below, which need it

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.tools.tensor_descriptor import TensorDescriptor

from bench_decode_attention import FLUSH_BYTES, copy_bandwidth, graph_us

from kvreviver_core.kernels.reviver_decode import EXACT, VAGUE, _EXACT, _rescale_to, _slot_lanes_step

HEADS, HEAD_DIM = 32, 128
EXACT_SHARE = 0.09  # exact tokens per head: a 10% budget, 0.45 Candidate + 0.45 Recent
MODES = ("plain", "pipelined", "tma")


@triton.jit
def _exact_loop(Q, K, V, KD, VD, POS, PART, SLOT_KIND, LOGITS, PART_M, PART_L, PART_ACC, E, span, slots_per_split,
                splits, scaling, D: tl.constexpr, BLOCK: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr,
                GATHER: tl.constexpr, STORE_LOGITS: tl.constexpr):
    """Grid ``(heads, splits)``: one query head over the slots ``[split * slots_per_split, ...)`` of its KV head,
    keys and values ``(heads, E, D)``; writes the split's max, sum and output ``(D,)`` relative to that max, and
    with STORE_LOGITS each slot's logit at its position in ``LOGITS`` ``(heads, span)``, as the decode kernel does."""
    h = tl.program_id(0)
    split = tl.program_id(1)
    di = tl.arange(0, D)
    q = tl.load(Q + h * D + di).to(tl.float32)
    first = split * slots_per_split
    head_row = h.to(tl.int64) * E
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, D), tl.float32)
    for start in tl.range(0, slots_per_split, BLOCK, num_stages=STAGES):
        slots = first + start + tl.arange(0, BLOCK)
        ok = (slots < E) & (slots < first + slots_per_split)
        if TMA:
            # Rows past this head's slots belong to the next head (or are zero-filled past the tensor): masked.
            k = KD.load([(head_row + first + start).to(tl.int32), 0])
            v = VD.load([(head_row + first + start).to(tl.int32), 0])
        else:
            offs = (head_row + slots)[:, None] * D + di[None, :]
            k = tl.load(K + offs, mask=ok[:, None], other=0.0)
            v = tl.load(V + offs, mask=ok[:, None], other=0.0)
        if GATHER == 1:
            pos = tl.load(POS + head_row + slots, mask=ok, other=-1)
            ok = ok & (tl.load(PART + h.to(tl.int64) * span + pos, mask=pos >= 0, other=0) == _EXACT)
        elif GATHER == 2:
            ok = ok & (tl.load(SLOT_KIND + head_row + slots, mask=ok, other=0) == _EXACT)
        s = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], 1) * scaling, float("-inf"))
        if STORE_LOGITS:
            pos = tl.load(POS + head_row + slots, mask=slots < E, other=-1)
            tl.store(LOGITS + h.to(tl.int64) * span + pos, s, mask=pos >= 0)
        m, l, acc = _slot_lanes_step(m, l, acc, s, v)
    top = tl.max(m, 0)
    _, weight = _rescale_to(m, top)
    tl.store(PART_M + h * splits + split, top)
    tl.store(PART_L + h * splits + split, tl.sum(l * weight, 0))
    tl.store(PART_ACC + (h * splits + split) * D + di, tl.sum(acc * weight[:, None], 0))


class ExactStore:
    """Random exact slots of one decode step: keys and values ``(heads, E, D)`` bf16, their positions in a context of
    ``span`` (sorted, distinct) and a part map ``(heads, span)`` int8 that is EXACT there."""

    def __init__(self, context: int, device: str = "cuda"):
        self.span = context
        self.exact = max(1, round(EXACT_SHARE * context))
        gen = torch.Generator(device="cpu").manual_seed(context)
        self.keys = torch.randn(HEADS, self.exact, HEAD_DIM, generator=gen).to(device, torch.bfloat16)
        self.values = torch.randn(HEADS, self.exact, HEAD_DIM, generator=gen).to(device, torch.bfloat16)
        self.query = torch.randn(HEADS, HEAD_DIM, generator=gen).to(device, torch.bfloat16)
        pos = torch.stack([torch.randperm(context, generator=gen)[: self.exact].sort().values for _ in range(HEADS)])
        self.pos = pos.to(device, torch.int32).contiguous()
        self.part = torch.full((HEADS, context), VAGUE, dtype=torch.int8, device=device)
        self.part.scatter_(1, self.pos.long(), EXACT)
        self.slot_kind = self.part.gather(1, self.pos.long()).contiguous()
        self.scaling = HEAD_DIM ** -0.5

    def kv_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def reference(self) -> torch.Tensor:
        """The fp32 attention output ``(heads, D)`` over every slot."""
        logits = torch.einsum("hd,hed->he", self.query.float(), self.keys.float()) * self.scaling
        return torch.einsum("he,hed->hd", logits.softmax(-1), self.values.float())


def exact_attention(store: ExactStore, mode: str, stages: int, per_sm: int, warps: int, block: int, gather: int,
                    logits: bool = False, splits: int = 0):
    """Closures that launch the loop over ``store`` (``splits`` a head, or as many as ``per_sm`` programs a
    multiprocessor fill) and that launch it and return the merged output ``(heads, D)`` fp32; and the splits."""
    sms = torch.cuda.get_device_properties(store.keys.device).multi_processor_count
    splits = max(1, min(triton.cdiv(store.exact, block), splits or per_sm * sms // HEADS))
    logit_rows = torch.empty(HEADS, store.span, device="cuda") if logits else store.part
    slots_per_split = triton.cdiv(triton.cdiv(store.exact, splits), block) * block
    part_m = torch.empty(HEADS, splits, device="cuda")
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(HEADS, splits, HEAD_DIM, device="cuda")
    flat_k = store.keys.view(-1, HEAD_DIM)
    flat_v = store.values.view(-1, HEAD_DIM)
    tma = mode == "tma"
    kd = TensorDescriptor.from_tensor(flat_k, [block, HEAD_DIM]) if tma else flat_k
    vd = TensorDescriptor.from_tensor(flat_v, [block, HEAD_DIM]) if tma else flat_v

    def launch() -> None:
        _exact_loop[(HEADS, splits)](
            store.query, flat_k, flat_v, kd, vd, store.pos, store.part, store.slot_kind, logit_rows, part_m, part_l,
            part_acc, store.exact, store.span, slots_per_split, splits, store.scaling, D=HEAD_DIM, BLOCK=block,
            TMA=tma, STAGES=1 if mode == "plain" else stages, GATHER=gather, STORE_LOGITS=logits, num_warps=warps)

    def merged() -> torch.Tensor:
        launch()
        top = part_m.max(-1, keepdim=True).values
        weight = torch.exp(part_m - top)
        return (part_acc * weight[..., None]).sum(1) / (part_l * weight).sum(-1, keepdim=True)

    return launch, merged, splits


def sdpa_us(store: ExactStore, flush) -> float:
    q = store.query.view(1, HEADS, 1, HEAD_DIM)
    k, v = store.keys.unsqueeze(0), store.values.unsqueeze(0)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        return graph_us(lambda: F.scaled_dot_product_attention(q, k, v), flush)


def main() -> None:
    parser = BenchmarkParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int_list, default=[131072, 32768])
    parser.add_argument("--modes", default="plain,pipelined,tma")
    parser.add_argument("--stages", type=int_list, default=[3, 4])
    parser.add_argument("--per-sm", type=int_list, default=[1, 2])
    parser.add_argument("--warps", type=int_list, default=[4, 8])
    parser.add_argument("--block", type=int_list, default=[32])
    parser.add_argument("--gather", type=int_list, default=[0, 1, 2])
    parser.add_argument("--logits", type=int_list, default=[0], help="0: no logit stores; 1: each slot's logit "
                        "stored at its position, as the decode kernel does")
    parser.add_argument("--splits", type=int_list, default=[0], help="splits a head (0: from --per-sm)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_exact_loop.jsonl"))
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    require_cuda("it times kernels")

    device = torch.cuda.get_device_name()
    copy = copy_bandwidth()
    print(f"{device}: device-to-device copy {copy / 1e12:.2f} TB/s (read + write)")
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda").zero_
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:
        for context in args.contexts:
            store = ExactStore(context)
            reference = store.reference()
            base = {"device": device, "context": context, "exact_per_head": store.exact,
                    "kv_mb": store.kv_bytes() / 1e6}
            flash = sdpa_us(store, flush)
            print(f"\n{context}: {store.exact} exact slots a head, {base['kv_mb']:.1f} MB of K/V; "
                  f"SDPA over them {flash:.1f} us ({store.kv_bytes() / flash / 1e3:.0f} GB/s)")
            out.write(json.dumps({**base, "build": "sdpa", "us": flash}) + "\n")
            for mode, stages, per_sm, warps, block, gather, logits, split_count in itertools.product(
                    modes, args.stages, args.per_sm, args.warps, args.block, args.gather, args.logits, args.splits):
                if mode == "plain" and stages != args.stages[0]:
                    continue  # plain is not pipelined: one build whatever the stages
                build = {"mode": mode, "stages": 1 if mode == "plain" else stages, "per_sm": per_sm,
                         "warps": warps, "block": block, "gather": gather, "logits": bool(logits)}
                try:
                    launch, merged, splits = exact_attention(store, mode, stages, per_sm, warps, block, gather,
                                                             bool(logits), split_count)
                    error = ((merged() - reference).abs().max() / reference.abs().max()).item()
                    us = graph_us(launch, flush)
                except Exception as exc:  # a build that does not compile or fit is reported, and the grid goes on
                    print(f"  {build}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    out.write(json.dumps({**base, **build, "failed": f"{type(exc).__name__}"}) + "\n")
                    continue
                gbps = store.kv_bytes() / us / 1e3
                print(f"  {mode:9} stages {build['stages']} per_sm {per_sm} warps {warps} block {block} "
                      f"gather {gather} logits {logits}: {splits} splits, {us:7.1f} us, {gbps:6.0f} GB/s, "
                      f"rel err {error:.1e}")
                out.write(json.dumps({**base, **build, "splits": splits, "us": us, "gbps": gbps,
                                      "rel_error": error}) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
