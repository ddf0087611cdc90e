"""Kernel benchmarks: eager PyTorch reference vs torch.compile of it vs Triton.

Every case times one forward + backward (``<kernel>-<impl>``); NGA also has a
forward-only case and a plain device copy of its input as the bandwidth ceiling.
``benchmark.extra_info`` records the shapes, the bytes each case must move at least,
and peak memory (``torch.cuda.max_memory_allocated`` above the inputs, on GPU only: on CPU
the memory figure is not measured, since tracemalloc does not see torch's allocator).

Shapes: the paper's per-GPU shapes on a GPU (B=4, 3 stages, N=32x32, D=512, K=156,
512x512 targets; NGA L=3, B=4, N=1024, C=512); reduced shapes on CPU so the suite runs in
seconds. ``CASCADE_CLIP_BENCH_SHAPES=paper|small`` overrides the choice.

On CPU the Triton and torch.compile cases skip; the references still run. On a GPU,
benchmarks/conftest.py sets TRITON_INTERPRET=1 unless it is already set, which would time
the interpreter, so run::

    TRITON_INTERPRET=0 python -m pytest benchmarks/bench_kernels.py --benchmark-enable

(the Triton cases skip, saying so, when the interpreter is on). Normal test runs collect
this file with ``--benchmark-disable`` and run each case once.

Each case then checks what it timed (``verify``): the output of the timed function and the
gradients its last timed call left on the inputs match an fp64 oracle on the same inputs
(a plain einsum for NGA and the similarity, the reference loss), with a finite result and
nonzero gradients; the copy case checks the copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from cascade_clip.kernels.dispatch import interpreting
from cascade_clip.kernels.nga import nga, nga_reference
from cascade_clip.kernels.seg_loss import sigmoid_focal_dice_loss, sigmoid_focal_dice_loss_reference
from cascade_clip.kernels.similarity import pixel_text_logits, pixel_text_logits_reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# The three public functions, the references and the forward-only entry of each backend.
KERNELS = ("nga", "similarity", "loss")
IMPLS = ("eager", "compile", "triton")
# "cublas": the similarity as one native-dtype einsum (cuBLAS GEMMs on GPU, no fp32 upcast
# as in the reference): the bar the Triton similarity kernel has to meet.
EXTRA_IMPLS = {"similarity": ("cublas",)}


@dataclass(frozen=True)
class Shapes:
    """Problem sizes for one run of every kernel."""

    L: int  # NGA: blocks per stage
    B: int  # images per GPU
    N: int  # patch tokens (32 x 32)
    C: int  # NGA channels
    S: int  # stages
    D: int  # decoder width
    K: int  # classes (queries)
    h: int  # logit map height = width (sqrt N)
    H: int  # target height = width


PAPER = Shapes(L=3, B=4, N=1024, C=512, S=3, D=512, K=156, h=32, H=512)
SMALL = Shapes(L=3, B=1, N=256, C=128, S=3, D=128, K=32, h=16, H=128)


def shapes() -> Shapes:
    choice = os.environ.get("CASCADE_CLIP_BENCH_SHAPES", "paper" if ON_GPU else "small")
    return {"paper": PAPER, "small": SMALL}[choice]


# ----------------------------------------------------------------------------------------
# Inputs and the function each case runs
# ----------------------------------------------------------------------------------------


def make_inputs(kernel: str, sh: Shapes, dtype: torch.dtype, device: torch.device) -> dict:
    """Fresh inputs (leaf tensors requiring grad where the kernel is differentiable) and
    the output gradient; the same for every implementation of a kernel."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=g)).to(device=device, dtype=dtype)

    if kernel == "nga":
        feats = randn(sh.L, sh.B, sh.N, sh.C).requires_grad_()
        weights = torch.tensor([0.135, 0.607, 1.0][-sh.L :], device=device).requires_grad_()
        return {"args": (feats, weights), "leaves": (feats, weights),
                "grad": randn(sh.B, sh.N, sh.C)}
    if kernel == "similarity":
        pixels = randn(sh.S, sh.B, sh.N, sh.D).requires_grad_()
        queries = randn(sh.S, sh.B, sh.K, sh.D).requires_grad_()
        scale = 1.0 / (8 * (sh.D // 8) ** 0.5)
        return {"args": (pixels, queries, scale), "leaves": (pixels, queries),
                "grad": torch.randn(sh.B, sh.K, sh.N, generator=g).to(device)}
    if kernel == "loss":
        logits = randn(sh.B, sh.K, sh.h, sh.h, scale=3.0).requires_grad_()
        target = torch.randint(0, sh.K + 20, (sh.B, sh.H, sh.H), generator=g)
        target[target >= sh.K + 10] = 255  # some ignore, some unlabelled-by-query pixels
        return {"args": (logits, target.to(device)), "leaves": (logits,), "grad": None}
    raise ValueError(kernel)


_REFERENCES = {
    "nga": nga_reference,
    "similarity": pixel_text_logits_reference,
    "loss": sigmoid_focal_dice_loss_reference,
}
_PUBLIC = {"nga": nga, "similarity": pixel_text_logits, "loss": sigmoid_focal_dice_loss}
_COMPILED: dict[str, Callable] = {}


def implementation(kernel: str, impl: str) -> Callable:
    """The callable for one (kernel, impl) pair: the reference, torch.compile of the
    reference, or the Triton path (the public function with Triton forced)."""
    if impl == "eager":
        return _REFERENCES[kernel]
    if impl == "compile":
        if kernel not in _COMPILED:
            _COMPILED[kernel] = torch.compile(_REFERENCES[kernel])
        return _COMPILED[kernel]
    if impl == "cublas" and kernel == "similarity":
        def cublas(pixels, queries, scale):
            return torch.einsum("sbkd,sbnd->bkn", queries, pixels).float() * scale

        return cublas
    if impl == "triton":
        def run(*args):
            previous = os.environ.get("CASCADE_CLIP_KERNELS")
            os.environ["CASCADE_CLIP_KERNELS"] = "triton"
            try:
                return _PUBLIC[kernel](*args)
            finally:
                if previous is None:
                    del os.environ["CASCADE_CLIP_KERNELS"]
                else:
                    os.environ["CASCADE_CLIP_KERNELS"] = previous

        return run
    raise ValueError(impl)


def step(
    kernel: str, impl: str, inputs: dict, backward: bool = True, sync: bool = True
) -> Callable[[], None]:
    """A closure running one forward (+ backward) and, with `sync`, waiting for the device
    (without it the closure can be captured in a CUDA graph)."""
    fn = implementation(kernel, impl)

    def run() -> None:
        for t in inputs["leaves"]:
            t.grad = None
        out = fn(*inputs["args"])
        if backward:
            out.backward(inputs["grad"])
        if sync and ON_GPU:
            torch.cuda.synchronize()

    return run


def min_bytes(kernel: str, sh: Shapes, dtype: torch.dtype, backward: bool) -> int:
    """Bytes a kernel must move at least (compulsory traffic), for a bandwidth figure."""
    e = torch.tensor([], dtype=dtype).element_size()
    if kernel == "nga":
        bnc = sh.B * sh.N * sh.C
        # fwd: read L maps, write 1; bwd: read grad, read L maps (dw), write L maps (df)
        return e * bnc * ((sh.L + 1) + ((1 + 2 * sh.L) if backward else 0))
    if kernel == "similarity":
        io = e * sh.S * sh.B * (sh.N + sh.K) * sh.D + 4 * sh.B * sh.K * sh.N
        return io * (3 if backward else 1)
    if kernel == "loss":
        lo = e * sh.B * sh.K * sh.h * sh.h
        return 8 * sh.B * sh.H * sh.H + lo * (3 if backward else 1)
    raise ValueError(kernel)


def skip_reason(impl: str) -> str | None:
    if impl == "triton":
        if not ON_GPU:
            return "Triton cases need a CUDA device (the interpreter is for tests, not timing)"
        if interpreting():
            return "TRITON_INTERPRET=1 (benchmarks/conftest.py default): rerun with TRITON_INTERPRET=0"
    if impl == "compile" and not ON_GPU:
        return "torch.compile cases run on GPU only (CPU compile needs minutes of C++ builds)"
    return None


# Relative L2 error a case may show against the fp64 oracle, by the dtype it ran in.
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
OUT_SHAPES = {
    "nga": lambda sh: (sh.B, sh.N, sh.C),
    "similarity": lambda sh: (sh.B, sh.K, sh.N),
    "loss": lambda sh: (),
}


def oracle(kernel: str, *args):
    """The kernel's result computed independently of the implementations under test, in the
    arguments' dtype (the checks pass fp64): NGA and the similarity as explicit weighted /
    per-stage sums; the loss is the reference (it computes in fp32 whatever its input)."""
    if kernel == "nga":
        feats, weights = args
        return (weights.view(-1, 1, 1, 1) * feats).sum(0)
    if kernel == "similarity":
        pixels, queries, scale = args
        return sum(queries[s] @ pixels[s].transpose(-1, -2) for s in range(pixels.shape[0])) * scale
    if kernel == "loss":
        return sigmoid_focal_dice_loss_reference(*args)
    raise ValueError(kernel)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def verify(kernel: str, impl: str, inputs: dict, sh: Shapes, backward: bool) -> None:
    """The timed (kernel, impl) computes the kernel: its output on the benchmark's inputs,
    and (with `backward`) the gradients the last timed call left on them, match the oracle."""
    dtype = inputs["leaves"][0].dtype
    with torch.no_grad():
        out = implementation(kernel, impl)(*inputs["args"])
    ref_args = tuple(
        a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a
        for a in inputs["args"]
    )
    ref = oracle(kernel, *ref_args)
    assert tuple(out.shape) == OUT_SHAPES[kernel](sh), (kernel, impl, tuple(out.shape))
    assert torch.isfinite(out).all(), (kernel, impl)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{kernel}-{impl} output: relative error {err:.2e} vs the oracle"
    if not backward:
        return
    grad = inputs["grad"]
    ref.backward(None if grad is None else grad.double())
    ref_leaves = [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad]
    for i, (leaf, ref_leaf) in enumerate(zip(inputs["leaves"], ref_leaves)):
        assert leaf.grad is not None, f"{kernel}-{impl}: no gradient for input {i}"
        assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0, (kernel, impl, i)
        err = rel_err(leaf.grad, ref_leaf.grad)
        assert err < TOL[dtype], f"{kernel}-{impl} gradient {i}: relative error {err:.2e} vs the oracle"


def peak_memory(run: Callable[[], None]) -> dict:
    """Peak device memory of one call above what was allocated before it (GPU only)."""
    if not ON_GPU:
        return {"peak_mem_MiB": None, "peak_mem_note": "not measured on CPU"}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    return {"peak_mem_MiB": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)}


# ----------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------


def _bench(benchmark, kernel: str, impl: str, backward: bool) -> None:
    reason = skip_reason(impl)
    if reason:
        pytest.skip(reason)
    sh = shapes()
    dtype = torch.float16 if ON_GPU else torch.float32
    inputs = make_inputs(kernel, sh, dtype, DEVICE)
    run = step(kernel, impl, inputs, backward)
    run()  # warm-up: compilation / autotuning outside the timing
    benchmark.group = f"{kernel}-{'fwd_bwd' if backward else 'fwd'}"
    benchmark.extra_info.update(
        {"device": torch.cuda.get_device_name() if ON_GPU else "cpu", "dtype": str(dtype),
         "shapes": str(sh), "min_bytes": min_bytes(kernel, sh, dtype, backward)}
    )
    benchmark.extra_info.update(peak_memory(run))
    benchmark(run)
    assert benchmark.extra_info["min_bytes"] > 0
    verify(kernel, impl, inputs, sh, backward)


@pytest.mark.parametrize(
    "kernel, impl",
    [(k, i) for k in KERNELS for i in IMPLS + EXTRA_IMPLS.get(k, ())],
)
def test_fwd_bwd(benchmark, kernel, impl):
    _bench(benchmark, kernel, impl, backward=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_nga_fwd(benchmark, impl):
    _bench(benchmark, "nga", impl, backward=False)


def test_copy_ceiling(benchmark):
    """A plain device copy of the NGA input: the bandwidth an elementwise kernel can reach."""
    sh = shapes()
    dtype = torch.float16 if ON_GPU else torch.float32
    src = torch.randn(sh.L, sh.B, sh.N, sh.C, device=DEVICE).to(dtype)
    dst = torch.empty_like(src)

    def run() -> None:
        dst.copy_(src)
        if ON_GPU:
            torch.cuda.synchronize()

    run()
    benchmark.group = "nga-fwd"
    benchmark.extra_info.update({"min_bytes": 2 * src.numel() * src.element_size()})
    dst.zero_()
    benchmark(run)
    assert torch.equal(dst, src) and src.abs().sum() > 0


def test_triton_and_reference_agree_here():
    """The benchmarked Triton path computes what the reference does (GPU only; the CPU
    interpreter checks live in tests/test_kernels.py)."""
    if skip_reason("triton"):
        pytest.skip(skip_reason("triton"))
    sh = shapes()
    for kernel in KERNELS:
        outs = []
        for impl in ("eager", "triton"):
            inputs = make_inputs(kernel, sh, torch.float32, DEVICE)
            outs.append(implementation(kernel, impl)(*inputs["args"]).float())
        err = (outs[1] - outs[0]).norm() / outs[0].norm()
        assert err < 1e-4, (kernel, err.item())
