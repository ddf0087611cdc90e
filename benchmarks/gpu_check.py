"""GPU check of the Triton kernels: correctness against the references, then timing.

Run on a CUDA machine from the repository root::

    python benchmarks/gpu_check.py            # paper shapes (see bench_kernels.PAPER)
    python benchmarks/gpu_check.py --quick    # reduced shapes, a smoke test

For every kernel it checks the Triton forward and gradients against the PyTorch reference
in fp32, fp16 and bf16 (relative L2 error), then times forward+backward of the eager
reference, torch.compile of the reference and Triton (plus, for the similarity, cuBLAS
through a native-dtype einsum, and for NGA a plain copy as the bandwidth ceiling), with
peak memory, and prints a table and the issue's targets. Two times per case: "call ms", one
call from Python as a training step makes it (launch and autograd overhead included), and
"graph ms", the same call replayed from a CUDA graph, which is the GPU's own time. At the
paper's shapes NGA and the similarity are small enough (~10-50 us of GPU work) for the
call time to be mostly host overhead, so the targets use the graph times.
Exit status 1 if a check fails.
Not collected by pytest (no test_ / bench_ prefix).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(description="GPU check of the Triton kernels")
parser.add_argument("--quick", action="store_true", help="reduced shapes")
parser.add_argument("--no-compile", action="store_true", help="skip torch.compile cases")
parser.add_argument(
    "--cpu-smoke", action="store_true",
    help="no GPU: run the script's flow on tiny shapes in Triton's interpreter (the timings "
    "mean nothing; this only checks that the script works)",
)
ARGS = parser.parse_args()
# Triton reads this when the kernels are defined, so before the kernels are imported.
os.environ["TRITON_INTERPRET"] = "1" if ARGS.cpu_smoke else "0"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels as bk  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
if ARGS.cpu_smoke:
    del TOL[torch.bfloat16]  # the interpreter computes bf16 wrongly
TINY = bk.Shapes(L=3, B=1, N=50, C=40, S=2, D=48, K=7, h=6, H=29)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    d = b.norm().item()
    return (a - b).norm().item() / (d if d else 1.0)


def run_once(kernel: str, impl: str, inputs: dict):
    """Forward + backward; returns the output and the leaves' gradients."""
    for t in inputs["leaves"]:
        t.grad = None
    out = bk.implementation(kernel, impl)(*inputs["args"])
    out.backward(inputs["grad"])
    if bk.ON_GPU:
        torch.cuda.synchronize()
    return out.detach(), [t.grad.detach().clone() for t in inputs["leaves"]]


def check(sh: bk.Shapes) -> list[tuple]:
    rows = []
    for kernel in bk.KERNELS:
        for dtype in TOL:
            inputs = bk.make_inputs(kernel, sh, dtype, bk.DEVICE)
            ref, ref_g = run_once(kernel, "eager", inputs)
            out, out_g = run_once(kernel, "triton", inputs)
            errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(out_g, ref_g)]
            rows.append((kernel, str(dtype).replace("torch.", ""), max(errs), TOL[dtype]))
    return rows


def time_case(kernel: str, impl: str, sh: bk.Shapes, dtype: torch.dtype) -> dict:
    backward = kernel != "nga-fwd"
    name = "nga" if kernel == "nga-fwd" else kernel
    inputs = bk.make_inputs(name, sh, dtype, bk.DEVICE)
    run = bk.step(name, impl, inputs, backward)
    run()
    ms = bench(run)
    mem = bk.peak_memory(run)["peak_mem_MiB"]
    graph_ms = bench_graph(bk.step(name, impl, inputs, backward, sync=False))
    best = graph_ms if graph_ms is not None else ms
    gbs = bk.min_bytes(name, sh, dtype, backward) / (best * 1e-3) / 1e9
    return {"ms": ms, "graph_ms": graph_ms, "best_ms": best, "mem": mem, "gbs": gbs}


def bench_graph(fn) -> float | None:
    """Median milliseconds of ``fn`` replayed from a CUDA graph; None where it cannot be
    captured (torch.compile's own graphs, a host sync) or off the GPU."""
    if not bk.ON_GPU:
        return None
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as err:  # noqa: BLE001 - any capture failure just means "no graph figure"
        print(f"  (no CUDA-graph time: {type(err).__name__}: {str(err).splitlines()[0][:80]})")
        torch.cuda.synchronize()
        return None


def bench(fn) -> float:
    """Median milliseconds of ``fn``."""
    if bk.ON_GPU:
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def copy_bandwidth(sh: bk.Shapes, dtype: torch.dtype) -> float:
    src = torch.randn(sh.L, sh.B, sh.N, sh.C, device=bk.DEVICE).to(dtype)
    dst = torch.empty_like(src)
    ms = bench_graph(lambda: dst.copy_(src)) or bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def main() -> int:
    args = ARGS
    if args.cpu_smoke:
        sh, args.no_compile = TINY, True
        device = "cpu (Triton interpreter; smoke run, timings meaningless)"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu-smoke to check the script itself)")
        return 2
    else:
        sh = bk.SMALL if args.quick else bk.PAPER
        device = torch.cuda.get_device_name()
    print(f"device: {device}  torch {torch.__version__}  triton {triton.__version__}\n"
          f"shapes: {sh}\n")

    ok = True
    print(f"{'kernel':<11} {'dtype':<9} {'max rel err':>12} {'tol':>8}")
    for kernel, dtype, err, tol in check(sh):
        good = err < tol
        ok &= good
        print(f"{kernel:<11} {dtype:<9} {err:12.3e} {tol:8.0e} {'ok' if good else 'FAIL'}")

    dtype = torch.float16 if bk.ON_GPU else torch.float32
    print(f"\ntiming ({dtype}, median of do_bench):")
    print(f"{'case':<12} {'impl':<8} {'call ms':>9} {'graph ms':>9} {'vs eager':>9} {'peak MiB':>10} "
          f"{'GB/s':>8}")
    results = {}
    for kernel in ("nga-fwd", "nga", "similarity", "loss"):
        impls = ["eager"] + ([] if args.no_compile else ["compile"]) + ["triton"]
        impls += list(bk.EXTRA_IMPLS.get(kernel, ()))
        for impl in impls:
            r = time_case(kernel, impl, sh, dtype)
            results[kernel, impl] = r
            speed = results[kernel, "eager"]["best_ms"] / r["best_ms"]
            mem = "n/a" if r["mem"] is None else f"{r['mem']:.1f}"
            graph = "n/a" if r["graph_ms"] is None else f"{r['graph_ms']:.4f}"
            print(f"{kernel:<12} {impl:<8} {r['ms']:9.4f} {graph:>9} {speed:8.2f}x {mem:>10} "
                  f"{r['gbs']:8.1f}")
    copy = copy_bandwidth(sh, dtype)
    print(f"{'copy':<12} {'torch':<8} {'':>9} {'':>9} {'':>9} {'':>10} {copy:8.1f}")
    print("(vs eager and GB/s from graph ms where there is one, else call ms)")

    loss_t, loss_e = results["loss", "triton"], results["loss", "eager"]
    sim_t, sim_c = results["similarity", "triton"], results["similarity", "cublas"]
    mem_ok = loss_t["mem"] is not None and loss_t["mem"] <= loss_e["mem"] / 4
    targets = [
        ("loss >= 2x faster than eager", loss_e["best_ms"] / loss_t["best_ms"] >= 2),
        ("loss peak memory <= 1/4 eager", mem_ok),
        ("NGA fwd >= 80% of copy bandwidth", results["nga-fwd", "triton"]["gbs"] >= 0.8 * copy),
        ("similarity no slower than cuBLAS", sim_t["best_ms"] <= sim_c["best_ms"] * 1.02),
    ]
    print()
    for name, met in targets:
        print(f"target: {name:<36} {'met' if met else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
