"""Persistent Triton grouped GEMM: one program per SM walks the output tiles of every expert.

Legend: M rows (grouped contiguously by expert), K reduction width, D input width, F output width,
E experts, BM/BN/BK block sizes, P programs (the grid).

    forward:  y_MF[rows of e]  = x_MK[rows of e] @ w_EKF[e]
    dX:       dx_MD[rows of e] = dy_MF[rows of e] @ w_EDF[e]^T   (forward kernel over the [E, F, D] view)
    dW:       dw_EDF[e]        = x_MD[rows of e]^T @ dy_MF[rows of e]   (zero for an empty expert)

Groups are given on the device, either as counts_E (rows per expert, summing to M) or as offs_E
(int32 cumulative row ends, as `torch._grouped_mm` takes them; rows at or past offs_E[-1] are
padding, never read or written). Nothing is read on the host, so a call can sit in a CUDA graph.

Schedule (persistent, as Triton's tutorial 09 and DeepGEMM's grouped kernels): the grid is
P = min(SMs, an upper bound on the tiles). Every program loads the E group sizes, takes the
per-expert tile counts and their cumulative sum in registers, and loops `for tile in
range(pid, total, P)`; a tile's expert is the number of experts whose tiles end at or before it.
Forward tiles are ordered GROUP_M row tiles at a time per column tile (L2 reuse of w[e]); an
expert with no rows has no tiles. dW tiles are (expert, D tile, F tile); consecutive tiles of one
expert go to different programs, so a hot expert is spread over the machine.

Loads use TMA tensor descriptors (`tl.make_tensor_descriptor`, made on the device per expert with
the expert's row count as the bound, so rows past the expert read as zeros) where the GPU is sm90+,
Triton offers them and the strides are 16-byte aligned (`use_tma`); plain masked pointer loads
otherwise. Under TRITON_INTERPRET=1 both paths run on the CPU (the interpreter implements
descriptors), so tests cover both. Stores are masked pointer stores. Accumulation is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_triton as L
from .backend import interpreting
from .grouped_gemm_triton import mm_tile


_configs = L.tile_configs


if interpreting():
    # the interpreter runs every config it autotunes over: one small config (tl.dot needs >= 16)
    _FWD_CONFIGS = _DW_CONFIGS = _configs([(32, 32, 32, 4, 1)])
    INTERPRETER_PROGRAMS = 3  # fewer programs than tiles: every program loops over several tiles
else:
    # Hopper bf16: 128-row tiles with 64-wide K steps feed wgmma; 64-row tiles serve the buckets
    # where each expert has only a few hundred rows (fine-grained E=64) and waste less on the
    # partial last tile of each expert. Autotuned per key, i.e. per shape bucket (`rows_bucket`).
    _FWD_CONFIGS = _configs([
        (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3),
    ])
    _DW_CONFIGS = _configs([(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)])
    INTERPRETER_PROGRAMS = 0


def rows_bucket(M: int, E: int) -> int:
    """The shape bucket of a call's rows: mean rows per expert rounded up to a power of two, capped
    at 4096 (tile choice stops changing there). Host-side from static sizes: no sync."""
    per = -(-M // max(E, 1))
    return min(triton.next_power_of_2(max(per, 1)), 4096)


@triton.jit
def _group_bounds(group_ptr, M, E, BLOCK_E: tl.constexpr, OFFSETS: tl.constexpr):
    """(start_E, cnt_E) of every expert, clamped to [0, M] so bad sizes cannot address past x."""
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    if OFFSETS:  # cumulative ends
        end_E = tl.load(group_ptr + offs_e, mask=e_ok, other=0).to(tl.int64)
        start_E = tl.load(group_ptr + offs_e - 1, mask=e_ok & (offs_e > 0), other=0).to(tl.int64)
    else:  # counts
        cnt_E = tl.load(group_ptr + offs_e, mask=e_ok, other=0).to(tl.int64)
        end_E = tl.cumsum(cnt_E, 0)
        start_E = end_E - cnt_E
    end_E = tl.minimum(end_E, M)
    start_E = tl.minimum(start_E, M)
    cnt_E = tl.where(e_ok, tl.maximum(end_E - start_E, 0), 0)
    return start_E, cnt_E


@triton.autotune(configs=_FWD_CONFIGS, key=["K", "F", "ROWS_BUCKET", "W_K_CONTIG", "USE_TMA"])
@triton.jit
def _persistent_mm_kernel(
    # pointers
    x_ptr, w_ptr, y_ptr, group_ptr,
    # sizes and strides
    M, K, F, E,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wf, stride_ym, stride_yf,
    # meta-parameters
    ROWS_BUCKET: tl.constexpr, BLOCK_E: tl.constexpr, OFFSETS: tl.constexpr, USE_TMA: tl.constexpr,
    W_K_CONTIG: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_e = tl.arange(0, BLOCK_E)
    start_E, cnt_E = _group_bounds(group_ptr, M, E, BLOCK_E, OFFSETS)
    tiles_E = ((cnt_E + BLOCK_M - 1) // BLOCK_M).to(tl.int32)  # tile indices in int32, row addresses in int64
    tile_end_E = tl.cumsum(tiles_E, 0)
    total_m = tl.sum(tiles_E, 0)
    num_n = tl.cdiv(F, BLOCK_N)
    total = total_m * num_n
    pids_in_group = GROUP_M * num_n
    for tile in range(pid, total, num_programs):
        # grouped order: GROUP_M row tiles (of any experts) share each column tile
        first_m = (tile // pids_in_group) * GROUP_M
        group_m = tl.minimum(total_m - first_m, GROUP_M)
        tm = first_m + (tile % pids_in_group) % group_m
        tn = (tile % pids_in_group) // group_m
        e = tl.sum((tile_end_E <= tm).to(tl.int32), 0)  # the expert owning row tile tm
        is_e = offs_e == e
        e_start = tl.sum(tl.where(is_e, start_E, 0), 0)
        e_cnt = tl.sum(tl.where(is_e, cnt_E, 0), 0)
        m_in_e = (tm - tl.sum(tl.where(is_e, tile_end_E - tiles_E, 0), 0)) * BLOCK_M
        cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < F
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            # per-expert descriptors: rows past the expert's end (and K past its width) read as 0
            x_desc = tl.make_tensor_descriptor(x_ptr + e_start.to(tl.int64) * stride_xm, shape=[e_cnt.to(tl.int32), K],
                                               strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
            if W_K_CONTIG:  # dX: w is the [E, F, D] view of [E, D, F] memory; load [BN, BK], transpose
                w_desc = tl.make_tensor_descriptor(w_ptr + e.to(tl.int64) * stride_we, shape=[F, K],
                                                   strides=[stride_wf, 1], block_shape=[BLOCK_N, BLOCK_K])
            else:
                w_desc = tl.make_tensor_descriptor(w_ptr + e.to(tl.int64) * stride_we, shape=[K, F],
                                                   strides=[stride_wk, 1], block_shape=[BLOCK_K, BLOCK_N])
            for k0 in range(0, K, BLOCK_K):
                a = x_desc.load([m_in_e, k0])
                if W_K_CONTIG:
                    b = tl.trans(w_desc.load([tn * BLOCK_N, k0]))
                else:
                    b = w_desc.load([k0, tn * BLOCK_N])
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            rows = e_start + m_in_e + tl.arange(0, BLOCK_M)
            acc = mm_tile(x_ptr, w_ptr, e, rows, rows < e_start + e_cnt, cols, col_ok, K, stride_xm, stride_xk,
                          stride_we, stride_wk, stride_wf, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        out_rows = e_start + m_in_e + tl.arange(0, BLOCK_M)
        out_ok = (out_rows < e_start + e_cnt)[:, None] & col_ok[None, :]
        y_ptrs = y_ptr + out_rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yf
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.autotune(configs=_DW_CONFIGS, key=["D", "F", "ROWS_BUCKET", "USE_TMA"])
@triton.jit
def _persistent_dw_kernel(
    # pointers
    x_ptr, dy_ptr, dw_ptr, group_ptr,
    # sizes and strides
    M, D, F, E,
    stride_xm, stride_xd, stride_dym, stride_dyf, stride_we, stride_wd, stride_wf,
    # meta-parameters
    ROWS_BUCKET: tl.constexpr, BLOCK_E: tl.constexpr, OFFSETS: tl.constexpr, USE_TMA: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # tiles (e, D tile of BLOCK_M, F tile of BLOCK_N); BLOCK_K steps over the expert's rows
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_e = tl.arange(0, BLOCK_E)
    start_E, cnt_E = _group_bounds(group_ptr, M, E, BLOCK_E, OFFSETS)
    num_d = tl.cdiv(D, BLOCK_M)
    num_f = tl.cdiv(F, BLOCK_N)
    per_e = num_d * num_f
    for tile in range(pid, E * per_e, num_programs):
        e = tile // per_e
        td = (tile % per_e) // num_f
        tf = tile % num_f
        is_e = offs_e == e
        e_start = tl.sum(tl.where(is_e, start_E, 0), 0)
        e_cnt = tl.sum(tl.where(is_e, cnt_E, 0), 0).to(tl.int32)  # rows: int32 loop and descriptor bounds
        ds = td * BLOCK_M + tl.arange(0, BLOCK_M)
        fs = tf * BLOCK_N + tl.arange(0, BLOCK_N)
        d_ok = ds < D
        f_ok = fs < F
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # an empty expert runs no iteration and stores zeros: dW[e] = 0 is the true gradient
        if USE_TMA:
            # a descriptor needs a positive extent; an empty expert's is never loaded from
            x_desc = tl.make_tensor_descriptor(x_ptr + e_start.to(tl.int64) * stride_xm, shape=[tl.maximum(e_cnt, 1), D],
                                               strides=[stride_xm, 1], block_shape=[BLOCK_K, BLOCK_M])
            dy_desc = tl.make_tensor_descriptor(dy_ptr + e_start.to(tl.int64) * stride_dym, shape=[tl.maximum(e_cnt, 1), F],
                                                strides=[stride_dym, 1], block_shape=[BLOCK_K, BLOCK_N])
            for r0 in range(0, e_cnt, BLOCK_K):
                a = tl.trans(x_desc.load([r0, td * BLOCK_M]))  # x^T tile [BM(d), BK(rows)]
                b = dy_desc.load([r0, tf * BLOCK_N])  # dy tile [BK(rows), BN(f)]
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            rs = tl.arange(0, BLOCK_K)
            for r0 in range(0, e_cnt, BLOCK_K):
                rows = e_start + r0 + rs
                r_ok = r0 + rs < e_cnt
                a = tl.load(x_ptr + rows[None, :].to(tl.int64) * stride_xm + ds[:, None] * stride_xd,
                            mask=d_ok[:, None] & r_ok[None, :], other=0.0)
                b = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dym + fs[None, :] * stride_dyf,
                            mask=r_ok[:, None] & f_ok[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        dw_ptrs = dw_ptr + e.to(tl.int64) * stride_we + ds[:, None] * stride_wd + fs[None, :] * stride_wf
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=d_ok[:, None] & f_ok[None, :])


# ---- launchers ------------------------------------------------------------------------------

_NUM_SMS: dict = {}


def num_programs(device: torch.device) -> int:
    """The persistent grid's width: the SM count on CUDA (cached per device), a small fixed
    number under the interpreter."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS or 3
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def tma_supported(device: torch.device) -> bool:
    """TMA descriptors need Triton's `tl.make_tensor_descriptor` and an sm90+ GPU; the interpreter
    implements them on the CPU (used by the tests through `use_tma=True`)."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return interpreting()


def _tma_strides_ok(*views: torch.Tensor) -> bool:
    # a descriptor's base and every stride but the unit one must be 16-byte multiples; the base of
    # each expert's block moves by whole rows, so aligned strides keep it aligned
    for t, unit_dim in views:
        es = t.element_size()
        if t.stride(unit_dim) != 1 or t.data_ptr() % 16:
            return False
        if any((s * es) % 16 for d, s in enumerate(t.stride()) if d != unit_dim):
            return False
    return True


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors live in a global scratch buffer that Triton asks an allocator for.
    Set ours (a torch allocation, so it is graph-capturable) unless the user has set one. The
    setting is a ContextVar: the autograd engine's device threads start without it, so every TMA
    launch checks."""
    from triton.runtime import _allocation

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_torch_alloc)


def _groups(op: str, counts_E, offs_E, E: int, device) -> tuple:
    """(group tensor, OFFSETS flag) from exactly one of counts_E / offs_E."""
    if (counts_E is None) == (offs_E is None):
        raise ValueError(f"{op}: pass exactly one of counts (rows per expert) and offs (cumulative row ends)")
    g = counts_E if offs_E is None else offs_E
    name = "counts" if offs_E is None else "offs"
    L.check_dtype(op, name, g, L.INDEX_DTYPES)
    if g.dim() != 1 or g.shape[0] != E:
        raise ValueError(f"{op}: {name} must be 1-D with one entry per expert ({E}), got shape {tuple(g.shape)}")
    L.check_contiguous(op, name, g)
    if g.device != device:
        raise ValueError(f"{op}: {name} is on {g.device} but the operands are on {device}")
    return g, offs_E is not None


def _block_e(E: int) -> int:
    return triton.next_power_of_2(max(E, 2))


def launch_persistent_mm(x_MK: torch.Tensor, w_EKF: torch.Tensor, counts_E: torch.Tensor = None, *,
                         offs_E: torch.Tensor = None, use_tma: bool = None) -> torch.Tensor:
    """y_MF = x_MK[rows of e] @ w_EKF[e] with the persistent kernel.

    Args:
        x_MK: [M, K] rows grouped by expert; any strides.
        w_EKF: [E, K, F]; any strides (dX passes the [E, F, D] view of w without copying).
        counts_E: [E] int rows per expert (summing to M), or
        offs_E: [E] int cumulative row ends (offs_E[-1] <= M; rows past it are padding, left unwritten).
        use_tma: None = wherever `tma_supported` and the strides allow; True forces it (error if it
            cannot run); False = pointer loads.
    Returns:
        y_MF, a new contiguous tensor (padding rows uninitialised).
    """
    op = "persistent_mm"
    L.check_dim(op, "x", x_MK, 2, "[M, K]")
    L.check_dim(op, "w", w_EKF, 3, "[E, K, F]")
    L.check_dtype(op, "x", x_MK, L.FLOAT_DTYPES)
    if w_EKF.dtype != x_MK.dtype:
        raise TypeError(f"{op}: x dtype {x_MK.dtype} != w dtype {w_EKF.dtype}")
    if x_MK.shape[1] != w_EKF.shape[1]:
        raise ValueError(f"{op}: x has width K={x_MK.shape[1]} but w expects K={w_EKF.shape[1]}")
    L.check_same_device(op, x=x_MK, w=w_EKF)
    (M, K), (E, _, F) = x_MK.shape, w_EKF.shape
    groups, offsets = _groups(op, counts_E, offs_E, E, x_MK.device)
    y_MF = x_MK.new_empty(M, F)
    if M == 0 or F == 0 or E == 0:
        return y_MF
    if K == 0:
        return y_MF.zero_()
    w_k_contig = w_EKF.stride(1) == 1 and w_EKF.stride(2) != 1
    tma = _decide_tma(op, use_tma, x_MK.device, (x_MK, 1), (w_EKF, 1 if w_k_contig else 2))
    progs = num_programs(x_MK.device)

    def grid(META):  # at most one partial row tile per expert beyond cdiv(M, BM)
        upper = (triton.cdiv(M, META["BLOCK_M"]) + E) * triton.cdiv(F, META["BLOCK_N"])
        return (max(1, min(progs, upper)),)

    _persistent_mm_kernel[grid](
        x_MK, w_EKF, y_MF, groups,
        M, K, F, E,
        x_MK.stride(0), x_MK.stride(1), w_EKF.stride(0), w_EKF.stride(1), w_EKF.stride(2),
        y_MF.stride(0), y_MF.stride(1),
        ROWS_BUCKET=rows_bucket(M, E), BLOCK_E=_block_e(E), OFFSETS=offsets, USE_TMA=tma, W_K_CONTIG=w_k_contig,
        UPCAST=L.upcast_operands(), PRECISION=L.dot_precision(x_MK.dtype), GROUP_M=8,
    )
    return y_MF


def launch_persistent_mm_dw(x_MD: torch.Tensor, dy_MF: torch.Tensor, counts_E: torch.Tensor = None, *,
                            offs_E: torch.Tensor = None, use_tma: bool = None) -> torch.Tensor:
    """dw_EDF[e] = x_MD[rows of e]^T @ dy_MF[rows of e] (zero for an empty expert), x's dtype;
    groups and use_tma as in `launch_persistent_mm`."""
    op = "persistent_mm_dw"
    L.check_dim(op, "x", x_MD, 2, "[M, D]")
    L.check_dim(op, "dy", dy_MF, 2, "[M, F]")
    L.check_dtype(op, "x", x_MD, L.FLOAT_DTYPES)
    if dy_MF.dtype != x_MD.dtype:
        raise TypeError(f"{op}: x dtype {x_MD.dtype} != dy dtype {dy_MF.dtype}")
    if dy_MF.shape[0] != x_MD.shape[0]:
        raise ValueError(f"{op}: x has M={x_MD.shape[0]} rows but dy has {dy_MF.shape[0]}")
    L.check_same_device(op, x=x_MD, dy=dy_MF)
    g = counts_E if counts_E is not None else offs_E
    if g is None or g.dim() != 1:
        raise ValueError(f"{op}: pass exactly one of counts and offs, a 1-D [E] integer tensor")
    E = g.shape[0]
    groups, offsets = _groups(op, counts_E, offs_E, E, x_MD.device)
    (M, D), F = x_MD.shape, dy_MF.shape[1]
    dw_EDF = x_MD.new_empty(E, D, F)
    if E == 0 or D == 0 or F == 0:
        return dw_EDF
    tma = _decide_tma(op, use_tma, x_MD.device, (x_MD, 1), (dy_MF, 1))
    progs = num_programs(x_MD.device)

    def grid(META):
        return (max(1, min(progs, E * triton.cdiv(D, META["BLOCK_M"]) * triton.cdiv(F, META["BLOCK_N"]))),)

    _persistent_dw_kernel[grid](
        x_MD, dy_MF, dw_EDF, groups,
        M, D, F, E,
        x_MD.stride(0), x_MD.stride(1), dy_MF.stride(0), dy_MF.stride(1),
        dw_EDF.stride(0), dw_EDF.stride(1), dw_EDF.stride(2),
        ROWS_BUCKET=rows_bucket(M, E), BLOCK_E=_block_e(E), OFFSETS=offsets, USE_TMA=tma,
        UPCAST=L.upcast_operands(), PRECISION=L.dot_precision(x_MD.dtype),
    )
    return dw_EDF


def _decide_tma(op: str, use_tma, device, *views) -> bool:
    """None: TMA on an sm90+ GPU when the strides allow, pointer loads elsewhere (the interpreter
    included: it runs the TMA path only when forced, as the tests do)."""
    ok = tma_supported(device) and _tma_strides_ok(*views)
    if use_tma and not ok:
        raise ValueError(f"{op}: use_tma=True but TMA cannot run here (needs sm90+ or the interpreter, "
                         f"Triton's make_tensor_descriptor, unit last strides and 16-byte aligned strides; "
                         f"strides {[tuple(v.stride()) for v, _ in views]})")
    tma = (ok and device.type == "cuda") if use_tma is None else bool(use_tma)
    if tma and device.type == "cuda":
        _ensure_allocator()
    return tma


# ---- custom ops: opaque to torch.compile (the fakes give shapes), autograd registered below ----
# `offsets` says what `groups_E` holds: cumulative row ends (True) or rows per expert (False).

def _kw(groups_E: torch.Tensor, offsets: bool) -> dict:
    return {"offs_E": groups_E} if offsets else {"counts_E": groups_E}


@torch.library.custom_op("moesys::persistent_mm", mutates_args=())
def persistent_mm(x_MK: torch.Tensor, w_EKF: torch.Tensor, groups_E: torch.Tensor, offsets: bool) -> torch.Tensor:
    return launch_persistent_mm(x_MK, w_EKF, **_kw(groups_E, offsets))


@persistent_mm.register_fake
def _persistent_mm_fake(x_MK, w_EKF, groups_E, offsets):
    return x_MK.new_empty(x_MK.shape[0], w_EKF.shape[2])


@torch.library.custom_op("moesys::persistent_mm_dw", mutates_args=())
def persistent_mm_dw(x_MD: torch.Tensor, dy_MF: torch.Tensor, groups_E: torch.Tensor, offsets: bool) -> torch.Tensor:
    return launch_persistent_mm_dw(x_MD, dy_MF, **_kw(groups_E, offsets))


@persistent_mm_dw.register_fake
def _persistent_mm_dw_fake(x_MD, dy_MF, groups_E, offsets):
    return x_MD.new_empty(groups_E.shape[0], x_MD.shape[1], dy_MF.shape[1])


def _setup(ctx, inputs, output):
    x_MK, w_EKF, groups_E, offsets = inputs
    ctx.save_for_backward(x_MK, w_EKF, groups_E)
    ctx.offsets = offsets


def _backward(ctx, dy_MF):
    x_MK, w_EKF, groups_E = ctx.saved_tensors
    dy_MF = dy_MF.contiguous()  # may be zero-stride (expand of a sum)
    dx = dw = None
    if ctx.needs_input_grad[0]:
        # dX is the forward kernel on the [E, F, K] view of w: no transposed copy
        dx = persistent_mm(dy_MF, w_EKF.transpose(1, 2), groups_E, ctx.offsets)
    if ctx.needs_input_grad[1]:
        dw = persistent_mm_dw(x_MK, dy_MF, groups_E, ctx.offsets)
    return dx, dw, None, None


persistent_mm.register_autograd(_backward, setup_context=_setup)


def grouped_gemm_persistent(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Differentiable persistent grouped GEMM (see `moesys.kernels.grouped_gemm` for the contract).

    As `grouped_gemm_triton`: the rows-sum check raises at once on CPU and is a device-side
    assert on CUDA (no host sync)."""
    if counts_E.dtype in L.INDEX_DTYPES and not counts_E.is_contiguous():
        counts_E = counts_E.contiguous()
    if not torch.compiler.is_compiling():
        total_ok = counts_E.sum() == x_ND.shape[0]
        if x_ND.device.type == "cpu":
            if not bool(total_ok):
                raise ValueError(f"grouped_gemm: counts sum to {int(counts_E.sum())} but x has N={x_ND.shape[0]} rows")
            if bool((counts_E < 0).any()):
                raise ValueError(f"grouped_gemm: counts must be >= 0, got {counts_E.tolist()}")
        else:
            torch._assert_async(total_ok, "grouped_gemm: counts do not sum to the number of rows of x")
    return persistent_mm(x_ND, w_EDF, counts_E, False)


def grouped_gemm_offsets_persistent(x_MD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Differentiable persistent grouped GEMM over int32 cumulative row ends (the sync-free
    layout of `grouped_mm_ffn`): rows past offs_E[-1] are padding, their outputs and gradients
    undefined."""
    return persistent_mm(x_MD, w_EDF, offs_E, True)
