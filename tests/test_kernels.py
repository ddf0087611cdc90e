"""Triton kernels against their PyTorch references: in Triton's interpreter on CPU, or
compiled on a GPU when there is one.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before this module imports the
kernels. The ``triton`` fixture forces the Triton path (CASCADE_CLIP_KERNELS=triton), makes
the tests' tensors on the GPU if there is one, and poisons every kernel output buffer with
NaN before launch (CASCADE_CLIP_KERNELS_POISON=1), so an element a kernel fails to write
makes the comparison fail. Inputs are fresh random tensors each run, with sizes that are not
multiples of any block size, fp32 and fp16 (and bf16 on a GPU: the interpreter computes
bf16 wrongly), contiguous and not.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cascade_clip.kernels import dispatch

# The kernel modules (each defines a function of its own name, e.g. nga.nga).
nga = importlib.import_module("cascade_clip.kernels.nga")
similarity = importlib.import_module("cascade_clip.kernels.similarity")
seg_loss = importlib.import_module("cascade_clip.kernels.seg_loss")

ON_GPU = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.fixture
def triton(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setenv(similarity.SIMILARITY_VAR, "triton")  # the kernel, never the GEMM
    monkeypatch.setenv(dispatch.POISON_VAR, "1")
    with torch.device("cuda" if ON_GPU else "cpu"):  # the default device of tensor factories
        yield


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output (an unwritten, poisoned element?)"
    denom = ref.norm().item()
    err = (out - ref).norm().item()
    return err if denom == 0 else err / denom


def strided(x: torch.Tensor, contiguous: bool) -> torch.Tensor:
    """``x`` itself, or an equal tensor whose last two dims are stored transposed."""
    if contiguous:
        return x.clone()
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def grads(fn, inputs, grad_out=None):
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(grad_out if grad_out is not None else None)
    return out.detach(), [None if t.grad is None else t.grad.clone() for t in inputs]


# ----------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------


def _spy(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def _call_all():
    f = torch.randn(2, 1, 3, 4)
    nga.nga(f, torch.rand(2))
    similarity.pixel_text_logits(torch.randn(2, 1, 5, 4), torch.randn(2, 1, 3, 4), 0.5)
    seg_loss.sigmoid_focal_dice_loss(torch.randn(1, 3, 2, 2), torch.randint(0, 3, (1, 4, 4)))


@pytest.mark.parametrize("env", [None, "", "auto", "torch", "TORCH"])
def test_dispatch_cpu_uses_reference(monkeypatch, env):
    if env is None:
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(dispatch.ENV_VAR, env)
    calls = []
    _spy(monkeypatch, nga, "nga_reference", calls)
    _spy(monkeypatch, similarity, "pixel_text_logits_reference", calls)
    _spy(monkeypatch, seg_loss, "sigmoid_focal_dice_loss_reference", calls)
    _call_all()
    assert calls == [
        "nga_reference",
        "pixel_text_logits_reference",
        "sigmoid_focal_dice_loss_reference",
    ]
    assert not dispatch.use_triton(torch.zeros(1))


def test_dispatch_forced_triton(monkeypatch, triton):
    calls = []
    _spy(monkeypatch, nga, "nga_reference", calls)
    _spy(monkeypatch, similarity, "pixel_text_logits_reference", calls)
    _spy(monkeypatch, seg_loss, "sigmoid_focal_dice_loss_reference", calls)
    launched = []
    _spy(monkeypatch, nga, "_nga_forward", launched)
    _spy(monkeypatch, similarity, "_similarity_forward", launched)
    _spy(monkeypatch, seg_loss, "_seg_stats_forward", launched)
    _call_all()
    assert calls == []
    assert launched == ["_nga_forward", "_similarity_forward", "_seg_stats_forward"]


def test_dispatch_errors(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="CASCADE_CLIP_KERNELS"):
        dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.use_triton(torch.zeros(1))


def test_poisoned_outputs(monkeypatch):
    monkeypatch.setenv(dispatch.POISON_VAR, "1")
    assert torch.isnan(dispatch.new_output((3, 2), torch.float16, torch.device("cpu"))).all()


def test_public_api():
    for module, name in (
        (nga, "nga"), (nga, "nga_reference"),
        (similarity, "pixel_text_logits"), (similarity, "pixel_text_logits_reference"),
        (seg_loss, "sigmoid_focal_dice_loss"), (seg_loss, "sigmoid_focal_dice_loss_reference"),
    ):
        assert callable(getattr(module, name))


def test_kernels_compile_for_sm90():
    """The interpreter does not compile anything: build every kernel configuration the
    wrappers launch for an H100 (sm_90) with Triton's own compiler and ptxas, no GPU
    needed, and fail on a compile error or a register spill (kernels/aot_check.py)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-m", "cascade_clip.kernels.aot_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all kernels compiled" in proc.stdout


# ----------------------------------------------------------------------------------------
# NGA
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_nga_matches_reference(triton, dtype, contiguous):
    L, B, N, C = 3, 2, 37, 67
    feats = strided(torch.randn(L, B, N, C).to(dtype), contiguous).requires_grad_()
    weights = (torch.rand(L) + 0.1).requires_grad_()
    g = strided(torch.randn(B, N, C).to(dtype), contiguous)
    out, (gf, gw) = grads(lambda: nga.nga(feats, weights), [feats, weights], g)
    ref, (rf, rw) = grads(lambda: nga.nga_reference(feats, weights), [feats, weights], g)
    assert out.dtype == dtype and gf.dtype == dtype and gw.dtype == torch.float32
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(gf, rf) < TOL[dtype]
    assert rel_err(gw, rw) < TOL[dtype]


def test_nga_weights_only_grad_and_single_block(triton):
    feats = torch.randn(1, 3, 10, 19)
    weights = torch.tensor([0.7], requires_grad=True)
    out, (gw,) = grads(lambda: nga.nga(feats, weights), [weights], torch.ones(3, 10, 19))
    assert rel_err(out, 0.7 * feats[0]) < 1e-6
    assert rel_err(gw, feats.sum().reshape(1)) < 1e-5


# ----------------------------------------------------------------------------------------
# Pixel-text similarity
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_pixel_text_logits_matches_reference(triton, dtype, contiguous):
    S, B, N, D, Kc = 3, 2, 45, 40, 19
    scale = 1.0 / (8 * math.sqrt(64))
    pixels = strided(torch.randn(S, B, N, D).to(dtype), contiguous).requires_grad_()
    queries = torch.randn(B, S, Kc, D).to(dtype).transpose(0, 1)  # (S, B, K, D), strided
    queries = (queries.contiguous() if contiguous else queries).requires_grad_()
    g = strided(torch.randn(B, Kc, N), contiguous)
    inputs = [pixels, queries]
    out, (gp, gq) = grads(lambda: similarity.pixel_text_logits(pixels, queries, scale), inputs, g)
    ref, (rp, rq) = grads(
        lambda: similarity.pixel_text_logits_reference(pixels, queries, scale), inputs, g
    )
    assert out.dtype == torch.float32 and out.shape == (B, Kc, N)
    assert gp.dtype == dtype and gq.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(gp, rp) < TOL[dtype]
    assert rel_err(gq, rq) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_pixel_text_logits_gemm_path_matches_reference(triton, monkeypatch, dtype):
    monkeypatch.setenv(similarity.SIMILARITY_VAR, "gemm")
    S, B, N, D, Kc = 3, 2, 45, 40, 19
    pixels = torch.randn(S, B, N, D).to(dtype).requires_grad_()
    queries = torch.randn(S, B, Kc, D).to(dtype).requires_grad_()
    g = torch.randn(B, Kc, N)
    inputs = [pixels, queries]
    out, (gp, gq) = grads(lambda: similarity.pixel_text_logits(pixels, queries, 0.3), inputs, g)
    ref, (rp, rq) = grads(lambda: similarity.pixel_text_logits_reference(pixels, queries, 0.3), inputs, g)
    assert out.dtype == torch.float32
    for a, b in ((out, ref), (gp, rp), (gq, rq)):
        assert rel_err(a, b) < TOL[dtype]


def test_similarity_auto_keeps_the_faster_path_per_shape(monkeypatch):
    """auto: both paths are timed once per shape and dtype; the faster is kept."""
    monkeypatch.delenv(similarity.SIMILARITY_VAR, raising=False)
    monkeypatch.setattr(similarity, "_FASTEST", {})
    timed = []

    def timer(fast: str):
        def time_ms(name, fn, pixels, queries):
            timed.append(name)
            assert fn(pixels, queries).shape == (pixels.shape[1], queries.shape[2], pixels.shape[2])
            return 1.0 if name == fast else 2.0

        return time_ms

    small, big = torch.randn(3, 2, 9, 8), torch.randn(3, 2, 25, 8)
    q = torch.randn(3, 2, 4, 8)
    assert similarity.similarity_path(small, q, timer("gemm")) == "gemm"
    assert similarity.similarity_path(big, q, timer("triton")) == "triton"
    assert similarity.similarity_path(small, q, timer("triton")) == "gemm"  # kept, not re-timed
    assert timed == ["triton", "gemm", "triton", "gemm"]
    monkeypatch.setenv(similarity.SIMILARITY_VAR, "gemm")
    assert similarity.similarity_path(big, q) == "gemm"
    monkeypatch.setenv(similarity.SIMILARITY_VAR, "cublas")
    with pytest.raises(ValueError, match="expected auto, triton or gemm"):
        similarity.similarity_path(big, q)


def test_pixel_text_logits_single_stage_query_grad_only(triton):
    pixels = torch.randn(1, 1, 17, 33)
    queries = torch.randn(1, 1, 5, 33, requires_grad=True)
    g = torch.randn(1, 5, 17)
    out, (gq,) = grads(lambda: similarity.pixel_text_logits(pixels, queries, 2.0), [queries], g)
    ref, (rq,) = grads(
        lambda: similarity.pixel_text_logits_reference(pixels, queries, 2.0), [queries], g
    )
    assert rel_err(out[0], 2.0 * queries[0, 0].detach() @ pixels[0, 0].T) < 1e-5
    assert rel_err(gq, rq) < 1e-5


# ----------------------------------------------------------------------------------------
# Segmentation loss
# ----------------------------------------------------------------------------------------


def make_target(b, hh, ww, num_classes, absent=(), ignore_frac=0.2, ignore_index=255):
    """Random labels in [0, num_classes] (num_classes = a counted pixel of no class),
    some ignore pixels, classes in ``absent`` never used."""
    t = torch.randint(0, num_classes + 1, (b, hh, ww))
    for c in absent:
        t[t == c] = num_classes
    t[torch.rand(b, hh, ww) < ignore_frac] = ignore_index
    return t


def check_loss(logits, target, dtype, **kwargs):
    out, (g,) = grads(lambda: seg_loss.sigmoid_focal_dice_loss(logits, target, **kwargs), [logits])
    ref, (rg,) = grads(
        lambda: seg_loss.sigmoid_focal_dice_loss_reference(logits, target, **kwargs), [logits]
    )
    assert out.dtype == torch.float32 and out.dim() == 0
    assert g.dtype == logits.dtype and g.shape == logits.shape
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(g, rg) < TOL[dtype]
    return out, ref, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore_as_negative", [True, False])
def test_loss_matches_reference(triton, dtype, ignore_as_negative):
    B, Kc, h, w, H, W = 2, 11, 7, 9, 37, 45
    logits = strided((3 * torch.randn(B, Kc, h, w)).to(dtype), ignore_as_negative)
    logits.requires_grad_()
    target = make_target(B, H, W, Kc, absent=(3,))
    check_loss(logits, target, dtype, ignore_as_negative=ignore_as_negative)


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((1, 5, 21, 18, 13, 11), {"gamma": 1.5, "alpha": 0.4}),  # downsampling, gamma != 2
        ((2, 4, 3, 40, 30, 70), {"gamma": 0.0, "ignore_index": -1}),
        ((1, 3, 1, 1, 5, 6), {"focal_weight": 20.0, "dice_weight": 5.0}),  # 1x1 source
    ],
)
def test_loss_shapes_and_options(triton, shape, kwargs):
    B, Kc, h, w, H, W = shape
    logits = (2 * torch.randn(B, Kc, h, w)).requires_grad_()
    target = make_target(B, H, W, Kc, ignore_index=kwargs.get("ignore_index", 255))
    check_loss(logits, target, torch.float32, **kwargs)


@pytest.mark.parametrize("ignore_as_negative", [True, False])
def test_loss_no_present_class(triton, ignore_as_negative):
    B, Kc, h, w, H, W = 2, 6, 5, 6, 19, 23
    logits = torch.randn(B, Kc, h, w, requires_grad=True)
    target = make_target(B, H, W, Kc, absent=range(Kc))  # only "no class" and ignore
    out, ref, _ = check_loss(logits, target, torch.float32, ignore_as_negative=ignore_as_negative)
    assert out.item() > 0  # focal of the negatives, divided by M = 1


@pytest.mark.parametrize("ignore_as_negative", [True, False])
def test_loss_every_pixel_ignored(triton, ignore_as_negative):
    B, Kc, h, w, H, W = 2, 5, 4, 6, 17, 20
    logits = torch.randn(B, Kc, h, w, requires_grad=True)
    target = torch.full((B, H, W), 255)
    out, ref, g = check_loss(logits, target, torch.float32, ignore_as_negative=ignore_as_negative)
    if ignore_as_negative:
        assert out.item() > 0 and g.abs().sum() > 0
    else:
        assert out.item() == 0.0 and g.abs().sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_masks", [3.5, "tensor", 0.25])
def test_loss_num_masks(triton, dtype, num_masks):
    B, Kc, h, w, H, W = 2, 7, 6, 5, 25, 22
    logits = torch.randn(B, Kc, h, w).to(dtype).requires_grad_()
    target = make_target(B, H, W, Kc)
    m = torch.tensor(9.0) if num_masks == "tensor" else num_masks
    out, ref, _ = check_loss(logits, target, dtype, num_masks=m)
    base = seg_loss.sigmoid_focal_dice_loss_reference(logits, target, num_masks=1.0)
    expected = base / max(1.0, float(m))
    assert rel_err(ref, expected) < 1e-5


def test_loss_never_materialises_full_resolution(triton):
    """No torch op in the fused forward+backward makes a tensor of B*K*H*W elements (nor a
    quarter of it; the interpreter's byte views of the (B, H, W) labels are the largest)."""
    B, Kc, h, w, H, W = 1, 16, 5, 6, 40, 44
    logits = torch.randn(B, Kc, h, w, requires_grad=True)
    target = make_target(B, H, W, Kc)

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with Largest():
        seg_loss.sigmoid_focal_dice_loss(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert 0 < Largest.numel < B * Kc * H * W // 4


def test_degenerate_sizes(triton):
    """One class, one channel, one pixel/query: block masks at their extremes."""
    logits = torch.randn(2, 1, 3, 3, requires_grad=True)
    check_loss(logits, torch.randint(0, 2, (2, 10, 9)), torch.float32)
    feats = torch.randn(2, 3, 5, 1)
    w = torch.rand(2)
    assert rel_err(nga.nga(feats, w), nga.nga_reference(feats, w)) < 1e-6
    p, q = torch.randn(1, 1, 1, 3), torch.randn(1, 1, 1, 3)
    out = similarity.pixel_text_logits(p, q, 1.0)
    assert rel_err(out, similarity.pixel_text_logits_reference(p, q, 1.0)) < 1e-6


# ----------------------------------------------------------------------------------------
# The oracle itself: the reference loss against a naive re-statement of docs/design.md, The model
# ----------------------------------------------------------------------------------------


def interp_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """(out, in) bilinear (align_corners=False) interpolation matrix, built row by row."""
    a = torch.zeros(out_size, in_size, dtype=torch.float64)
    for o in range(out_size):
        src = max((o + 0.5) * in_size / out_size - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = src - i0
        a[o, i0] += 1 - lam
        a[o, i1] += lam
    return a


def naive_loss(logits, target, ignore_index=255, alpha=0.25, gamma=2.0, focal_weight=100.0,
               dice_weight=1.0, ignore_as_negative=True, num_masks=None):
    B, Kc, h, w = logits.shape
    H, W = target.shape[-2:]
    a_h, a_w = interp_matrix(H, h), interp_matrix(W, w)
    x = a_h @ logits.double() @ a_w.T  # (B, K, H, W), materialised
    focal_terms, dice_terms, present = [], [], 0
    for b in range(B):
        valid = target[b] != ignore_index
        counted = torch.ones_like(valid) if ignore_as_negative else valid
        for k in range(Kc):
            t = ((target[b] == k) & valid).double()
            p = 1 / (1 + torch.exp(-x[b, k]))
            bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
            p_t = p * t + (1 - p) * (1 - t)
            a_t = alpha * t + (1 - alpha) * (1 - t)
            fl = a_t * bce * (1 - p_t) ** gamma
            n = int(counted.sum())
            focal_terms.append(fl[counted].sum() / n if n else torch.zeros((), dtype=x.dtype))
            if t.sum() > 0:
                present += 1
                pc, tc = p[counted], t[counted]
                dice_terms.append(1 - (2 * (pc * tc).sum() + 1) / (pc.sum() + tc.sum() + 1))
    m = max(1.0, float(present if num_masks is None else num_masks))
    focal = sum(focal_terms) / m
    dice = sum(dice_terms) / m if dice_terms else 0.0
    return focal_weight * focal + dice_weight * dice


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"ignore_as_negative": False},
        {"num_masks": 4.0, "gamma": 1.5, "alpha": 0.3},
        {"focal_weight": 1.0, "dice_weight": 0.0, "ignore_index": -1},
    ],
)
def test_reference_loss_matches_naive_formula(kwargs):
    B, Kc, h, w, H, W = 2, 5, 5, 6, 13, 22
    logits = 2 * torch.randn(B, Kc, h, w)
    target = make_target(B, H, W, Kc, absent=(1,), ignore_index=kwargs.get("ignore_index", 255))
    ref = seg_loss.sigmoid_focal_dice_loss_reference(logits, target, **kwargs)
    assert rel_err(ref, torch.as_tensor(naive_loss(logits, target, **kwargs))) < 1e-5


def test_reference_loss_edge_cases_match_naive():
    logits = torch.randn(1, 3, 4, 4)
    for target in (torch.full((1, 9, 7), 255), torch.full((1, 9, 7), 3)):
        for ian in (True, False):
            ref = seg_loss.sigmoid_focal_dice_loss_reference(logits, target, ignore_as_negative=ian)
            naive = torch.as_tensor(naive_loss(logits, target, ignore_as_negative=ian))
            assert abs(ref.item() - naive.item()) <= 1e-5 * max(1.0, abs(naive.item()))
