"""Pixel-text similarity summed over the cascade's stages.

``out[b, k, n] = scale * sum_s sum_d queries[s, b, k, d] * pixels[s, b, n, d]``: with
``scale = 1 / (H sqrt(d_h))`` this is every stage's head-averaged attention logit map,
summed (docs/design.md: The model). Accumulated and returned in fp32.

One Triton kernel, a strided batched matmul that also sums over a "stage" axis, serves
the forward and both gradients (as in the Triton matmul tutorial, plus two batch axes and
the stage loop)::

    C[z0, z1, m, n] = scale * sum_{s < S} sum_{r < R} A[z0, z1, s, m, r] * B[z0, z1, s, r, n]

- forward:    z0 = b, S = stages, A = queries (M = K, R = D), B = pixels^T (N = pixels);
- grad_q:     z0 = s, z1 = b, S = 1, A = grad_out[b] (M = K, R = N), B = pixels[s, b];
- grad_p:     z0 = s, z1 = b, S = 1, A = grad_out[b]^T (M = N, R = K), B = queries[s, b].

A zero stride broadcasts an operand over a batch axis (grad_out has no stage axis).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .dispatch import interpreting, new_output, use_triton

# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------


def _check_similarity(pixels: torch.Tensor, queries: torch.Tensor) -> None:
    if pixels.dim() != 4 or queries.dim() != 4:
        raise ValueError(
            "pixels must be (S, B, N, D) and queries (S, B, K, D), got "
            f"{tuple(pixels.shape)} and {tuple(queries.shape)}"
        )
    s, b, _, d = pixels.shape
    if (queries.shape[0], queries.shape[1], queries.shape[3]) != (s, b, d):
        raise ValueError(
            f"pixels {tuple(pixels.shape)} and queries {tuple(queries.shape)} disagree on S, B, D"
        )


def pixel_text_logits_reference(
    pixels: torch.Tensor, queries: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain PyTorch pixel-text logits: the CPU path and the test oracle.

    Args:
        pixels: ``(S, B, N, D)``.
        queries: ``(S, B, K, D)``.
        scale: multiplies the result.

    Returns:
        ``(B, K, N)`` fp32.
    """
    _check_similarity(pixels, queries)
    out = torch.einsum("sbkd,sbnd->bkn", queries.float(), pixels.float())
    return out * scale


# ----------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------


@triton.jit
def _stage_bmm_kernel(
    a_ptr,  # A[z0, z1, s, m, r], strides (s_az0, s_az1, s_as, s_am, s_ar)
    b_ptr,  # B[z0, z1, s, r, n], strides (s_bz0, s_bz1, s_bs, s_br, s_bn)
    c_ptr,  # C[z0, z1, m, n],    strides (s_cz0, s_cz1, s_cm, s_cn)
    M, N, R, S, Z1,
    s_az0, s_az1, s_as, s_am, s_ar,
    s_bz0, s_bz1, s_bs, s_br, s_bn,
    s_cz0, s_cz1, s_cm, s_cn,
    scale,
    DOT_FP32: tl.constexpr,  # cast both tiles to fp32 before tl.dot (an fp32 operand)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 dots
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Program (pid_m, pid_n, z) owns C[z0, z1, pid_m*BLOCK_M:+BLOCK_M, pid_n*BLOCK_N:+BLOCK_N]
    # with z = z0 * Z1 + z1, and accumulates its fp32 tile over s and r.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    z0 = (pid_z // Z1).to(tl.int64)
    z1 = (pid_z % Z1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    a_ptrs = a_ptr + z0 * s_az0 + z1 * s_az1 + offs_m[:, None] * s_am + offs_r[None, :] * s_ar
    b_ptrs = b_ptr + z0 * s_bz0 + z1 * s_bz1 + offs_r[:, None] * s_br + offs_n[None, :] * s_bn
    m_mask = offs_m[:, None] < M
    n_mask = offs_n[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(S):
        for r0 in range(0, R, BLOCK_R):
            r_ok = (r0 + offs_r) < R
            a = tl.load(a_ptrs + r0 * s_ar, mask=m_mask & r_ok[None, :], other=0.0)
            b = tl.load(b_ptrs + r0 * s_br, mask=r_ok[:, None] & n_mask, other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += s_as
        b_ptrs += s_bs
    acc = acc * scale
    c_ptrs = c_ptr + z0 * s_cz0 + z1 * s_cz1 + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask & n_mask)


# ----------------------------------------------------------------------------------------
# Launch wrapper
# ----------------------------------------------------------------------------------------


def _dot_config(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """(DOT_FP32, INPUT_PRECISION) for operands ``a`` and ``b``.

    - both fp16 or both bf16: a native tensor-core dot with fp32 accumulation;
    - both fp32: exact fp32 ("ieee") when torch's fp32 matmul precision is "highest"
      (its default), TF32 otherwise, like torch.matmul;
    - mixed (the gradients: an fp32 output gradient against fp16/bf16 activations): both
      in fp32 with TF32 inputs. The low-precision operand is exact in TF32, so only the
      gradient is rounded, to 10 mantissa bits, with fp32's range (casting it to fp16
      instead could underflow small gradients).
    """
    low = (torch.float16, torch.bfloat16)
    if a.dtype == b.dtype and a.dtype in low:
        return False, "ieee"  # precision flag unused for 16-bit operands
    if interpreting():
        return True, "ieee"
    if a.dtype == b.dtype == torch.float32:
        exact = torch.get_float32_matmul_precision() == "highest"
        return True, "ieee" if exact else "tf32"
    return True, "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _stage_bmm(
    a: tuple[torch.Tensor, tuple[int, int, int, int, int]],
    b: tuple[torch.Tensor, tuple[int, int, int, int, int]],
    out: torch.Tensor,
    out_strides: tuple[int, int, int, int],
    sizes: tuple[int, int, int, int, int, int],
    scale: float,
) -> torch.Tensor:
    """Launch :func:`_stage_bmm_kernel`; ``sizes = (Z0, Z1, S, M, N, R)``."""
    (a_t, a_s), (b_t, b_s) = a, b
    z0, z1, s, m, n, r = sizes
    dot_fp32, precision = _dot_config(a_t, b_t)
    if interpreting():  # fewer, bigger programs run faster in the interpreter
        block_m = min(128, max(16, triton.next_power_of_2(m)))
        block_n = min(128, max(16, triton.next_power_of_2(n)))
        block_r, num_warps = min(64, max(16, triton.next_power_of_2(r))), 4
    else:
        # Fixed heuristics, no autotuning: 128x128 tiles (64x64 for fp32 operands), halved
        # while the grid would not fill the GPU twice (the paper's forward has only
        # B * ceil(156/128) * ceil(1024/128) = 64 tiles of 128x128).
        # 8 warps: compiled for sm_90, a 64x64x32 fp32 tile with 4 warps spills registers.
        block_m = block_n = 64 if dot_fp32 else 128
        block_r, num_warps = 32, 8
        while (
            block_m > 32
            and triton.cdiv(m, block_m) * triton.cdiv(n, block_n) * z0 * z1
            < 2 * _num_sms(out.device)
        ):
            block_m, block_n, num_warps = block_m // 2, block_n // 2, max(4, num_warps // 2)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), z0 * z1)
    _stage_bmm_kernel[grid](
        a_t, b_t, out,
        m, n, r, s, z1,
        *a_s, *b_s, *out_strides,
        float(scale),
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=num_warps,
    )
    return out


def _similarity_forward(pixels: torch.Tensor, queries: torch.Tensor, scale: float) -> torch.Tensor:
    S, B, N, D = pixels.shape
    K = queries.shape[2]
    out = new_output((B, K, N), torch.float32, pixels.device)
    q, p = queries.stride(), pixels.stride()
    # A = queries[b, s] (K x D); B = pixels[b, s]^T (D x N); C = out[b] (K x N).
    return _stage_bmm(
        (queries, (q[1], 0, q[0], q[2], q[3])),
        (pixels, (p[1], 0, p[0], p[3], p[2])),
        out, (out.stride(0), 0, out.stride(1), out.stride(2)),
        (B, 1, S, K, N, D), scale,
    )


def _similarity_grad_queries(
    grad: torch.Tensor, pixels: torch.Tensor, queries: torch.Tensor, scale: float
) -> torch.Tensor:
    S, B, N, D = pixels.shape
    K = queries.shape[2]
    gq = new_output((S, B, K, D), queries.dtype, queries.device)
    g, p = grad.stride(), pixels.stride()
    # A = grad[b] (K x N), shared by every s; B = pixels[s, b] (N x D); C = gq[s, b].
    return _stage_bmm(
        (grad, (0, g[0], 0, g[1], g[2])),
        (pixels, (p[0], p[1], 0, p[2], p[3])),
        gq, gq.stride(),
        (S, B, 1, K, D, N), scale,
    )


def _similarity_grad_pixels(
    grad: torch.Tensor, pixels: torch.Tensor, queries: torch.Tensor, scale: float
) -> torch.Tensor:
    S, B, N, D = pixels.shape
    K = queries.shape[2]
    gp = new_output((S, B, N, D), pixels.dtype, pixels.device)
    g, q = grad.stride(), queries.stride()
    # A = grad[b]^T (N x K); B = queries[s, b] (K x D); C = gp[s, b].
    return _stage_bmm(
        (grad, (0, g[0], 0, g[2], g[1])),
        (queries, (q[0], q[1], 0, q[2], q[3])),
        gp, gp.stride(),
        (S, B, 1, N, D, K), scale,
    )


class PixelTextLogitsFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton pixel-text kernel."""

    @staticmethod
    def forward(ctx, pixels: torch.Tensor, queries: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(pixels, queries)
        ctx.scale = scale
        return _similarity_forward(pixels, queries, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        pixels, queries = ctx.saved_tensors
        gp = gq = None
        if ctx.needs_input_grad[0]:
            gp = _similarity_grad_pixels(grad, pixels, queries, ctx.scale)
        if ctx.needs_input_grad[1]:
            gq = _similarity_grad_queries(grad, pixels, queries, ctx.scale)
        return gp, gq, None


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------


def pixel_text_logits_gemm(pixels: torch.Tensor, queries: torch.Tensor, scale: float) -> torch.Tensor:
    """The same sum as one batched GEMM (cuBLAS on a GPU) over the stages concatenated
    along D, in the inputs' dtype, returned as fp32. It copies both operands into the
    (B, rows, S*D) layout, which the Triton kernel never does: faster at some shapes, at
    the price of that memory."""
    s, b, n, d = pixels.shape
    p = pixels.permute(1, 2, 0, 3).reshape(b, n, s * d)
    q = queries.permute(1, 2, 0, 3).reshape(b, queries.shape[2], s * d)
    return torch.bmm(q, p.transpose(1, 2)).float() * scale


# ``CASCADE_CLIP_SIMILARITY``: "triton", "gemm", or "auto" (default): on the GPU, time both
# (forward + backward) once per shape and dtype and keep the faster.
SIMILARITY_VAR = "CASCADE_CLIP_SIMILARITY"
_FASTEST: dict[tuple, str] = {}


def _time_ms(name: str, fn, pixels: torch.Tensor, queries: torch.Tensor, reps: int = 5) -> float:
    """Median GPU time of forward + backward of `fn`, in ms (CUDA events)."""
    p = pixels.detach().requires_grad_(pixels.requires_grad)
    q = queries.detach().requires_grad_(queries.requires_grad)
    times = []
    for _ in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(p, q)
        if out.requires_grad:
            out.sum().backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[1:])[reps // 2]  # the first call warms up (compiles the kernel)


def similarity_path(pixels: torch.Tensor, queries: torch.Tensor, timer=None) -> str:
    """"triton" or "gemm" for these operands (CUDA, or Triton forced): the variable's
    choice, else the faster one measured on the first call of this shape; while a graph is
    being captured or compiled, or off the GPU, nothing is measured (the choice made
    already, else the Triton kernel, is used). `timer(name, fn, pixels, queries) -> ms`
    replaces the CUDA-event timing (tests)."""
    import os

    choice = os.environ.get(SIMILARITY_VAR, "auto").strip().lower() or "auto"
    if choice not in ("auto", "triton", "gemm"):
        raise ValueError(f"{SIMILARITY_VAR}={choice!r}: expected auto, triton or gemm")
    if choice != "auto":
        return choice
    key = (tuple(pixels.shape), tuple(queries.shape), pixels.dtype, pixels.device.type,
           pixels.requires_grad or queries.requires_grad)
    if key not in _FASTEST:
        if timer is None:
            capturing = pixels.is_cuda and torch.cuda.is_current_stream_capturing()
            if capturing or torch.compiler.is_compiling() or not pixels.is_cuda:
                return "triton"
            timer = _time_ms
        triton_ms = timer("triton", lambda p, q: PixelTextLogitsFunction.apply(p, q, 1.0), pixels, queries)
        gemm_ms = timer("gemm", lambda p, q: pixel_text_logits_gemm(p, q, 1.0), pixels, queries)
        _FASTEST[key] = "gemm" if gemm_ms < triton_ms else "triton"
    return _FASTEST[key]


def pixel_text_logits(pixels: torch.Tensor, queries: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * sum_s queries[s] @ pixels[s]^T``: ``(S,B,N,D), (S,B,K,D) -> (B,K,N)`` fp32.

    CUDA tensors run the Triton kernel or one cuBLAS GEMM, whichever is faster at their
    shape (:func:`similarity_path`); CPU tensors :func:`pixel_text_logits_reference`.
    Differentiable in ``pixels`` and ``queries``.
    """
    _check_similarity(pixels, queries)
    if use_triton(pixels, queries):
        if similarity_path(pixels, queries) == "gemm":
            return pixel_text_logits_gemm(pixels, queries, scale)
        return PixelTextLogitsFunction.apply(pixels, queries, float(scale))
    return pixel_text_logits_reference(pixels, queries, scale)
