"""Neighborhood Gaussian Aggregation (NGA): a weighted sum of a stage's tapped blocks.

``out[b, n, c] = sum_l weights[l] * features[l, b, n, c]`` (docs/design.md: The model), accumulated
in fp32 and returned in the features' dtype.

Layout, as in the Triton layer-norm tutorial: the reference, then the forward kernel, the
backward kernel, their launch wrappers, the autograd Function and the public function.
The ``(B, N)`` axes are walked as one row axis ``r = b * N + n`` of length ``R = B * N``
(each row's address comes from its own ``b`` and ``n`` strides, so any strides work); the
grid tiles ``(R, C)`` with ``(BLOCK_R, BLOCK_C)`` tiles and every program loops over ``L``.
The op is memory bound: forward reads ``L`` tiles and writes one, backward reads the
gradient tile once and, per ``l``, writes ``w_l * grad`` and/or reduces ``grad * f_l``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .dispatch import new_output, use_triton

# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------


def nga_reference(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch NGA: the CPU path and the test oracle.

    Args:
        features: ``(L, B, N, C)``, any strides, fp32/fp16/bf16.
        weights: ``(L,)``.

    Returns:
        ``(B, N, C)`` in ``features.dtype``.
    """
    _check_nga(features, weights)
    out = torch.einsum("l,lbnc->bnc", weights.float(), features.float())
    return out.to(features.dtype)


def _check_nga(features: torch.Tensor, weights: torch.Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"features must be (L, B, N, C), got {tuple(features.shape)}")
    if weights.shape != (features.shape[0],):
        raise ValueError(
            f"weights must be ({features.shape[0]},), got {tuple(weights.shape)}"
        )


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _nga_fwd_kernel(
    f_ptr,  # features (L, B, N, C), strides (s_fl, s_fb, s_fn, s_fc)
    w_ptr,  # weights (L,), stride s_w
    out_ptr,  # out (B, N, C), strides (s_ob, s_on, s_oc)
    L, N, C, R,  # R = B * N
    s_fl, s_fb, s_fn, s_fc,
    s_w,
    s_ob, s_on, s_oc,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Program (pid_r, pid_c) owns out rows [pid_r*BLOCK_R, +BLOCK_R) x cols [pid_c*BLOCK_C, +).
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    f_ptrs = f_ptr + (b * s_fb + n * s_fn)[:, None] + cols[None, :] * s_fc
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for _ in range(L):
        w = tl.load(w_ptr).to(tl.float32)
        f = tl.load(f_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += w * f
        f_ptrs += s_fl  # pointer arithmetic is 64-bit: no overflow for large L*B*N*C
        w_ptr += s_w
    out_ptrs = out_ptr + (b * s_ob + n * s_on)[:, None] + cols[None, :] * s_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nga_bwd_kernel(
    g_ptr,  # grad of out (B, N, C), strides (s_gb, s_gn, s_gc)
    f_ptr,  # features (L, B, N, C), strides (s_fl, s_fb, s_fn, s_fc)
    w_ptr,  # weights (L,), stride s_w
    gf_ptr,  # grad of features (L, B, N, C), strides (s_dl, s_db, s_dn, s_dc)
    gw_ptr,  # per-program partial grad of weights (L, n_programs) fp32, contiguous
    L, N, C, R, n_programs,
    s_gb, s_gn, s_gc,
    s_fl, s_fb, s_fn, s_fc,
    s_w,
    s_dl, s_db, s_dn, s_dc,
    NEED_GF: tl.constexpr,
    NEED_GW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grad_features[l] = w[l] * g;  grad_w[l] = sum(g * features[l]), reduced per program
    # into gw_ptr[l, pid] and summed over programs on the host side (deterministic).
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid = pid_r * tl.num_programs(1) + pid_c
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    g = tl.load(
        g_ptr + (b * s_gb + n * s_gn)[:, None] + cols[None, :] * s_gc, mask=mask, other=0.0
    ).to(tl.float32)
    f_ptrs = f_ptr + (b * s_fb + n * s_fn)[:, None] + cols[None, :] * s_fc
    d_ptrs = gf_ptr + (b * s_db + n * s_dn)[:, None] + cols[None, :] * s_dc
    for _ in range(L):
        if NEED_GF:
            w = tl.load(w_ptr).to(tl.float32)
            tl.store(d_ptrs, (w * g).to(gf_ptr.dtype.element_ty), mask=mask)
        if NEED_GW:
            f = tl.load(f_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(gw_ptr + pid, tl.sum(tl.sum(g * f, axis=1), axis=0))
        f_ptrs += s_fl
        d_ptrs += s_dl
        w_ptr += s_w
        gw_ptr += n_programs


# ----------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------


def _blocks(c: int, elements: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for tiles of ``elements`` elements, channels innermost.

    Fixed heuristics (no autotuning): compiled for sm_90, 2048-element forward tiles and
    1024-element backward tiles with 4 warps need 72 registers a thread and no spills;
    twice that reaches ~150-250 registers (the backward spills), starving the occupancy a
    memory-bound kernel needs.
    """
    block_c = min(triton.next_power_of_2(c), 256)
    block_r = max(1, elements // block_c)
    return block_r, block_c, 4


def _nga_forward(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    L, B, N, C = features.shape
    out = new_output((B, N, C), features.dtype, features.device)
    R = B * N
    block_r, block_c, num_warps = _blocks(C, 2048)
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c))
    _nga_fwd_kernel[grid](
        features, weights, out,
        L, N, C, R,
        *features.stride(),
        weights.stride(0),
        *out.stride(),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def _nga_backward(
    grad: torch.Tensor,
    features: torch.Tensor,
    weights: torch.Tensor,
    need_gf: bool,
    need_gw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    L, B, N, C = features.shape
    R = B * N
    block_r, block_c, num_warps = _blocks(C, 1024)
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c))
    n_programs = grid[0] * grid[1]
    gf = new_output(tuple(features.shape), features.dtype, features.device) if need_gf else None
    gw_part = (
        new_output((L, n_programs), torch.float32, features.device) if need_gw else None
    )
    dummy = grad  # never dereferenced when the matching NEED_* flag is off
    gf_arg = gf if gf is not None else dummy
    _nga_bwd_kernel[grid](
        grad, features, weights,
        gf_arg, gw_part if gw_part is not None else dummy,
        L, N, C, R, n_programs,
        *grad.stride(),
        *features.stride(),
        weights.stride(0),
        *(gf.stride() if gf is not None else (0, 0, 0, 0)),
        NEED_GF=need_gf, NEED_GW=need_gw,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    gw = gw_part.sum(dim=1).to(weights.dtype) if gw_part is not None else None
    return gf, gw


class NGAFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton NGA kernels."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features, weights)
        return _nga_forward(features, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        features, weights = ctx.saved_tensors
        need_gf, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_gf or need_gw):
            return None, None
        return _nga_backward(grad, features, weights, need_gf, need_gw)


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------


def nga(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """NGA: ``sum_l weights[l] * features[l]``; ``(L, B, N, C), (L,) -> (B, N, C)``.

    Accumulates in fp32 and returns ``features.dtype``. CUDA tensors run the fused Triton
    kernel, CPU tensors :func:`nga_reference` (see :mod:`cascade_clip.kernels.dispatch`).
    Differentiable in both arguments.
    """
    _check_nga(features, weights)
    if use_triton(features, weights):
        return NGAFunction.apply(features, weights)
    return nga_reference(features, weights)
