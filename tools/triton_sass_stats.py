"""Instruction mix of the Triton depthwise kernels' inner loops on sm_90 (H100), without a GPU.

    python tools/triton_sass_stats.py [--dtype bf16] [--arch 90] [--json work_dirs/benchmarks/triton_sass.json]

Compiles each kernel variant SLaK uses (forward: the M×N + N×N pair sharing loads, one band alone; weight gradient)
for sm_90 (``--arch 80``: sm_80, A100) with Triton's bundled ptxas, specialised as Triton's JIT specialises them
for channels_last tensors (the channel stride 1 a compile-time constant, pointers and row strides 16-divisible),
disassembles the cubin with the bundled nvdisasm, and reports for the innermost loop with the most FFMAs (of
several such loops, the leanest: the kernel's path through the map's interior; the JSON lists the others'
instruction counts): its instructions, FFMAs, global loads and the FFMA share of the issued instructions, plus the
registers per thread. A static measure, not a timing: on a GPU the kernel may be bound by memory or latency
instead; `bash tools/gpu_checks.sh` times it.
Runs in a fresh process with TRITON_INTERPRET unset (the interpreter's kernels cannot be compiled). Needs Triton
>= 3.3 (its ``ASTSource`` signature; the kernels themselves compile with 3.0 and later).
"""
import argparse
import json
import os
import os.path as osp
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

INSN = re.compile(r'/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9]*)')
LABEL = re.compile(r'^(\.L_x_\d+):')
BRANCH = re.compile(r'\bBRA\s+`\((\.L_x_\d+)\)')


def loops(sass: str):
    """Innermost loops of a disassembly: (instructions, opcode counts) of each backward branch's body."""
    lines = sass.splitlines()
    labels, spans = {}, []
    for n, line in enumerate(lines):
        m = LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = n
        b = BRANCH.search(line)
        if b and b.group(1) in labels:  # a label above: a backward branch closes a loop
            spans.append((labels[b.group(1)], n))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    out = []
    for lo, hi in inner:
        ops = [m.group(2) for m in (INSN.search(line) for line in lines[lo:hi + 1]) if m]
        counts = {}
        for op in ops:
            counts[op] = counts.get(op, 0) + 1
        out.append((len(ops), counts))
    return out


def variants(dtype: str):
    """(name, kernel, pointer types, constexprs) of each variant SLaK runs."""
    from slak_mm.ops import triton_dwconv as T
    fwd_ptrs = {n: '*' + dtype for n in T._dw_rows_kernel.arg_names if n.endswith('_ptr')}
    fwd_ptrs.update(w0_ptr='*fp32', w1_ptr='*fp32', part_ptr='*fp32')
    common = dict(sxc=1, syc=1, PARTIAL_IN=False, HAS_BIAS=False, BLOCK_W=32, BLOCK_C=32)
    return [
        ('forward: M×N + N×N from the same loads', T._dw_rows_kernel, fwd_ptrs,
         dict(common, NK=2, SAME_X=True, SUM=False)),
        ('forward: one band', T._dw_rows_kernel, fwd_ptrs, dict(common, NK=1, SAME_X=True, SUM=False)),
        ('weight gradient', T._dw_wgrad_kernel, {'x_ptr': '*' + dtype, 'dy_ptr': '*' + dtype, 'part_ptr': '*fp32'},
         dict(sxc=1, syc=1, BLOCK_W=16, BLOCK_C=32)),
    ]


def compile_cubin(fn, ptrs, constexprs, div16=(), arch=90):
    """``fn`` compiled to an sm_``arch`` cubin with Triton's bundled ptxas: pointer arguments typed by ``ptrs``, the
    others i32 (``div16``: known to be multiples of 16, as the JIT assumes for such values and 16-byte aligned
    pointers)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {a: ptrs.get(a, 'i32') for a in fn.arg_names}
    signature.update({a: 'constexpr' for a in constexprs})
    attrs = {(fn.arg_names.index(a),): [['tt.divisibility', 16]] for a in div16}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget('cuda', arch, 32))


def compile_stats(dtype: str, arch: int = 90):
    import triton
    bindir = osp.join(osp.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
    rows = []
    for name, fn, ptrs, constexprs in variants(dtype):
        div16 = [a for a in fn.arg_names if a in ptrs or a in ('sxn', 'sxh', 'syn', 'syh', 'CP')]
        k = compile_cubin(fn, ptrs, constexprs, div16, arch)
        with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
            f.write(k.asm['cubin'])
            f.flush()
            sass = subprocess.run([osp.join(bindir, 'nvdisasm'), '-c', f.name], capture_output=True, text=True,
                                  check=True).stdout
            usage = subprocess.run([osp.join(bindir, 'cuobjdump'), '-res-usage', f.name], capture_output=True,
                                   text=True).stdout
        regs = re.search(r'REG:(\d+)', usage)
        local = re.search(r'LOCAL:(\d+)', usage)
        hot = loops(sass)
        most = max(lc[1].get('FFMA', 0) for lc in hot)
        edges = sorted(total for total, counts in hot if counts.get('FFMA', 0) == most)
        total, counts = next(lc for lc in hot if lc[0] == edges[0] and lc[1].get('FFMA', 0) == most)
        ffma = counts.get('FFMA', 0)
        ldg = counts.get('LDG', 0)
        rows.append(dict(variant=name, dtype=dtype, loop_instructions=total, ffma=ffma, ldg=ldg,
                         ffma_share=ffma / total, ffma_per_ldg=ffma / max(ldg, 1),
                         other_loops_instructions=edges[1:],
                         registers=int(regs.group(1)) if regs else None,
                         local_bytes=int(local.group(1)) if local else None))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dtype', default='bf16', choices=['fp32', 'bf16', 'fp16'])
    parser.add_argument('--arch', type=int, default=90, choices=[80, 90], help='compute capability x 10')
    parser.add_argument('--json', default=None)
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child:  # the kernels must be defined with the interpreter off
        env = dict(os.environ, TRITON_INTERPRET='0')
        return subprocess.run([sys.executable, osp.abspath(__file__), '--child', *sys.argv[1:]], env=env).returncode
    rows = compile_stats(args.dtype, args.arch)
    print('| variant | dtype | loop instructions | FFMA | LDG | FFMA share | FFMA per LDG | registers | local bytes |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['variant']} | {r['dtype']} | {r['loop_instructions']} | {r['ffma']} | {r['ldg']} | "
              f"{100 * r['ffma_share']:.0f}% | {r['ffma_per_ldg']:.2f} | {r['registers']} | {r['local_bytes']} |")
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(dict(target=f'sm_{args.arch} (compiled, not run)', rows=rows), f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
