"""Bilinear upsampling + sigmoid focal + dice segmentation loss (docs/design.md: The model).

With ``x[b, k, p]`` the logits upsampled bilinearly (``align_corners=False``) from
``(h, w)`` to the target's ``(H, W)``, one-hot targets ``t[b, k, p] = (target[b, p] == k)``
(0 at ignore pixels), ``P`` the pixels counted and ``M = max(1, #(b, k) with any t = 1)``::

    focal = sum_{b,k} mean_{p in P} FL(x, t) / M
    FL    = alpha_t * BCEWithLogits(x, t) * (1 - p_t) ** gamma
    dice  = sum_{(b,k) present} (1 - (2 sum_p p t + 1) / (sum_p p + sum_p t + 1)) / M
    loss  = focal_weight * focal + dice_weight * dice

With ``ignore_as_negative=True`` (the released behaviour) ignore pixels are in ``P`` as
negatives of every class; with ``False`` they leave ``P`` and the dice sums. A batch item
whose pixels are all ignored then contributes 0 to the focal term. ``num_masks``, when
given, replaces ``M`` (multi-GPU training passes the all-reduced mean; still clamped to at
least 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .dispatch import interpreting, new_output, use_triton


def _check_loss(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 4 or target.dim() != 3:
        raise ValueError(
            "logits must be (B, K, h, w) and target (B, H, W), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if logits.shape[0] != target.shape[0]:
        raise ValueError(f"batch sizes differ: {logits.shape[0]} vs {target.shape[0]}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"target must be an integer tensor, got {target.dtype}")


def _num_masks(
    num_masks: float | torch.Tensor | None, present: torch.Tensor
) -> torch.Tensor:
    """``M``: the given ``num_masks`` (e.g. all-reduced across GPUs) or the local count of
    present (b, k); clamped to at least 1 either way."""
    if num_masks is None:
        m = present.sum().to(torch.float32)
    else:
        m = torch.as_tensor(num_masks, dtype=torch.float32, device=present.device).detach()
    return m.clamp(min=1.0)


def sigmoid_focal_dice_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    alpha: float = 0.25,
    gamma: float = 2.0,
    focal_weight: float = 100.0,
    dice_weight: float = 1.0,
    ignore_as_negative: bool = True,
    num_masks: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch loss: the CPU path and the test oracle. Materialises ``(B,K,H,W)``.

    Args:
        logits: ``(B, K, h, w)`` at feature resolution.
        target: ``(B, H, W)`` integer class ids, ``ignore_index`` for ignore.
        num_masks: replaces ``M`` when given (multi-GPU training passes the all-reduced
            mean); clamped to at least 1 like ``M``.

    Returns:
        The scalar loss, fp32.
    """
    _check_loss(logits, target)
    _, k, _, _ = logits.shape
    size = target.shape[-2:]
    x = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    valid = (target != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    classes = torch.arange(k, device=target.device).view(1, k, 1, 1)
    t = ((target.unsqueeze(1) == classes) & valid).float()  # (B, K, H, W)

    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    fl = alpha_t * ce * (1 - p_t) ** gamma

    if ignore_as_negative:
        in_p = torch.ones_like(valid, dtype=torch.float32)
    else:
        in_p = valid.float()
    n_p = in_p.sum(dim=(2, 3)).clamp(min=1.0)  # (B, 1)
    focal_bk = (fl * in_p).sum(dim=(2, 3)) / n_p  # (B, K)

    sum_t = t.sum(dim=(2, 3))
    sum_pt = (p * t).sum(dim=(2, 3))
    sum_p = (p * in_p).sum(dim=(2, 3))
    present = sum_t > 0
    m = _num_masks(num_masks, present)
    dice_bk = 1 - (2 * sum_pt + 1) / (sum_p + sum_t + 1)
    focal = focal_bk.sum() / m
    dice = torch.where(present, dice_bk, torch.zeros_like(dice_bk)).sum() / m
    return focal_weight * focal + dice_weight * dice


# ----------------------------------------------------------------------------------------
# Fused Triton version
#
# The loss only needs, per (b, k), four sums over the pixels of the upsampled logits:
#     stats[b, k] = (sum_P FL, sum_P p*t, sum_P p, sum t)
# (P = pixels counted; t = 0 outside the valid pixels anyway). So the autograd Function
# maps logits (B, K, h, w) -> stats (B, K, 4), and the O(B*K) epilogue that turns stats
# into the loss (means, M, dice) is plain PyTorch and differentiated by autograd.
#
# Forward kernel: program (pixel tile, class block, b) interpolates a
# (BLOCK_K, BLOCK_P) tile of upsampled logits on the fly (4 gathers per element from the
# small (h, w) map), evaluates FL and sigmoid and reduces over its pixels into
# partial[b, k, :, tile]; the host sums the partials over tiles (deterministic).
#
# Backward kernel: with dL/dstats = (g_f, g_pt, g_p) per (b, k), the gradient at an
# upsampled pixel is
#     G = [p in P] * (g_f * dFL/dx + (g_pt * t + g_p) * p * (1 - p)),
# and the logits' gradient is the adjoint of bilinear upsampling, which is separable:
#     up = A_h @ x @ A_w^T    =>    grad_x = A_h^T @ G @ A_w,
# with A_h (H, h), A_w (W, w) holding two non-zeros per row. Program (source tile, k, b)
# owns a (TILE_I, TILE_J) tile of grad_x: it loops over the block of output rows/columns
# whose interpolation taps touch the tile (bounds precomputed on the host), recomputes G
# there chunk by chunk (BLOCK_Y, BLOCK_X) and accumulates
#     acc += A_h[chunk rows, tile]^T @ (G_chunk @ A_w[chunk cols, tile])
# with two small tl.dot calls. Every grad_x element is written once by its owner: no
# atomics, deterministic, and neither G nor the upsampled logits ever reach memory.
# ----------------------------------------------------------------------------------------


@triton.jit
def _source_index(dst, scale, in_size):
    """PyTorch's bilinear source index (align_corners=False): taps i0, i1, weight of i1."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0: truncation is floor
    i1 = tl.minimum(i0 + 1, in_size - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    return i0, i1, l1


@triton.jit
def _focal_terms(x, t, alpha, GAMMA: tl.constexpr):
    """Pieces of FL(x, t) written with z = +x for positives, -x for negatives.

    Returns p_t = sigmoid(z), q = 1 - p_t = sigmoid(-z), ce = BCEWithLogits(x, t)
    = softplus(-z), alpha_t and q ** GAMMA, all computed without overflow.
    """
    z = tl.where(t, x, -x)
    e = tl.exp(-tl.abs(z))
    inv = 1.0 / (1.0 + e)
    p_t = tl.where(z >= 0, inv, e * inv)
    q = tl.where(z >= 0, e * inv, inv)
    log1p_e = tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))
    ce = tl.maximum(-z, 0.0) + log1p_e
    a_t = tl.where(t, alpha, 1.0 - alpha)
    if GAMMA == 2.0:
        q_g = q * q
    elif GAMMA == 0.0:
        q_g = q * 0.0 + 1.0
    else:
        q_g = tl.where(q > 0.0, tl.exp2(GAMMA * tl.log2(q)), 0.0)
    return p_t, q, ce, a_t, q_g


@triton.jit
def _seg_stats_fwd_kernel(
    x_ptr,  # logits (B, K, h, w), strides (s_xb, s_xk, s_xh, s_xw)
    lab_ptr,  # labels (B, H, W) int16/int32 contiguous: class id, K = no class, -1 = ignore
    part_ptr,  # partial sums (B, K, 4, n_tiles) fp32 contiguous
    K, h, w, H, W, n_tiles,
    s_xb, s_xk, s_xh, s_xw,
    scale_h, scale_w,  # h / H, w / W
    alpha,
    GAMMA: tl.constexpr,
    IGNORE_AS_NEGATIVE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Program (pid_p, pid_k, b): output pixels [pid_p*BLOCK_P, +BLOCK_P) of image b (row-major
    # over (H, W)) x classes [pid_k*BLOCK_K, +BLOCK_K).
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < H * W
    oy = offs_p // W
    ox = offs_p % W
    y0, y1, ly = _source_index(oy, scale_h, h)
    x0, x1, lx = _source_index(ox, scale_w, w)
    hy = 1.0 - ly
    hx = 1.0 - lx
    lab = tl.load(lab_ptr + b * H * W + offs_p, mask=p_ok, other=-1)

    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    m2 = k_ok[:, None] & p_ok[None, :]
    base = x_ptr + b * s_xb + ks[:, None].to(tl.int64) * s_xk  # (BLOCK_K, 1)
    r0 = y0 * s_xh
    r1 = y1 * s_xh
    c0 = x0 * s_xw
    c1 = x1 * s_xw
    v00 = tl.load(base + (r0 + c0)[None, :], mask=m2, other=0.0).to(tl.float32)
    v01 = tl.load(base + (r0 + c1)[None, :], mask=m2, other=0.0).to(tl.float32)
    v10 = tl.load(base + (r1 + c0)[None, :], mask=m2, other=0.0).to(tl.float32)
    v11 = tl.load(base + (r1 + c1)[None, :], mask=m2, other=0.0).to(tl.float32)
    x = hy[None, :] * (hx[None, :] * v00 + lx[None, :] * v01) + ly[None, :] * (
        hx[None, :] * v10 + lx[None, :] * v11
    )

    t = lab[None, :] == ks[:, None]  # ignore (-1) and "no class" (K) match no k
    if IGNORE_AS_NEGATIVE:
        in_p = m2
    else:
        in_p = m2 & (lab >= 0)[None, :]
    p_t, q, ce, a_t, q_g = _focal_terms(x, t, alpha, GAMMA)
    prob = tl.where(t, p_t, q)  # sigmoid(x)
    fl = a_t * ce * q_g
    sum_fl = tl.sum(tl.where(in_p, fl, 0.0), axis=1)
    sum_pt = tl.sum(tl.where(in_p & t, prob, 0.0), axis=1)
    sum_p = tl.sum(tl.where(in_p, prob, 0.0), axis=1)
    sum_t = tl.sum(tl.where(m2 & t, 1.0, 0.0), axis=1)
    out = part_ptr + (b * K + ks) * 4 * n_tiles + pid_p
    tl.store(out, sum_fl, mask=k_ok)
    tl.store(out + n_tiles, sum_pt, mask=k_ok)
    tl.store(out + 2 * n_tiles, sum_p, mask=k_ok)
    tl.store(out + 3 * n_tiles, sum_t, mask=k_ok)


@triton.jit
def _seg_stats_bwd_kernel(
    x_ptr,  # logits (B, K, h, w), strides (s_xb, s_xk, s_xh, s_xw)
    lab_ptr,  # labels (B, H, W) contiguous, as in the forward
    gs_ptr,  # dL/dstats (B, K, 4) fp32 contiguous; column 3 (sum t) is unused
    gx_ptr,  # dL/dlogits (B, K, h, w), strides (s_gb, s_gk, s_gh, s_gw)
    ybnd_ptr,  # (n_ti, 2) int32: output rows [lo, hi) whose taps touch source-row tile ti
    xbnd_ptr,  # (n_tj, 2) int32: the same for columns
    K, h, w, H, W, n_tj,
    s_xb, s_xk, s_xh, s_xw,
    s_gb, s_gk, s_gh, s_gw,
    scale_h, scale_w,
    alpha,
    GAMMA: tl.constexpr,
    IGNORE_AS_NEGATIVE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TILE_I: tl.constexpr,
    TILE_J: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    # Program (tile, k, b) owns grad[b, k, ti*TILE_I:+TILE_I, tj*TILE_J:+TILE_J].
    pid_t = tl.program_id(0)
    k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ti = pid_t // n_tj
    tj = pid_t % n_tj
    y_lo = tl.load(ybnd_ptr + 2 * ti)
    y_hi = tl.load(ybnd_ptr + 2 * ti + 1)
    x_lo = tl.load(xbnd_ptr + 2 * tj)
    x_hi = tl.load(xbnd_ptr + 2 * tj + 1)
    g_ptr = gs_ptr + (b * K + k) * 4
    g_f = tl.load(g_ptr)
    g_pt = tl.load(g_ptr + 1)
    g_p = tl.load(g_ptr + 2)
    ii = ti * TILE_I + tl.arange(0, TILE_I)
    jj = tj * TILE_J + tl.arange(0, TILE_J)
    x_base = x_ptr + b * s_xb + k * s_xk
    lab_base = lab_ptr + b * H * W

    acc = tl.zeros((TILE_I, TILE_J), dtype=tl.float32)
    for y_s in range(y_lo, y_hi, BLOCK_Y):
        oy = y_s + tl.arange(0, BLOCK_Y)
        y_ok = oy < y_hi
        y0, y1, ly = _source_index(oy, scale_h, h)
        hy = 1.0 - ly
        # A_h[oy, ii] (BLOCK_Y, TILE_I): hy where ii == y0, plus ly where ii == y1.
        a_h = tl.where(y0[:, None] == ii[None, :], hy[:, None], 0.0) + tl.where(
            y1[:, None] == ii[None, :], ly[:, None], 0.0
        )
        a_h = tl.where(y_ok[:, None], a_h, 0.0)
        r0 = (y0 * s_xh)[:, None]
        r1 = (y1 * s_xh)[:, None]
        for x_s in range(x_lo, x_hi, BLOCK_X):
            ox = x_s + tl.arange(0, BLOCK_X)
            x_ok = ox < x_hi
            x0, x1, lx = _source_index(ox, scale_w, w)
            hx = 1.0 - lx
            a_w = tl.where(x0[:, None] == jj[None, :], hx[:, None], 0.0) + tl.where(
                x1[:, None] == jj[None, :], lx[:, None], 0.0
            )  # A_w[ox, jj] (BLOCK_X, TILE_J)
            m2 = y_ok[:, None] & x_ok[None, :]
            c0 = (x0 * s_xw)[None, :]
            c1 = (x1 * s_xw)[None, :]
            v00 = tl.load(x_base + r0 + c0, mask=m2, other=0.0).to(tl.float32)
            v01 = tl.load(x_base + r0 + c1, mask=m2, other=0.0).to(tl.float32)
            v10 = tl.load(x_base + r1 + c0, mask=m2, other=0.0).to(tl.float32)
            v11 = tl.load(x_base + r1 + c1, mask=m2, other=0.0).to(tl.float32)
            x = hy[:, None] * (hx[None, :] * v00 + lx[None, :] * v01) + ly[:, None] * (
                hx[None, :] * v10 + lx[None, :] * v11
            )
            lab = tl.load(lab_base + oy[:, None] * W + ox[None, :], mask=m2, other=-1)
            t = lab == k
            if IGNORE_AS_NEGATIVE:
                in_p = m2
            else:
                in_p = m2 & (lab >= 0)
            p_t, q, ce, a_t, q_g = _focal_terms(x, t, alpha, GAMMA)
            # dFL/dz = -alpha_t q^gamma (q + gamma ce p_t), dz/dx = +-1; dsigmoid/dx = p_t q.
            dfl_dz = -a_t * q_g * (q + GAMMA * ce * p_t)
            dfl = tl.where(t, dfl_dz, -dfl_dz)
            g = g_f * dfl + (tl.where(t, g_pt, 0.0) + g_p) * (p_t * q)
            g = tl.where(in_p, g, 0.0)
            g_w = tl.dot(g, a_w, input_precision=INPUT_PRECISION)  # (BLOCK_Y, TILE_J)
            acc = tl.dot(tl.trans(a_h), g_w, acc, input_precision=INPUT_PRECISION)

    out = gx_ptr + b * s_gb + k * s_gk + ii[:, None] * s_gh + jj[None, :] * s_gw
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=(ii < h)[:, None] & (jj < w)[None, :])


# ----------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------


def _labels(target: torch.Tensor, ignore_index: int, num_classes: int) -> torch.Tensor:
    """Compact contiguous labels for the kernels: class id in [0, K), K for a counted pixel
    of no class in [0, K), -1 for ignore. int16 (int32 when K does not fit)."""
    dtype = torch.int16 if num_classes < 2**15 - 1 else torch.int32
    target = target.long()  # no wrap-around of K or of the ignore index in small int types
    in_range = (target >= 0) & (target < num_classes)
    lab = torch.where(in_range, target, num_classes)
    lab = torch.where(target == ignore_index, -1, lab)
    return lab.to(dtype).contiguous()


def _tile_bounds(out_size: int, in_size: int, tile: int, device: torch.device) -> torch.Tensor:
    """(n_tiles, 2) int32: for each tile of ``tile`` source indices, the half-open range of
    output indices whose two bilinear taps touch it, widened by one each side (the kernel
    recomputes exact weights, so extra indices only cost a little work)."""
    scale = in_size / out_size
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    src = (scale * (dst + 0.5) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    starts = torch.arange(0, in_size, tile, device=device)
    lo = torch.searchsorted(i1, starts)  # first output index with i1 >= start
    hi = torch.searchsorted(i0, starts + tile)  # first output index with i0 >= start + tile
    lo = (lo - 1).clamp(min=0)
    hi = (hi + 1).clamp(max=out_size)
    return torch.stack([lo, hi], dim=1).to(torch.int32).contiguous()


def _seg_stats_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    gamma: float,
    ignore_as_negative: bool,
) -> torch.Tensor:
    B, K, h, w = logits.shape
    H, W = labels.shape[-2:]
    block_k = min(triton.next_power_of_2(K), 8)
    block_p = 4096 // block_k
    if interpreting():
        block_p = min(block_p, triton.next_power_of_2(H * W))
    n_tiles = triton.cdiv(H * W, block_p)
    part = new_output((B, K, 4, n_tiles), torch.float32, logits.device)
    grid = (n_tiles, triton.cdiv(K, block_k), B)
    _seg_stats_fwd_kernel[grid](
        logits, labels, part,
        K, h, w, H, W, n_tiles,
        *logits.stride(),
        h / H, w / W,
        float(alpha),
        GAMMA=float(gamma), IGNORE_AS_NEGATIVE=bool(ignore_as_negative),
        BLOCK_K=block_k, BLOCK_P=block_p, num_warps=8,
    )
    return part.sum(dim=-1)


def _bwd_blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_Y, BLOCK_X, num_warps) of the backward kernel. fp32 logits get half-width
    column chunks: at 64 the fp32 tile spilled 8 bytes on sm_90 under Triton 3.6."""
    if interpreting():
        return 64, 64, 4
    return (32, 32, 8) if dtype == torch.float32 else (32, 64, 8)


def _seg_stats_backward(
    grad_stats: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    gamma: float,
    ignore_as_negative: bool,
) -> torch.Tensor:
    B, K, h, w = logits.shape
    H, W = labels.shape[-2:]
    tile_i = min(max(triton.next_power_of_2(h), 16), 32)
    tile_j = min(max(triton.next_power_of_2(w), 16), 32)
    block_y, block_x, num_warps = _bwd_blocks(logits.dtype)
    ybnd = _tile_bounds(H, h, tile_i, logits.device)
    xbnd = _tile_bounds(W, w, tile_j, logits.device)
    n_ti, n_tj = ybnd.shape[0], xbnd.shape[0]
    gx = new_output((B, K, h, w), logits.dtype, logits.device)
    gs = grad_stats.to(torch.float32).contiguous()
    grid = (n_ti * n_tj, K, B)
    _seg_stats_bwd_kernel[grid](
        logits, labels, gs, gx, ybnd, xbnd,
        K, h, w, H, W, n_tj,
        *logits.stride(),
        *gx.stride(),
        h / H, w / W,
        float(alpha),
        GAMMA=float(gamma), IGNORE_AS_NEGATIVE=bool(ignore_as_negative),
        INPUT_PRECISION="ieee",
        TILE_I=tile_i, TILE_J=tile_j, BLOCK_Y=block_y, BLOCK_X=block_x,
        num_warps=num_warps,
    )
    return gx


class SegStatsFunction(torch.autograd.Function):
    """logits (B, K, h, w) -> per-(b, k) sums of the upsampled loss terms (B, K, 4) fp32:
    (sum_P FL, sum_P p*t, sum_P p, sum t). Differentiable in logits (the last column does
    not depend on them)."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        alpha: float,
        gamma: float,
        ignore_as_negative: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(logits, labels)
        ctx.params = (alpha, gamma, ignore_as_negative)
        return _seg_stats_forward(logits, labels, alpha, gamma, ignore_as_negative)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_stats: torch.Tensor):
        logits, labels = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _seg_stats_backward(grad_stats, logits, labels, *ctx.params)
        return gx, None, None, None, None


def _loss_from_stats(
    stats: torch.Tensor,
    n_p: torch.Tensor,
    num_masks: float | torch.Tensor | None,
    focal_weight: float,
    dice_weight: float,
) -> torch.Tensor:
    """The O(B*K) epilogue: stats (B, K, 4), pixels counted per image n_p (B,) -> loss."""
    sum_fl, sum_pt, sum_p, sum_t = stats.unbind(dim=-1)
    present = sum_t > 0
    m = _num_masks(num_masks, present)
    focal = (sum_fl / n_p[:, None]).sum() / m
    dice_bk = 1 - (2 * sum_pt + 1) / (sum_p + sum_t + 1)
    dice = torch.where(present, dice_bk, torch.zeros_like(dice_bk)).sum() / m
    return focal_weight * focal + dice_weight * dice


def _sigmoid_focal_dice_loss_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    alpha: float,
    gamma: float,
    focal_weight: float,
    dice_weight: float,
    ignore_as_negative: bool,
    num_masks: float | torch.Tensor | None,
) -> torch.Tensor:
    B, K = logits.shape[:2]
    H, W = target.shape[-2:]
    labels = _labels(target, ignore_index, K)
    stats = SegStatsFunction.apply(logits, labels, alpha, gamma, ignore_as_negative)
    if ignore_as_negative:
        n_p = torch.full((B,), float(H * W), device=logits.device)
    else:
        n_p = (labels >= 0).sum(dim=(1, 2)).to(torch.float32).clamp(min=1.0)
    return _loss_from_stats(stats, n_p, num_masks, focal_weight, dice_weight)


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------


def sigmoid_focal_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    alpha: float = 0.25,
    gamma: float = 2.0,
    focal_weight: float = 100.0,
    dice_weight: float = 1.0,
    ignore_as_negative: bool = True,
    num_masks: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Upsample ``(B,K,h,w)`` logits to the ``(B,H,W)`` target and return the focal+dice
    loss (scalar, fp32; see the module docstring).

    CUDA tensors run the fused Triton kernels, which never build the ``(B,K,H,W)`` logits
    (forward or backward); CPU tensors run :func:`sigmoid_focal_dice_loss_reference`.
    ``num_masks``, when given, replaces ``M`` (clamped to at least 1). Differentiable in
    ``logits``.
    """
    _check_loss(logits, target)
    args = (ignore_index, alpha, gamma, focal_weight, dice_weight, ignore_as_negative, num_masks)
    if use_triton(logits, target):
        return _sigmoid_focal_dice_loss_triton(logits, target, *args)
    return sigmoid_focal_dice_loss_reference(logits, target, *args)
