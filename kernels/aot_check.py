"""Compile every Triton kernel for a GPU target without a GPU (ahead of time).

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute but not that they
compile: the GPU compiler enforces dot shapes and dtypes, constexpr branches, register
limits. This module runs Triton's full compiler (``triton.compile`` down to a cubin, with
the ``ptxas`` bundled in the Triton wheel) for the configurations the launch wrappers use,
and reports registers and spills::

    TRITON_INTERPRET=0 python -m cascade_clip.kernels.aot_check [--arch 90]

Exit status: 0 every kernel compiled without spills; 1 a kernel failed to compile or
spilled registers; 2 the interpreter is on (nothing compiled); 3 skipped: no ``ptxas`` was
found (neither ``TRITON_PTXAS_PATH`` nor the one bundled with Triton), so nothing was
compiled to a cubin and registers and spills were not checked. Only 0 means checked. Needs
no GPU and no CUDA driver; tests/test_kernels.py runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

EXIT_OK, EXIT_FAILED, EXIT_INTERPRETING, EXIT_SKIPPED = 0, 1, 2, 3


@dataclass
class Case:
    """One kernel compilation: pointer dtypes, scalar floats and constexpr values."""

    kernel: str  # "module:function"
    pointers: dict[str, str]
    floats: tuple[str, ...] = ()
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4


def cases() -> list[Case]:
    """The configurations the wrappers launch (fp16 activations; fp32 where noted)."""
    import importlib

    import torch

    nga_mod = importlib.import_module(f"{__package__}.nga")  # the package re-exports nga()

    out: list[Case] = []
    for dt in ("fp16", "fp32"):
        br, bc, nw = nga_mod._blocks(512, 2048)
        out.append(Case("nga:_nga_fwd_kernel",
                        {"f_ptr": f"*{dt}", "w_ptr": "*fp32", "out_ptr": f"*{dt}"},
                        constexprs={"BLOCK_R": br, "BLOCK_C": bc}, num_warps=nw))
        br, bc, nw = nga_mod._blocks(512, 1024)
        for need_gf in (True, False):
            out.append(Case("nga:_nga_bwd_kernel",
                            {"g_ptr": f"*{dt}", "f_ptr": f"*{dt}", "w_ptr": "*fp32",
                             "gf_ptr": f"*{dt}", "gw_ptr": "*fp32"},
                            constexprs={"NEED_GF": need_gf, "NEED_GW": True,
                                        "BLOCK_R": br, "BLOCK_C": bc}, num_warps=nw))
    for a, b, c, dot32, prec, blk, nw in (
        ("fp16", "fp16", "fp32", False, "ieee", 128, 8),  # forward, fp16 activations
        ("bf16", "bf16", "fp32", False, "ieee", 64, 4),  # forward, tiles halved (small grid)
        ("fp16", "fp16", "fp32", False, "ieee", 32, 4),  # forward, tiles halved twice
        ("fp32", "fp16", "fp16", True, "tf32", 64, 8),  # gradients
        ("fp32", "fp32", "fp32", True, "ieee", 64, 8),  # fp32 everything
        ("fp32", "fp32", "fp32", True, "ieee", 32, 4),  # fp32, tiles halved
    ):
        out.append(Case("similarity:_stage_bmm_kernel",
                        {"a_ptr": f"*{a}", "b_ptr": f"*{b}", "c_ptr": f"*{c}"}, ("scale",),
                        {"DOT_FP32": dot32, "INPUT_PRECISION": prec,
                         "BLOCK_M": blk, "BLOCK_N": blk, "BLOCK_R": 32}, nw))
    seg_mod = importlib.import_module(f"{__package__}.seg_loss")
    for dt, gamma, ian in (("fp16", 2.0, True), ("fp32", 1.5, False), ("bf16", 0.0, True)):
        floats = ("scale_h", "scale_w", "alpha")
        torch_dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        by, bx, nw = seg_mod._bwd_blocks(torch_dtype)
        out.append(Case("seg_loss:_seg_stats_fwd_kernel",
                        {"x_ptr": f"*{dt}", "lab_ptr": "*i16", "part_ptr": "*fp32"}, floats,
                        {"GAMMA": gamma, "IGNORE_AS_NEGATIVE": ian,
                         "BLOCK_K": 8, "BLOCK_P": 512}, 8))
        out.append(Case("seg_loss:_seg_stats_bwd_kernel",
                        {"x_ptr": f"*{dt}", "lab_ptr": "*i16", "gs_ptr": "*fp32",
                         "gx_ptr": f"*{dt}", "ybnd_ptr": "*i32", "xbnd_ptr": "*i32"}, floats,
                        {"GAMMA": gamma, "IGNORE_AS_NEGATIVE": ian, "INPUT_PRECISION": "ieee",
                         "TILE_I": 32, "TILE_J": 32, "BLOCK_Y": by, "BLOCK_X": bx}, nw))
    return out


def find_ptxas(arch: int) -> str | None:
    """The ptxas Triton compiles with for `arch` (TRITON_PTXAS_PATH, else the bundled one),
    or None when there is none."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
    except Exception:  # RuntimeError "Cannot find ptxas", or an older Triton without get_ptxas
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def compile_case(case: Case, arch: int, ptxas: str) -> tuple[str, bool]:
    """Compile one case with `ptxas` at hand; returns (report line, ok)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = case.kernel.split(":")
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    signature = {}
    for arg in fn.arg_names:
        if arg in case.constexprs:
            signature[arg] = "constexpr"
        elif arg in case.pointers:
            signature[arg] = case.pointers[arg]
        else:
            signature[arg] = "fp32" if arg in case.floats else "i32"
    label = f"{name} {case.pointers} {case.constexprs} warps={case.num_warps}"
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, dict(case.constexprs)),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": case.num_warps},
        )
    except Exception as exc:  # report every failure, not just the first
        return f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", False
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        info = subprocess.run([ptxas, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}",
                               "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=False).stderr
    finally:
        os.unlink(f.name)
    regs = next((ln.split(":")[-1].strip() for ln in info.splitlines() if "registers" in ln), "?")
    spilled = any(int(n) > 0 for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    return f"{'SPILL' if spilled else 'ok  '} {label}: {regs}", not spilled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the Triton kernels for a GPU target")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    args = parser.parse_args(argv)
    from .dispatch import interpreting

    if interpreting():
        print("aot_check: set TRITON_INTERPRET=0 (interpreted kernels cannot be compiled)")
        return EXIT_INTERPRETING
    ptxas = find_ptxas(args.arch)
    if ptxas is None:
        # Not a pass: without ptxas no kernel reaches a cubin, so neither compile errors in
        # the last stage nor registers and spills are checked.
        for case in cases():
            print(f"skipped: ptxas not found  {case.kernel} {case.constexprs}", flush=True)
        print("aot_check: skipped: ptxas not found (set TRITON_PTXAS_PATH); no kernel was checked")
        return EXIT_SKIPPED
    ok = True
    for case in cases():
        line, good = compile_case(case, args.arch, ptxas)
        ok &= good
        print(line, flush=True)
    print("all kernels compiled" if ok else "some kernels failed")
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
