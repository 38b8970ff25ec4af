"""The Triton kernels of `triton_attention` (imported only where they run: triton is optional).

Tiles are `BLOCK_M` queries by `BLOCK_N` keys of one row; `TILES` holds each row's first tile
(R + 1 entries, the last the tile count), so a flat program index finds its row by binary
search. Scores are kept in log2 units (`scale_log2` = scale x log2(e)), so softmax is exp2.
"""

import triton
import triton.language as tl

import triton.language as tl

@triton.jit
def find_row(tile, TILES, rows):
    """The row whose tiles hold flat tile `tile`: the last r with TILES[r] <= tile
    (TILES: each row's first tile, R + 1 entries, TILES[R] = the tile count)."""
    lo = 0
    hi = rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(TILES + mid)
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid - 1)
    return lo

# Row and token counts change with every micro-batch: not specialized on, so no new variant
# compiles (or loads from triton's cache, ~0.1 s a step measured) when they do.
@triton.jit(do_not_specialize=["rows"])
def fwd(Q, K, V, O, LSE, BOUNDS, TILES, rows, scale_log2,
         sq_t, sq_h, sk_t, sk_h, so_t, so_h, slse_h,
         GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    if tile >= tl.load(TILES + rows):
        return
    row = find_row(tile, TILES, rows)
    start = tl.load(BOUNDS + row)
    length = tl.load(BOUNDS + row + 1) - start
    m0 = (tile - tl.load(TILES + row)) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < length
    kv_head = head // GROUP
    q = tl.load(Q + (start + offs_m)[:, None] * sq_t + head * sq_h + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(length, m0 + BLOCK_M)  # causal: no key past the block's last query
    for n0 in range(0, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < length
        kt = tl.load(K + (start + n)[None, :] * sk_t + kv_head * sk_h + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt) * scale_log2
        s = tl.where((offs_m[:, None] >= n[None, :]) & n_ok[None, :], s, float("-inf"))
        # Every query row sees key 0 of its own row in the first block, so m_new is
        # finite from the first iteration on (rows past the end included: never stored).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + (start + n)[:, None] * sk_t + kv_head * sk_h + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + (start + offs_m)[:, None] * so_t + head * so_h + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    # log2-sum-exp2 of the scaled scores: backward rebuilds P as exp2(s - lse).
    tl.store(LSE + head * slse_h + start + offs_m, m_i + tl.log2(l_i), mask=m_ok)

@triton.jit(do_not_specialize=["rows"])
def bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, BOUNDS, TILES, rows, scale_log2, scale,
              sq_t, sq_h, sk_t, sk_h, sdo_t, sdo_h, slse_h, sdk_t, sdk_h,
              GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    if tile >= tl.load(TILES + rows):
        return
    row = find_row(tile, TILES, rows)
    start = tl.load(BOUNDS + row)
    length = tl.load(BOUNDS + row + 1) - start
    n0 = (tile - tl.load(TILES + row)) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = n < length
    k = tl.load(K + (start + n)[:, None] * sk_t + kv_head * sk_h + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + (start + n)[:, None] * sk_t + kv_head * sk_h + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first_m = (n0 // BLOCK_M) * BLOCK_M  # causal: no query before the block's first key
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for m0 in range(first_m, length, BLOCK_M):
            m = m0 + offs_m
            m_ok = m < length
            q = tl.load(Q + (start + m)[:, None] * sq_t + head * sq_h + offs_d[None, :],
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(DO + (start + m)[:, None] * sdo_t + head * sdo_h + offs_d[None, :],
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + head * slse_h + start + m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + head * slse_h + start + m, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            keep = (m[:, None] >= n[None, :]) & m_ok[:, None] & n_ok[None, :]
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    mask = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + (start + n)[:, None] * sdk_t + kv_head * sdk_h + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + (start + n)[:, None] * sdk_t + kv_head * sdk_h + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask)

@triton.jit(do_not_specialize=["rows"])
def bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, BOUNDS, TILES, rows, scale_log2, scale,
            sq_t, sq_h, sk_t, sk_h, sdo_t, sdo_h, slse_h,
            GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    if tile >= tl.load(TILES + rows):
        return
    row = find_row(tile, TILES, rows)
    start = tl.load(BOUNDS + row)
    length = tl.load(BOUNDS + row + 1) - start
    m0 = (tile - tl.load(TILES + row)) * BLOCK_M
    m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = m < length
    kv_head = head // GROUP
    q = tl.load(Q + (start + m)[:, None] * sq_t + head * sq_h + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + (start + m)[:, None] * sdo_t + head * sdo_h + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + head * slse_h + start + m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + head * slse_h + start + m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(length, m0 + BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < length
        k = tl.load(K + (start + n)[:, None] * sk_t + kv_head * sk_h + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + (start + n)[:, None] * sk_t + kv_head * sk_h + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        keep = (m[:, None] >= n[None, :]) & m_ok[:, None] & n_ok[None, :]
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + (start + m)[:, None] * sq_t + head * sq_h + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])



@triton.jit(do_not_specialize=["tokens"])
def bwd_delta(O, DO, DELTA, tokens, so_t, so_h, sdo_t, sdo_h, sdelta_h,
              D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """DELTA[h, t] = sum_d O[t, h, d] * dO[t, h, d] in fp32: the softmax gradient's row term,
    read once in bf16 (no fp32 copies of O and dO)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (t < tokens)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + t[:, None] * so_t + head * so_h + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + t[:, None] * sdo_t + head * sdo_h + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + head * sdelta_h + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
             mask=t < tokens)
