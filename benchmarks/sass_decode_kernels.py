"""What the compiler makes of the decode kernel's launches, on any machine, without a GPU.

It compiles one kernel of :mod:`kvreviver_core.kernels.reviver_decode` for an NVIDIA architecture (sm_90 by default)
with Triton's own ptxas, and prints registers a thread, stack, shared memory, the SASS instruction count and each
loop's instruction mix: barriers (``BAR``), global loads (``LDG``) and asynchronous copies (``LDGSTS``), tensor-core
MMAs (``HMMA``), shuffles, register moves and spills (``STL``). So a change to a kernel or a knob can be checked for
its registers and its loops' barriers before device time is spent on it. The kernels:

* ``split``: ``_decode_split``, the split-K launch (under the linear combine, the exact splits and the bucket logits);
* ``vague``: ``_vague_logits``, the linear combine's Vague positions;
* ``bucket-sums``: ``_position_pass`` as the linear combine's bucket-sum launch (bucket order, no scores).

The arguments are typed as a launch at the benchmarks' shapes would give them (Llama-2-7B: 32 heads, a KV group of 1,
head_dim 128, 3 sketch rows, 32k positions): every pointer, and the integers that are multiples of 16 there and that
the kernel lets Triton specialize, are divisible by 16, as Triton's launcher marks them; the other integers are not.

Checked against the device: at ``a434964`` the linear combine's split launch compiles here to 107 registers and
38.3 KiB of shared memory; Triton's cache on an H200 said 106 registers and ncu 38.9 KiB (BENCHMARKS.md, issue 7).

Usage: python benchmarks/sass_decode_kernels.py [--kernel split|vague|bucket-sums] [--group 1] [--head-dim 128]
       [--rows 3] [--combine mean|median] [--block-exact 32] [--warps N] [--stages N] [--arch 80|86|89|90] [--tree DIR]
       [--listing]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from cli_args import BenchmarkParser

POINTERS = {"Q": "*bf16", "EK": "*bf16", "EV": "*bf16", "SK": "*bf16", "SV": "*bf16", "EPOS": "*i32",
            "PART": "*i8", "SCNT": "*i32", "BUCKETS": "*i64", "SLOTS": "*i32", "QK": "*fp32", "W": "*fp32",
            "VAGUE_OUT": "*fp32", "VAGUE_TOP": "*fp32", "LOGITS": "*fp32", "VLOGITS": "*fp32", "PART_ACC": "*fp32",
            "PART_M": "*fp32", "PART_L": "*fp32", "LENGTH": "*i64", "MASS": "*fp32", "CODES": "*i32",
            "ORDER": "*i32", "ORDER_CODES": "*i32", "RUNS": "*i32", "SCORES": "*fp32", "CHUNK_TOP": "*fp32",
            "CHUNK_POS": "*i32"}
FLOATS = {"scaling", "bucket_scale"}
# Integers that are multiples of 16 at these shapes (strides, head counts, the capacity), where not left unspecialized.
ALIGNED_INTS = {"stride_qb", "stride_qh", "part_stride", "code_stride", "row_stride", "mass_stride", "Hkv", "span"}
INTS = ALIGNED_INTS | {"E", "width", "slots_per_split", "pos_per_split", "columns", "splits", "first_program", "batch",
                       "sorted_n", "slots", "pieces", "chunks", "vague_rows", "head_groups"}
ARCHS = (80, 86, 89, 90)  # the NVIDIA architectures Triton's backend compiles for, from Ampere on
HEADS_PAD = 32  # Llama-2-7B's 32 query heads, a power of 2 already


def fail(message: str) -> None:
    print(f"sass_decode_kernels: {message}", file=sys.stderr)
    raise SystemExit(2)


def signature(kernel, constexprs: dict) -> tuple[dict, dict]:
    """The kernel's argument types and the divisibility attributes of its aligned arguments."""
    names, types = kernel.arg_names, {}
    unspecialized = {names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    for name in names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in POINTERS:
            types[name] = POINTERS[name]
        elif name in FLOATS:
            types[name] = "fp32"
        elif name in INTS:
            types[name] = "i32"
        else:
            fail(f"{kernel.__name__} has an argument {name!r} this script does not know: add its type")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if types[name].startswith("*") or (name in ALIGNED_INTS and name not in unspecialized)}
    return types, attrs


def launch(args, rd, triton) -> tuple:
    """The kernel, its constexprs, warps and stages as :mod:`reviver_decode` launches it for ``args``."""
    kernel, constexprs, warps, stages = _launch(args, rd, triton)
    if "CHAINED" in kernel.arg_names:  # a tree from before the dependent launches has no such argument
        # The linear combine's chain on sm_90 on; the split's binary is the exact splits', launched on the side stream.
        constexprs["CHAINED"] = rd.PDL and rd.gdc_wait is not None and args.arch >= 90 and args.kernel != "split"
    return kernel, constexprs, warps, stages


def _launch(args, rd, triton) -> tuple:
    linear = args.combine == "mean"
    if args.kernel == "split":
        group_pad = rd.tile_pad(args.group)
        constexprs = dict(G=args.group, GP=group_pad, VP=group_pad, D=args.head_dim,
                          DP=rd.tile_pad(args.head_dim), ROWS=args.rows, HAS_SKETCH=True,
                          MEAN=True, SIGNED_KEYS=False, LINEAR=linear, SKIP_EMPTY=rd.SKIP_EMPTY,
                          BLOCK_E=args.block_exact or rd.BLOCK_EXACT,
                          BLOCK_V=rd.BLOCK_LINEAR if linear else rd.BLOCK_VAGUE, BLOCK_B=rd.BLOCK_BUCKETS)
        return rd._decode_split, constexprs, rd.NUM_WARPS, rd.NUM_STAGES_LINEAR if linear else rd.NUM_STAGES
    if not linear:
        fail(f"--kernel {args.kernel} is a launch of the linear combine only: use --combine mean")
    if args.kernel == "vague":
        constexprs = dict(G=args.group, ROWS=args.rows, SIGNED_KEYS=False,
                          HB=min(rd.VAGUE_HEADS, HEADS_PAD), BLOCK=rd.BLOCK_LINEAR)
        return rd._vague_logits, constexprs, rd.NUM_WARPS, rd.NUM_STAGES_LINEAR
    # SP: the split columns padded, 128 for the 70 (5 exact splits and 65 Vague ranges) at 32k.
    constexprs = dict(G=args.group, GP=triton.next_power_of_2(args.group), HP=HEADS_PAD, SP=128, ROWS=args.rows,
                      FROM_LOGITS=True, LINEAR=True, SCORE=False, CHUNK=rd.CHUNK_POSITIONS, BLOCK=rd.BLOCK_PASS,
                      PIECE=rd.run_piece(HEADS_PAD))
    return rd._position_pass, constexprs, rd.PASS_WARPS, 3  # Triton's default stages: the launch sets none


# HGMMA: Hopper's warpgroup MMAs; MUFU: the special-function unit (exp2); STL: spills to local memory; REDG and
# ATOMG: global atomics without and with a returned value.
KEY_OPCODES = ("BAR", "LDG", "LDGSTS", "HMMA", "HGMMA", "MUFU", "SHFL", "REDG", "ATOMG", "IMAD.MOV", "STL")


def instruction_mix(opcodes: list[str]) -> str:
    """The most frequent opcodes, then the counts of KEY_OPCODES whatever their rank."""
    counts = Counter("IMAD.MOV" if op.startswith("IMAD.MOV") else op.split(".")[0] for op in opcodes)
    return (", ".join(f"{op} {n}" for op, n in counts.most_common(10)) + "; "
            + ", ".join(f"{op} {counts[op]}" for op in KEY_OPCODES))


def cubin_usage(compiled, triton) -> tuple[int, int, str]:
    """Registers a thread, stack bytes and the SASS of a kernel ``triton.compile`` built, from the CUDA tools that
    ship with Triton."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as scratch:
        cubin = Path(scratch) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1)), sass


def sass_listing(sass: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The instructions in order (without their predicates), and each loop as (first, last) indices: a branch back
    to a label."""
    texts, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        instruction = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if instruction:
            labels.update((name, len(texts)) for name in pending)
            pending = []
            texts.append(re.sub(r"^@!?U?P\w+\s+", "", instruction.group(1)))
    loops = []
    for i, text in enumerate(texts):
        target = re.match(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if target and labels.get(target.group(1), i + 1) < i:
            loops.append((labels[target.group(1)], i))
    return texts, loops


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", default="split", choices=("split", "vague", "bucket-sums"))
    parser.add_argument("--group", type=int, default=1, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rows", type=int, default=3, choices=(1, 3))
    parser.add_argument("--combine", default="mean", choices=("mean", "median"))
    parser.add_argument("--block-exact", type=int, default=None, help="exact slots a step (BLOCK_EXACT)")
    parser.add_argument("--warps", type=int, default=None)
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--listing", action="store_true", help="also print each loop's SASS, in order")
    parser.add_argument("--arch", type=int, default=90, choices=ARCHS, help="compute capability: 90 for H100/H200")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose kernels to compile (e.g. a git archive of a branch)")
    args = parser.parse_args()
    power_of_2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    if args.group < 1 or args.head_dim < 1:
        fail("--group and --head-dim must be positive")
    if args.block_exact is not None and not (power_of_2(args.block_exact) and args.block_exact >= 16):
        fail(f"--block-exact must be a power of 2 of at least 16 (a tl.dot tile), got {args.block_exact}")
    if args.warps is not None and not (power_of_2(args.warps) and args.warps <= 32):
        fail(f"--warps must be a power of 2 up to 32, got {args.warps}")
    if args.stages is not None and args.stages < 1:
        fail(f"--stages must be at least 1, got {args.stages}")
    if not (args.tree / "kvreviver_core" / "kernels" / "reviver_decode.py").is_file():
        fail(f"{args.tree} holds no kvreviver_core/kernels/reviver_decode.py")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        fail("needs Triton (pip install triton): it compiles the kernels with Triton's own ptxas")
    sys.path.insert(0, str(args.tree.resolve()))
    from kvreviver_core.kernels import reviver_decode as rd

    kernel, constexprs, warps, stages = launch(args, rd, triton)
    warps, stages = args.warps or warps, args.stages or stages
    types, attrs = signature(kernel, constexprs)
    try:
        compiled = triton.compile(ASTSource(kernel, types, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", args.arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
    except triton.CompilationError as error:
        fail(f"{kernel.__name__} does not compile so: {str(error).strip().splitlines()[-1]}")
    registers, stack, sass = cubin_usage(compiled, triton)
    texts, loops = sass_listing(sass)
    opcodes = [text.split()[0] for text in texts]
    print(f"{kernel.__name__} from {args.tree}: sm_{args.arch}, {warps} warps, {stages} stages, "
          f"{', '.join(f'{k}={v}' for k, v in constexprs.items())}")
    print(f"registers a thread {registers}, stack {stack} B, shared memory {compiled.metadata.shared} B, "
          f"{len(opcodes)} SASS instructions: {instruction_mix(opcodes)}")
    for first, last in loops:
        body = opcodes[first:last + 1]
        print(f"loop of {len(body)} instructions: {instruction_mix(body)}")
        if args.listing:
            print("\n".join(f"    {text}" for text in texts[first:last + 1]))


if __name__ == "__main__":
    main()
