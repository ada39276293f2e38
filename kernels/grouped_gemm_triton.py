"""Triton grouped GEMM: forward, dX (the forward kernel over transposed weights) and dW.

Legend: N rows (routed tokens, grouped contiguously by expert), K reduction width (D in the
forward, F for dX), D input width, F output width, E experts, BM/BN/BK block sizes.

    forward:  y_NF[rows of e]  = x_ND[rows of e] @ w_EDF[e]
    dX:       dx_ND[rows of e] = dy_NF[rows of e] @ w_EDF[e]^T     (same kernel, w viewed [E, F, D])
    dW:       dw_EDF[e]        = x_ND[rows of e]^T @ dy_NF[rows of e]   (zero for an empty expert)

No host sync on counts (the ScatterMoE/MegaBlocks problem of knowing which expert a tile
belongs to): the grid is an upper bound, cdiv(N, BM) + E row tiles, because each expert wastes
at most one partial tile. Every program loads counts_E (E is small), takes a cumulative sum of
tiles per expert in registers and finds its expert by counting how many experts end at or
before its tile. Programs past the last tile exit at once. All accumulation is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_triton as L
from .backend import interpreting


_configs = L.tile_configs


if interpreting():
    # the interpreter runs every config it autotunes over: keep one small config (tl.dot needs >=16)
    _MM_CONFIGS = _DW_CONFIGS = _configs([(32, 32, 32, 4, 1)])
else:
    # bf16 on Hopper/Ampere: 128x128 tiles with 3-4 stages are the usual winners; the smaller
    # tiles help E=64-style shapes where each expert has only a few hundred rows.
    _MM_CONFIGS = _configs([
        (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
        (128, 128, 32, 4, 4), (64, 256, 32, 4, 4), (128, 64, 64, 4, 4),
    ])
    # dW tiles are over (D, F) with the reduction over an expert's rows
    _DW_CONFIGS = _configs([
        (128, 128, 64, 4, 4), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    ])


@triton.jit
def mm_tile(x_ptr, w_ptr, e, rows, row_ok, cols, col_ok, K, stride_xm, stride_xk, stride_we, stride_wk, stride_wf,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 = x[rows, :K] @ w[e, :K, cols] with masked pointer loads (rows and
    columns outside row_ok / col_ok, and K past its end, read as 0)."""
    ks = tl.arange(0, BLOCK_K)
    # int64 row/expert offsets: N*D and E*D*F can pass 2^31 elements at real sizes
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wf
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.autotune(configs=_MM_CONFIGS, key=["K", "F"])
@triton.jit
def _grouped_mm_kernel(
    # pointers
    x_ptr, w_ptr, y_ptr, counts_ptr,
    # sizes and strides
    N, K, F, E,
    stride_xn, stride_xk, stride_we, stride_wk, stride_wf, stride_yn, stride_yf,
    # meta-parameters
    BLOCK_E: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # 1-D grid, grouped ordering: GROUP_M row tiles share each column tile of w, so w[e] and
    # x tiles stay in L2 while neighbouring programs use them (Triton matmul tutorial).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(N, BLOCK_M) + E
    num_pid_n = tl.cdiv(F, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_m
    pid_n = (pid % pids_in_group) // group_m

    # which expert owns row tile pid_m (device-side, no host sync)
    offs_e = tl.arange(0, BLOCK_E)
    cnt_E = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    tiles_E = (cnt_E + BLOCK_M - 1) // BLOCK_M
    tile_end_E = tl.cumsum(tiles_E, 0)
    row_end_E = tl.cumsum(cnt_E, 0)
    e = tl.sum((tile_end_E <= pid_m).to(tl.int32), 0)
    if e >= E:
        return
    is_e = offs_e == e
    tile_in_e = pid_m - tl.sum(tl.where(is_e, tile_end_E - tiles_E, 0), 0)
    row0 = tl.sum(tl.where(is_e, row_end_E - cnt_E, 0), 0) + tile_in_e * BLOCK_M
    # min with N: counts that over-run N must not write past y (the launcher checks the sum)
    row_stop = tl.minimum(tl.sum(tl.where(is_e, row_end_E, 0), 0), N)

    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_stop
    col_ok = cols < F
    acc = mm_tile(x_ptr, w_ptr, e, rows, row_ok, cols, col_ok, K, stride_xn, stride_xk, stride_we, stride_wk,
                  stride_wf, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yn + cols[None, :] * stride_yf
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_DW_CONFIGS, key=["D", "F"])
@triton.jit
def _grouped_mm_dw_kernel(
    # pointers
    x_ptr, dy_ptr, dw_ptr, counts_ptr,
    # sizes and strides
    N, D, F, E,
    stride_xn, stride_xd, stride_dyn, stride_dyf, stride_we, stride_wd, stride_wf,
    # meta-parameters
    BLOCK_E: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (D tiles x F tiles, E); BLOCK_M tiles D, BLOCK_N tiles F, BLOCK_K steps over rows
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_pid_f = tl.cdiv(F, BLOCK_N)
    pid_d = pid // num_pid_f
    pid_f = pid % num_pid_f

    offs_e = tl.arange(0, BLOCK_E)
    cnt_E = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    row_end_E = tl.cumsum(cnt_E, 0)
    is_e = offs_e == e
    row_start = tl.sum(tl.where(is_e, row_end_E - cnt_E, 0), 0)
    row_stop = tl.minimum(tl.sum(tl.where(is_e, row_end_E, 0), 0), N)

    ds = pid_d * BLOCK_M + tl.arange(0, BLOCK_M)
    fs = pid_f * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_K)
    d_ok = ds < D
    f_ok = fs < F
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # an empty expert runs no iteration and stores zeros: dW[e] = 0 is the true gradient
    for r0 in range(row_start, row_stop, BLOCK_K):
        rows = r0 + rs
        r_ok = rows < row_stop
        rows64 = rows.to(tl.int64)
        a = tl.load(x_ptr + rows64[None, :] * stride_xn + ds[:, None] * stride_xd,
                    mask=d_ok[:, None] & r_ok[None, :], other=0.0)  # x^T tile [BM(d), BK(rows)]
        b = tl.load(dy_ptr + rows64[:, None] * stride_dyn + fs[None, :] * stride_dyf,
                    mask=r_ok[:, None] & f_ok[None, :], other=0.0)  # dy tile [BK(rows), BN(f)]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_we + ds[:, None] * stride_wd + fs[None, :] * stride_wf
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=d_ok[:, None] & f_ok[None, :])


def _block_e(E: int) -> int:
    return triton.next_power_of_2(max(E, 2))


def _check_counts(op: str, counts_E: torch.Tensor, E: int) -> None:
    L.check_dtype(op, "counts", counts_E, L.INDEX_DTYPES)
    if counts_E.dim() != 1 or counts_E.shape[0] != E:
        raise ValueError(f"{op}: counts must be 1-D with one entry per expert ({E}), got shape {tuple(counts_E.shape)}")
    L.check_contiguous(op, "counts", counts_E)


def launch_grouped_mm(x_NK: torch.Tensor, w_EKF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y_NF = x_NK[rows of e] @ w_EKF[e]. Any strides for x and w (dX passes a transposed view
    of w without copying); counts must be contiguous. Returns a new contiguous y_NF."""
    op = "grouped_mm"
    L.check_dim(op, "x", x_NK, 2, "[N, K]")
    L.check_dim(op, "w", w_EKF, 3, "[E, K, F]")
    L.check_dtype(op, "x", x_NK, L.FLOAT_DTYPES)
    if w_EKF.dtype != x_NK.dtype:
        raise TypeError(f"{op}: x dtype {x_NK.dtype} != w dtype {w_EKF.dtype}")
    if x_NK.shape[1] != w_EKF.shape[1]:
        raise ValueError(f"{op}: x has width K={x_NK.shape[1]} but w expects K={w_EKF.shape[1]}")
    _check_counts(op, counts_E, w_EKF.shape[0])
    L.check_same_device(op, x=x_NK, w=w_EKF, counts=counts_E)
    (N, K), (E, _, F) = x_NK.shape, w_EKF.shape
    y_NF = x_NK.new_empty(N, F)
    if N == 0 or F == 0:
        return y_NF
    grid = lambda META: ((triton.cdiv(N, META["BLOCK_M"]) + E) * triton.cdiv(F, META["BLOCK_N"]),)  # noqa: E731
    _grouped_mm_kernel[grid](
        x_NK, w_EKF, y_NF, counts_E,
        N, K, F, E,
        x_NK.stride(0), x_NK.stride(1), w_EKF.stride(0), w_EKF.stride(1), w_EKF.stride(2),
        y_NF.stride(0), y_NF.stride(1),
        BLOCK_E=_block_e(E), UPCAST=L.upcast_operands(), PRECISION=L.dot_precision(x_NK.dtype), GROUP_M=8,
    )
    return y_NF


def launch_grouped_mm_dw(x_ND: torch.Tensor, dy_NF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """dw_EDF[e] = x_ND[rows of e]^T @ dy_NF[rows of e], in x's dtype (fp32 accumulation)."""
    op = "grouped_mm_dw"
    L.check_dim(op, "x", x_ND, 2, "[N, D]")
    L.check_dim(op, "dy", dy_NF, 2, "[N, F]")
    L.check_dtype(op, "x", x_ND, L.FLOAT_DTYPES)
    if dy_NF.dtype != x_ND.dtype:
        raise TypeError(f"{op}: x dtype {x_ND.dtype} != dy dtype {dy_NF.dtype}")
    if dy_NF.shape[0] != x_ND.shape[0]:
        raise ValueError(f"{op}: x has N={x_ND.shape[0]} rows but dy has {dy_NF.shape[0]}")
    L.check_dim(op, "counts", counts_E, 1, "[E]")
    E = counts_E.shape[0]
    _check_counts(op, counts_E, E)
    L.check_same_device(op, x=x_ND, dy=dy_NF, counts=counts_E)
    (N, D), F = x_ND.shape, dy_NF.shape[1]
    dw_EDF = x_ND.new_empty(E, D, F)
    if E == 0 or D == 0 or F == 0:
        return dw_EDF
    grid = lambda META: (triton.cdiv(D, META["BLOCK_M"]) * triton.cdiv(F, META["BLOCK_N"]), E)  # noqa: E731
    _grouped_mm_dw_kernel[grid](
        x_ND, dy_NF, dw_EDF, counts_E,
        N, D, F, E,
        x_ND.stride(0), x_ND.stride(1), dy_NF.stride(0), dy_NF.stride(1),
        dw_EDF.stride(0), dw_EDF.stride(1), dw_EDF.stride(2),
        BLOCK_E=_block_e(E), UPCAST=L.upcast_operands(), PRECISION=L.dot_precision(x_ND.dtype),
    )
    return dw_EDF


# ---- custom ops: opaque to torch.compile (the fakes give shapes), autograd registered below ----

@torch.library.custom_op("moesys::grouped_mm", mutates_args=())
def grouped_mm(x_NK: torch.Tensor, w_EKF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    return launch_grouped_mm(x_NK, w_EKF, counts_E)


@grouped_mm.register_fake
def _grouped_mm_fake(x_NK, w_EKF, counts_E):
    return x_NK.new_empty(x_NK.shape[0], w_EKF.shape[2])


@torch.library.custom_op("moesys::grouped_mm_dw", mutates_args=())
def grouped_mm_dw(x_ND: torch.Tensor, dy_NF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    return launch_grouped_mm_dw(x_ND, dy_NF, counts_E)


@grouped_mm_dw.register_fake
def _grouped_mm_dw_fake(x_ND, dy_NF, counts_E):
    return x_ND.new_empty(counts_E.shape[0], x_ND.shape[1], dy_NF.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    x_ND, w_EDF, counts_E = inputs
    ctx.save_for_backward(x_ND, w_EDF, counts_E)


def _grouped_mm_backward(ctx, dy_NF):
    x_ND, w_EDF, counts_E = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        # dX reuses the forward kernel on the [E, F, D] view of w: no transposed copy
        dx = grouped_mm(dy_NF, w_EDF.transpose(1, 2), counts_E)
    if ctx.needs_input_grad[1]:
        dw = grouped_mm_dw(x_ND, dy_NF, counts_E)
    return dx, dw, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_gemm_triton(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Differentiable Triton grouped GEMM (see `moesys.kernels.grouped_gemm` for the contract).

    The rows-sum check costs a host sync on CUDA, so there it is a device-side assert instead
    (`torch._assert_async`: no sync, fails at a later launch); on CPU it raises at once.
    """
    if counts_E.dtype in L.INDEX_DTYPES and not counts_E.is_contiguous():
        counts_E = counts_E.contiguous()  # E entries: the copy is free and keeps both backends alike
    if not torch.compiler.is_compiling():
        total_ok = counts_E.sum() == x_ND.shape[0]
        if x_ND.device.type == "cpu":
            if not bool(total_ok):
                raise ValueError(f"grouped_gemm: counts sum to {int(counts_E.sum())} but x has N={x_ND.shape[0]} rows")
            if bool((counts_E < 0).any()):
                raise ValueError(f"grouped_gemm: counts must be >= 0, got {counts_E.tolist()}")
        else:
            torch._assert_async(total_ok, "grouped_gemm: counts do not sum to the number of rows of x")
    return grouped_mm(x_ND, w_EDF, counts_E)
