"""The Triton kernels of `triton_attention` (imported only where they run: triton is optional).

Each program handles one tile of one row: `MAP` holds, per flat tile index, the tile's row
start, the row's length and the tile's first position in its row (int32, 3 per tile; tiles
past the last have length 0 and exit at once). It is computed on the device before the launch,
so a program reads its place with one load instead of searching for its row. Scores are kept in
log2 units (`scale_log2` = scale x log2(e)), so softmax is exp2.
`PRECISION` is tl.dot's input precision: "ieee" for fp32 tensors (exact, no TF32), else "tf32"
(ignored for 16-bit inputs). Tensors are (tokens, heads, dim) with the dim contiguous; `s_t`,
`s_h` are the token and head strides. Kernels are named attention_* so that profiles
(benchmarks/profile_step.py) count them as attention. The helpers are inlined by triton: the
kernels compile as if written out.
"""

import triton
import triton.language as tl


@triton.jit
def locate(MAP, tile):
    """(row start, row length, the tile's first position in its row)."""
    return tl.load(MAP + 3 * tile), tl.load(MAP + 3 * tile + 1), tl.load(MAP + 3 * tile + 2)


@triton.jit
def load_tile(PTR, start, pos, ok, head, s_t, s_h, offs_d, d_ok):
    """Positions `pos` of a row (masked by `ok`) at `head`, one head or one per position:
    (len(pos), BLOCK_D), zeros outside."""
    rows = (start + pos) * s_t + head * s_h
    return tl.load(PTR + rows[:, None] + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                   other=0.0)


@triton.jit
def store_tile(PTR, value, start, pos, ok, head, s_t, s_h, offs_d, d_ok):
    rows = (start + pos) * s_t + head * s_h
    tl.store(PTR + rows[:, None] + offs_d[None, :], value.to(PTR.dtype.element_ty),
             mask=ok[:, None] & d_ok[None, :])


@triton.jit
def probabilities(q, k, m, n, m_ok, n_ok, lse, scale_log2, PRECISION: tl.constexpr):
    """Softmax probabilities rebuilt from the forward's log2-sum-exp2, causal, zero outside."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    keep = (m[:, None] >= n[None, :]) & m_ok[:, None] & n_ok[None, :]
    return tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def attention_fwd(Q, K, V, O, LSE, MAP, scale_log2,
                  sq_t, sq_h, sk_t, sk_h, so_t, so_h, slse_h,
                  GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, TOKENS_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One tile of TOKENS_M queries for all GROUP query heads of one K/V head: the tile's
    rows are (token, head) pairs, token-major (GROUP_P, the group rounded up to a power of two,
    pads them), so every K/V tile loaded serves the whole group and the causal edge falls
    every TOKENS_M tokens instead of every 64."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    start, length, m0 = locate(MAP, tile)
    if m0 >= length:
        return
    r = tl.arange(0, TOKENS_M * GROUP_P)
    g = r % GROUP_P
    offs_m = m0 + r // GROUP_P
    head = kv_head * GROUP + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = (offs_m < length) & (g < GROUP)
    q = load_tile(Q, start, offs_m, m_ok, head, sq_t, sq_h, offs_d, d_ok)
    m_i = tl.full([TOKENS_M * GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([TOKENS_M * GROUP_P], tl.float32)
    acc = tl.zeros([TOKENS_M * GROUP_P, BLOCK_D], tl.float32)
    end = tl.minimum(length, m0 + TOKENS_M)  # causal: no key past the tile's last query
    for n0 in range(0, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < length
        # K loaded transposed (BLOCK_D, BLOCK_N), as measured on the H200
        kt = tl.load(K + (start + n)[None, :] * sk_t + kv_head * sk_h + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        s = tl.where((offs_m[:, None] >= n[None, :]) & n_ok[None, :], s, float("-inf"))
        # Every query row sees key 0 of its own row in the first block, so m_new is
        # finite from the first iteration on (padding rows included: never stored).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(V, start, n, n_ok, kv_head, sk_t, sk_h, offs_d, d_ok)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    store_tile(O, acc / l_i[:, None], start, offs_m, m_ok, head, so_t, so_h, offs_d, d_ok)
    # log2-sum-exp2 of the scaled scores: backward rebuilds P as exp2(s - lse).
    tl.store(LSE + head * slse_h + start + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def attention_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, MAP, scale_log2, scale,
                       sq_t, sq_h, sk_t, sk_h, sdo_t, sdo_h, slse_h, sdk_t, sdk_h,
                       GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr):
    """dK and dV of one key tile of one K/V head, summed over the group's query heads."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    start, length, n0 = locate(MAP, tile)
    if n0 >= length:
        return
    n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = n < length
    k = load_tile(K, start, n, n_ok, kv_head, sk_t, sk_h, offs_d, d_ok)
    v = load_tile(V, start, n, n_ok, kv_head, sk_t, sk_h, offs_d, d_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first_m = (n0 // BLOCK_M) * BLOCK_M  # causal: no query before the block's first key
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for m0 in range(first_m, length, BLOCK_M):
            m = m0 + offs_m
            m_ok = m < length
            q = load_tile(Q, start, m, m_ok, head, sq_t, sq_h, offs_d, d_ok)
            do = load_tile(DO, start, m, m_ok, head, sdo_t, sdo_h, offs_d, d_ok)
            lse = tl.load(LSE + head * slse_h + start + m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + head * slse_h + start + m, mask=m_ok, other=0.0)
            p = probabilities(q, k, m, n, m_ok, n_ok, lse, scale_log2, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    store_tile(DK, dk * scale, start, n, n_ok, kv_head, sdk_t, sdk_h, offs_d, d_ok)
    store_tile(DV, dv, start, n, n_ok, kv_head, sdk_t, sdk_h, offs_d, d_ok)


@triton.jit
def attention_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, MAP, scale_log2, scale,
                     sq_t, sq_h, sk_t, sk_h, sdo_t, sdo_h, slse_h,
                     GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of one query tile of one head (DQ has Q's strides)."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    start, length, m0 = locate(MAP, tile)
    if m0 >= length:
        return
    m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = m < length
    kv_head = head // GROUP
    q = load_tile(Q, start, m, m_ok, head, sq_t, sq_h, offs_d, d_ok)
    do = load_tile(DO, start, m, m_ok, head, sdo_t, sdo_h, offs_d, d_ok)
    lse = tl.load(LSE + head * slse_h + start + m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + head * slse_h + start + m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(length, m0 + BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < length
        k = load_tile(K, start, n, n_ok, kv_head, sk_t, sk_h, offs_d, d_ok)
        v = load_tile(V, start, n, n_ok, kv_head, sk_t, sk_h, offs_d, d_ok)
        p = probabilities(q, k, m, n, m_ok, n_ok, lse, scale_log2, PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    store_tile(DQ, dq * scale, start, m, m_ok, head, sq_t, sq_h, offs_d, d_ok)


@triton.jit(do_not_specialize=["tokens"])
def attention_bwd_delta(O, DO, DELTA, tokens, so_t, so_h, sdo_t, sdo_h, sdelta_h,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """DELTA[h, t] = sum_d O[t, h, d] * dO[t, h, d] in fp32: the softmax gradient's row term,
    read once in bf16 (no fp32 copies of O and dO)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = t < tokens
    o = load_tile(O, 0, t, t_ok, head, so_t, so_h, offs_d, offs_d < D)
    do = load_tile(DO, 0, t, t_ok, head, sdo_t, sdo_h, offs_d, offs_d < D)
    tl.store(DELTA + head * sdelta_h + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
             mask=t_ok)
