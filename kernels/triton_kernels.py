"""Triton kernels behind :mod:`lifelong.kernels` (fused design after LoRAFusion, arXiv 2510.00206).

Imported lazily, the first time an op resolves to the ``triton`` backend, so ``import lifelong``
works without triton and the interpreter decision (``TRITON_INTERPRET=1``, read by ``triton.jit``
when a kernel is decorated) is taken in a process that set it at start-up.

- K1 ``gemm_lowrank``: ``C = L·diag(s)·R ⊙ mask/keep + tile(V) + P·Q (+ b)``, then optionally
  ``Z = C; C = γ ⊙ C + β``. The accumulator is seeded with the rank-r term, then the K loop runs
  the base product (LoRAFusion's split at the rank-r intermediate). Uses: LoRA/LaMDA/MiSS forward
  (P=X, Q=Wᵀ), their dX (P=G, Q=W), SSF forward (affine epilogue) and SSF dX (rows of Q scaled by γ).
- K3 ``dy_pass``: ``dU = (G·B)·diag(s)`` and ``dB = (Gᵀ·U)·diag(s)`` with one read of G.
- ``colsum2``: ``Σ_m G`` and ``Σ_m G ⊙ Z`` (SSF's dβ, dγ), two-stage and deterministic.
- ``cov_tri``: ``C += w · X̂ᵀX̂`` over the upper-triangle tile pairs only (optionally mirrored).

Every load and store is masked on every edge. All accumulation is fp32 with one cast at the store.
``UPCAST`` turns loaded tiles into fp32 before any arithmetic: the interpreter computes bf16
arithmetic on raw bit patterns (triton #11584), so it is set only when interpreting bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import interpreting, next_pow2, rank_pad

INTERPRET = interpreting()


def _configs(full: list[triton.Config], small: triton.Config) -> list[triton.Config]:
    """Autotuning needs a driver: the interpreter gets exactly one config."""
    return [small] if INTERPRET else full


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


GEMM_CONFIGS = _configs(
    [
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 256, 64, 8, 4),
        _cfg(128, 128, 64, 4, 4),
        _cfg(128, 128, 64, 8, 4),
        _cfg(64, 256, 32, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(64, 64, 128, 4, 3),
        _cfg(32, 64, 128, 4, 4),
        _cfg(16, 64, 256, 4, 3),
    ],
    _cfg(32, 32, 32, 4, 1),
)
DY_CONFIGS = _configs(
    [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
     for bm, bn, w, s in ((128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 3), (32, 128, 4, 3))],
    triton.Config({"BM": 32, "BN": 32}, num_warps=4, num_stages=1),
)
MIN_DY_BM = min(c.kwargs["BM"] for c in DY_CONFIGS)
COV_CONFIGS = _configs(
    [triton.Config({"BD": bd, "BT": bt}, num_warps=w, num_stages=s)
     for bd, bt, w, s in ((128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4), (64, 128, 4, 3))],
    triton.Config({"BD": 32, "BT": 32}, num_warps=4, num_stages=1),
)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles share the W tiles they read (L2 reuse)."""
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


SMEM_BUDGET = 200 * 1024  # bytes; H100/H200 allow 227 KB per block


def _prune_gemm(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tilings whose fp32 rank-seed tiles plus pipelined K tiles overflow shared memory
    (large R_PAD); keep the smallest one if none fits. Never reached by the interpreter (1 config)."""
    rp = kwargs.get("RP", named_args.get("RP", 16))

    def smem(c: triton.Config) -> int:
        bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
        return 4 * rp * (bm + bn) + 2 * c.num_stages * bk * (bm + bn)

    fits = [c for c in configs if smem(c) <= SMEM_BUDGET]
    return fits or [min(configs, key=smem)]


@triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "KD", "RP"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _gemm_lowrank_kernel(
    P, Q, L, R, RS, MASK, TADD, KS, BIAS, GAMMA, BETA, Z, C,
    M, N, KD, RANK, M_BUCKET,
    s_pm, s_pk, s_qk, s_qn, s_lm, s_lr, s_rr, s_rn, s_mm, s_mn, s_tm, s_tr, s_zm, s_zn, s_cm, s_cn,
    mask_scale,
    HAS_LR: tl.constexpr, HAS_MASK: tl.constexpr, HAS_TADD: tl.constexpr, HAS_KS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_AFFINE: tl.constexpr, STORE_Z: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, RP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    out_ok = m_ok[:, None] & n_ok[None, :]
    acc = tl.zeros((BM, BN), dtype=ACC)
    # Adapter term first: it is the part the dropout mask applies to.
    if HAS_LR:
        offs_r = tl.arange(0, RP)
        r_ok = offs_r < RANK
        lt = tl.load(L + offs_m[:, None] * s_lm + offs_r[None, :] * s_lr, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        rt = tl.load(R + offs_r[:, None] * s_rr + offs_n[None, :] * s_rn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        sc = tl.load(RS + offs_r, mask=r_ok, other=0.0)
        # The per-rank scale sits inside the rank sum, so the seed product runs in fp32.
        acc = _mma(lt.to(ACC) * sc[None, :], rt.to(ACC), acc, PRECISION)
    if HAS_TADD:
        col = offs_n % RANK
        acc += tl.load(TADD + offs_m[:, None] * s_tm + col[None, :] * s_tr, mask=out_ok, other=0.0).to(ACC)
    if HAS_MASK:
        keep = tl.load(MASK + offs_m[:, None] * s_mm + offs_n[None, :] * s_mn, mask=out_ok, other=0)
        acc = tl.where(keep != 0, acc * mask_scale, 0.0)
    for k0 in range(0, tl.cdiv(KD, BK)):
        offs_k = k0 * BK + tl.arange(0, BK)
        k_ok = offs_k < KD
        p = tl.load(P + offs_m[:, None] * s_pm + offs_k[None, :] * s_pk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(Q + offs_k[:, None].to(tl.int64) * s_qk + offs_n[None, :] * s_qn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        if HAS_KS:
            ks = tl.load(KS + offs_k, mask=k_ok, other=0.0)
            q = (q.to(ACC) * ks[:, None]).to(p.dtype)
        acc = _mma(p, q, acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(ACC)[None, :]
    if HAS_AFFINE:
        if STORE_Z:
            tl.store(Z + offs_m[:, None] * s_zm + offs_n[None, :] * s_zn, acc.to(Z.dtype.element_ty), mask=out_ok)
        g = tl.load(GAMMA + offs_n, mask=n_ok, other=0.0).to(ACC)
        b = tl.load(BETA + offs_n, mask=n_ok, other=0.0).to(ACC)
        acc = acc * g[None, :] + b[None, :]
    tl.store(C + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn, acc.to(C.dtype.element_ty), mask=out_ok)


@triton.autotune(configs=DY_CONFIGS, key=["M_BUCKET", "N", "RP"], reset_to_zero=["DB"])
@triton.jit
def _dy_pass_kernel(
    G, B, U, RS, DU, DB,
    M, N, RANK, M_BUCKET,
    s_gm, s_gn, s_bn, s_br, s_um, s_ur, s_dus, s_dum, s_dbp, s_dbn,
    NEED_DU: tl.constexpr, NEED_DB: tl.constexpr, ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, RP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_r = tl.arange(0, RP)
    m_ok = offs_m < M
    r_ok = offs_r < RANK
    sc = tl.load(RS + offs_r, mask=r_ok, other=0.0)
    if NEED_DB:
        u = tl.load(U + offs_m[:, None] * s_um + offs_r[None, :] * s_ur, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            u = u.to(tl.float32)
    du = tl.zeros((BM, RP), dtype=ACC)
    tiles_per_split = tl.cdiv(tl.cdiv(N, BN), tl.num_programs(1))
    for t in range(0, tiles_per_split):
        offs_n = (pid_s * tiles_per_split + t) * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        g = tl.load(G + offs_m[:, None] * s_gm + offs_n[None, :] * s_gn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
        if NEED_DU:
            b = tl.load(B + offs_n[:, None] * s_bn + offs_r[None, :] * s_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            du = _mma(g, b, du, PRECISION)
        if NEED_DB:
            db = _mma(tl.trans(g), u, tl.zeros((BN, RP), dtype=ACC), PRECISION) * sc[None, :]
            db_ptr = DB + offs_n[:, None] * s_dbn + offs_r[None, :]
            db_ok = n_ok[:, None] & r_ok[None, :]
            if ATOMIC:
                tl.atomic_add(db_ptr, db, mask=db_ok)
            else:
                tl.store(db_ptr + pid_m * s_dbp, db, mask=db_ok)
    if NEED_DU:
        tl.store(DU + pid_s * s_dus + offs_m[:, None] * s_dum + offs_r[None, :], du * sc[None, :],
                 mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _colsum2_kernel(G, Z, SG, SGZ, M, N, rows_per_prog, s_gm, s_gn, s_zm, s_zn,
                    NEED_GZ: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    sg = tl.zeros((BN,), dtype=ACC)
    sgz = tl.zeros((BN,), dtype=ACC)
    for t in range(0, tl.cdiv(rows_per_prog, BM)):
        offs_m = (pid_m * rows_per_prog + t * BM + tl.arange(0, BM)).to(tl.int64)
        ok = ((offs_m < M) & (offs_m < (pid_m + 1) * rows_per_prog))[:, None] & n_ok[None, :]
        g = tl.load(G + offs_m[:, None] * s_gm + offs_n[None, :] * s_gn, mask=ok, other=0.0).to(ACC)
        sg += tl.sum(g, axis=0)
        if NEED_GZ:
            z = tl.load(Z + offs_m[:, None] * s_zm + offs_n[None, :] * s_zn, mask=ok, other=0.0).to(ACC)
            sgz += tl.sum(g * z, axis=0)
    tl.store(SG + pid_m * N + offs_n, sg, mask=n_ok)
    if NEED_GZ:
        tl.store(SGZ + pid_m * N + offs_n, sgz, mask=n_ok)


@triton.autotune(configs=COV_CONFIGS, key=["D_BUCKET", "D"], restore_value=["C"])
@triton.jit
def _cov_tri_kernel(
    X, ROWMASK, W, C, T, D, D_BUCKET, s_xt, s_xd, s_ci, s_cj,
    HAS_ROWMASK: tl.constexpr, HAS_W: tl.constexpr, MIRROR: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
):
    # Map the 1-D program id to the tile pair (ti <= tj) of the upper triangle, row by row (row ti
    # holds nt - ti pairs): no host-side table and no square grid with early exits.
    pid = tl.program_id(0)
    nt = tl.cdiv(D, BD)
    ti = pid * 0
    start = pid * 0
    for _ in range(0, nt):
        row_len = nt - ti
        beyond = pid >= start + row_len
        start += tl.where(beyond, row_len, 0)
        ti += tl.where(beyond, 1, 0)
    tj = ti + (pid - start)
    offs_i = ti * BD + tl.arange(0, BD)
    offs_j = tj * BD + tl.arange(0, BD)
    i_ok = offs_i < D
    j_ok = offs_j < D
    acc = tl.zeros((BD, BD), dtype=ACC)
    for t0 in range(0, tl.cdiv(T, BT)):
        offs_t = (t0 * BT + tl.arange(0, BT)).to(tl.int64)
        t_ok = offs_t < T
        xi = tl.load(X + offs_t[:, None] * s_xt + offs_i[None, :] * s_xd, mask=t_ok[:, None] & i_ok[None, :], other=0.0)
        xj = tl.load(X + offs_t[:, None] * s_xt + offs_j[None, :] * s_xd, mask=t_ok[:, None] & j_ok[None, :], other=0.0)
        if UPCAST:
            xi = xi.to(tl.float32)
            xj = xj.to(tl.float32)
        if HAS_ROWMASK:
            keep = tl.load(ROWMASK + offs_t, mask=t_ok, other=0)
            # A select on both sides (exact, and a dropped row holding NaN cannot leak: 0·NaN = NaN).
            xi = tl.where(keep[:, None] != 0, xi, tl.zeros_like(xi))
            xj = tl.where(keep[:, None] != 0, xj, tl.zeros_like(xj))
        acc = _mma(tl.trans(xi), xj, acc, PRECISION)
    if HAS_W:
        acc = acc * tl.load(W).to(ACC)
    ok = i_ok[:, None] & j_ok[None, :]
    c_ptr = C + offs_i[:, None].to(tl.int64) * s_ci + offs_j[None, :] * s_cj
    tl.store(c_ptr, tl.load(c_ptr, mask=ok, other=0.0) + acc, mask=ok)
    if MIRROR:
        if ti != tj:
            m_ptr = C + offs_j[None, :].to(tl.int64) * s_ci + offs_i[:, None] * s_cj
            tl.store(m_ptr, tl.load(m_ptr, mask=ok, other=0.0) + acc, mask=ok)


# ---- launchers -----------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands: TF32 only where torch itself allows it (its default is full precision)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _acc(dtype: torch.dtype) -> tl.dtype:
    """fp32 accumulation, except fp64 inputs (interpreter-only: gradcheck of the Triton path)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _buf_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _strides(t: Tensor | None, n: int = 2) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def gemm_lowrank(
    p: Tensor, q: Tensor, *, lr: tuple[Tensor, Tensor, Tensor] | None = None, mask: Tensor | None = None,
    mask_scale: float = 1.0, tadd: Tensor | None = None, kscale: Tensor | None = None, bias: Tensor | None = None,
    affine: tuple[Tensor, Tensor] | None = None, store_z: bool = False, out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """K1: ``C = (L·diag(s)·R [+ tile(V)]) ⊙ mask·mask_scale + P·diag(ks)·Q + b``, then affine.

    ``p``: (M, KD); ``q``: (KD, N) (any strides; a transposed view needs no copy); ``lr`` =
    (L (M, r), R (r, N), s (r,) fp32); ``tadd`` = V (M, r): column n gets ``V[:, n mod r]``.
    Returns (C, Z) with Z the pre-affine output when ``store_z``; ``out`` (M, N), any strides,
    receives C.
    """
    m, kd = p.shape
    n = q.shape[1]
    dtype = p.dtype
    if q.shape[0] != kd:
        raise ValueError(f"gemm_lowrank: p {tuple(p.shape)} and q {tuple(q.shape)} do not chain")
    c = torch.empty((m, n), device=p.device, dtype=dtype) if out is None else out
    # The kernel reads vectors with unit stride: make any strided view (b[::2], expanded) dense.
    bias, kscale = (v.contiguous() if v is not None else None for v in (bias, kscale))
    affine = tuple(v.contiguous() for v in affine) if affine is not None else None
    if lr is not None:
        lr = (lr[0], lr[1], lr[2].contiguous())
    z = torch.empty((m, n), device=p.device, dtype=dtype) if store_z else None
    if m == 0 or n == 0:
        return c, z
    rank = lr[0].shape[1] if lr is not None else (tadd.shape[1] if tadd is not None else 1)
    l, r, rs = lr if lr is not None else (None, None, None)
    gamma, beta = affine if affine is not None else (None, None)
    dummy = c  # never read: its HAS_* flag is off
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _gemm_lowrank_kernel[grid](
        p, q, l if l is not None else dummy, r if r is not None else dummy, rs if rs is not None else dummy,
        mask if mask is not None else dummy, tadd if tadd is not None else dummy,
        kscale if kscale is not None else dummy, bias if bias is not None else dummy,
        gamma if gamma is not None else dummy, beta if beta is not None else dummy, z if z is not None else dummy, c,
        m, n, kd, rank, min(next_pow2(m), 8192),
        *p.stride(), *q.stride(), *_strides(l), *_strides(r), *_strides(mask), *_strides(tadd), *_strides(z),
        *c.stride(), float(mask_scale),
        HAS_LR=lr is not None, HAS_MASK=mask is not None, HAS_TADD=tadd is not None, HAS_KS=kscale is not None,
        HAS_BIAS=bias is not None, HAS_AFFINE=affine is not None, STORE_Z=store_z,
        UPCAST=_upcast(dtype), PRECISION=_precision(dtype), ACC=_acc(dtype), RP=rank_pad(rank),
    )
    return c, z


def dy_pass(
    g: Tensor, b: Tensor | None, u: Tensor | None, scale: Tensor, *, atomic: bool | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """K3: ``dU = (G·B)·diag(s)`` (M, r) if ``b`` is given, ``dB = (Gᵀ·U)·diag(s)`` (N, r) if ``u`` is.

    Both come back in fp32. ``atomic=None`` picks fp32 atomics for dB unless torch's
    deterministic mode is on; the deterministic form writes one partial per row tile and sums.
    """
    m, n = g.shape
    scale = scale.contiguous()
    rank = scale.shape[0]
    rp = rank_pad(rank)
    need_du, need_db = b is not None, u is not None
    atomic = (not torch.are_deterministic_algorithms_enabled()) if atomic is None else atomic
    if m == 0:
        du = torch.zeros((m, rank), device=g.device) if need_du else None
        db = torch.zeros((n, rank), device=g.device) if need_db else None
        return du, db
    # Enough programs to fill the device: split the N loop when there are few row tiles.
    m_tiles_max = triton.cdiv(m, MIN_DY_BM)
    split = 1 if INTERPRET else max(1, min(triton.cdiv(n, 128), 264 // m_tiles_max))
    du_part = torch.zeros((split, m, rp), device=g.device, dtype=_buf_dtype(g.dtype)) if need_du else None
    if need_db:
        db_rows = 1 if atomic else m_tiles_max
        db_part = torch.zeros((db_rows, n, rp), device=g.device, dtype=_buf_dtype(g.dtype))
    else:
        db_part = None
    dummy = g

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BM"]), split)

    _dy_pass_kernel[grid](
        g, b if need_du else dummy, u if need_db else dummy, scale,
        # Unused outputs get their own scratch: autotune's reset_to_zero=["DB"] zeroes whatever DB is.
        du_part if need_du else torch.zeros(1, device=g.device),
        db_part if need_db else torch.zeros(1, device=g.device),
        m, n, rank, min(next_pow2(m), 8192),
        *g.stride(), *_strides(b), *_strides(u),
        (du_part.stride(0) if need_du else 0), (du_part.stride(1) if need_du else 0),
        (db_part.stride(0) if need_db else 0), (db_part.stride(1) if need_db else 0),
        NEED_DU=need_du, NEED_DB=need_db, ATOMIC=atomic,
        UPCAST=_upcast(g.dtype), PRECISION=_precision(g.dtype), ACC=_acc(g.dtype), RP=rp,
    )
    du = du_part.sum(0)[:, :rank] if need_du else None
    db = db_part.sum(0)[:, :rank] if need_db else None
    return du, db


def colsum2(g: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(Σ_m G, Σ_m G ⊙ Z)`` in fp32: per-row-block partials then one deterministic sum."""
    m, n = g.shape
    if m == 0:
        zero = torch.zeros(n, device=g.device)
        return zero, (zero.clone() if z is not None else None)
    bm, bn = (32, 32) if INTERPRET else (64, 128)
    blocks = 1 if INTERPRET else max(1, min(triton.cdiv(m, 4 * bm), 1024 // triton.cdiv(n, bn)))
    rows = triton.cdiv(m, blocks)
    sg = torch.empty((blocks, n), device=g.device, dtype=_buf_dtype(g.dtype))
    sgz = torch.empty((blocks, n), device=g.device, dtype=_buf_dtype(g.dtype)) if z is not None else None
    _colsum2_kernel[(blocks, triton.cdiv(n, bn))](
        g, z if z is not None else g, sg, sgz if sgz is not None else sg, m, n, rows,
        *g.stride(), *_strides(z), NEED_GZ=z is not None, ACC=_acc(g.dtype), BM=bm, BN=bn, num_warps=4,
    )
    return sg.sum(0), (sgz.sum(0) if sgz is not None else None)


def cov_tri(c: Tensor, x: Tensor, *, row_mask: Tensor | None = None, weight: Tensor | None = None,
            mirror: bool = True) -> Tensor:
    """``C += w · X̂ᵀX̂`` on the upper-triangle tiles of fp32 ``C`` (mirrored to the lower ones
    when ``mirror``); ``X̂`` = rows of ``x`` (T, d) where ``row_mask`` is non-zero."""
    t, d = x.shape
    if t == 0 or d == 0:
        return c
    row_mask = row_mask.contiguous() if row_mask is not None else None  # read with unit stride
    def grid(meta: dict) -> tuple[int]:
        nt = triton.cdiv(d, meta["BD"])
        return (nt * (nt + 1) // 2,)

    _cov_tri_kernel[grid](
        x, row_mask if row_mask is not None else x, weight if weight is not None else c, c,
        t, d, next_pow2(d), *x.stride(), *c.stride(),
        HAS_ROWMASK=row_mask is not None, HAS_W=weight is not None, MIRROR=mirror,
        UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype), ACC=_acc(c.dtype),
    )
    return c
