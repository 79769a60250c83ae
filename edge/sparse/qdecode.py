"""One decode step of a Llama model over quantized rows, compiled whole (one call per token).

The Python side (edge.sparse.qengine) passes the store's flat views and tables; this
function embeds the token, runs every layer (RMSNorm, R-Sparse masks, the low-rank input
z, RoPE, attention over the KV cache, SwiGLU) and the output layer. Projections that share
an input run as one parallel region (q/k/v, o, gate/up, down, output: five fork/joins per
layer plus one), so Python is entered once per token, not once per projection.

Module order in every (n_layers, 7) table is edge.engine.weights.LINEAR_NAMES:
q, k, v, o, gate, up, down.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from edge.sparse.qkernels import (
    COFF,
    NBLK,
    NROWS,
    accum,
    dequant_rows,
    group_matvec,
    select,
    wide_matvec,
)

MQ, MK, MV, MO, MGATE, MUP, MDOWN = range(7)
# hp: the int64 hyper-parameter vector the step reads
N_LAYERS, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_ROT, N_FF, N_VOCAB = range(8)


@njit(cache=True, fastmath=True, nogil=True)
def rms_norm(x, f32, w_off, eps, out):  # pragma: no cover - compiled
    s = 0.0
    for i in range(x.shape[0]):
        s += np.float64(x[i]) * np.float64(x[i])
    inv = np.float32(1.0 / np.sqrt(s / x.shape[0] + eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * inv * f32[w_off + i]


@njit(cache=True, fastmath=True, nogil=True)
def rope(v, n_heads, hd, n_rot, cos, sin, pos):  # pragma: no cover - compiled
    """llama.cpp's NORM rope: rotate adjacent pairs (v[2i], v[2i+1]) by pos·θ_i."""
    for h in range(n_heads):
        base = h * hd
        for i in range(n_rot // 2):
            x0, x1 = v[base + 2 * i], v[base + 2 * i + 1]
            c, s = cos[pos, i], sin[pos, i]
            v[base + 2 * i] = x0 * c - x1 * s
            v[base + 2 * i + 1] = x0 * s + x1 * c


@njit(cache=True, fastmath=True, nogil=True)
def attend(q, kc, vc, il, pos, n_head, n_kv, hd, scores, out):  # pragma: no cover - compiled
    """Causal attention of one query over cache positions 0..pos (GQA: head h reads h // g)."""
    g = n_head // n_kv
    scale = np.float32(1.0 / np.sqrt(hd))
    for h in range(n_head):
        kv = h // g
        qb = h * hd
        mx = np.float32(-np.inf)
        for s in range(pos + 1):
            acc = np.float32(0.0)
            for i in range(hd):
                acc += q[qb + i] * kc[il, s, kv, i]
            acc *= scale
            scores[s] = acc
            mx = max(mx, acc)
        tot = np.float32(0.0)
        for s in range(pos + 1):
            e = np.exp(scores[s] - mx)
            scores[s] = e
            tot += e
        inv = np.float32(1.0) / tot
        for i in range(hd):
            out[qb + i] = 0.0
        for s in range(pos + 1):
            w = scores[s] * inv
            for i in range(hd):
                out[qb + i] += w * vc[il, s, kv, i]


@njit(cache=True, fastmath=True, nogil=True)
def _prepare(w, lr, buf, counts, mid, t, x, g, il, m):  # pragma: no cover - compiled
    """Mask module m's input into slot g of the group; its low-rank input z when it has one."""
    u8, i8, u16, f32, mats = w
    lu8, li8, lu16, lmats, lr_ids, ranks = lr
    xs, acts, inacts, n_act, zs = buf[2], buf[3], buf[4], buf[12], buf[6]
    mat = mats[mid]
    n_in = mat[NROWS]
    for j in range(n_in):
        xs[g, j] = x[j]
    na, ni = select(x, f32, mat[COFF], t, n_in, acts[g], inacts[g])
    n_act[g] = na
    counts[il, m, 0] += na
    counts[il, m, 1] += ni
    a_id = lr_ids[il, m, 0]
    if a_id >= 0:
        z = zs[g]
        amat = lmats[a_id]
        for i in range(z.shape[0]):
            z[i] = 0.0
        accum(lu8, li8, lu16, amat, x, inacts[g], 0, ni, z, 0, amat[NBLK])


@njit(cache=True, fastmath=True, nogil=True)
def _group(w, lr, model, buf, counts, il, m0, G, x, P):  # pragma: no cover - compiled
    """Modules m0 .. m0+G−1 of layer il on input x, one parallel region; results in outs[:G]."""
    u8, i8, u16, f32, mats = w
    lu8, li8, lu16, lmats, lr_ids, ranks = lr
    lin, thr = model[0], model[3]
    ids, b_ids, rk = buf[13], buf[14], buf[15]
    for g in range(G):
        m = m0 + g
        _prepare(w, lr, buf, counts, lin[il, m], thr[il, m], x, g, il, m)
        ids[g], b_ids[g], rk[g] = lin[il, m], lr_ids[il, m, 1], ranks[il, m]
    group_matvec(u8, i8, u16, f32, mats, ids[:G], buf[2], buf[3], buf[12], buf[5], lu8, li8, lu16, lmats,
                 b_ids[:G], buf[6], rk, buf[9], buf[10], P)


@njit(cache=True, fastmath=True, nogil=True)
def decode_step(tok, pos, w, lr, model, eps, kv, buf, counts, P):  # pragma: no cover - compiled
    """Run token `tok` at position `pos`; the next-token logits land in buf's logits[0].

    w = (u8, i8, u16, f32, mats): the rows store; lr = (the same for the low-rank store,
    lr_ids[il, m] = (A id, B id) or −1, ranks[il, m]); model = (lin[il, m] matrix ids,
    norms[il] = f32 offsets of attn_norm and ffn_norm, glob = (embedding matrix, output
    matrix, output_norm offset), thr[il, m] thresholds (< 0: dense), hp); kv = (cos, sin,
    k cache, v cache); counts[il, m] += (active, inactive) input channels.
    """
    u8, i8, u16, f32, mats = w
    lin, norms, glob, thr, hp = model
    cos, sin, kc, vc = kv
    x, h, outs, att, scores, logits = buf[0], buf[1], buf[5], buf[7], buf[8], buf[11]
    n_layers, n_embd, n_head, n_kv, hd = hp[N_LAYERS], hp[N_EMBD], hp[N_HEAD], hp[N_HEAD_KV], hp[HEAD_DIM]
    n_rot, n_ff = hp[N_ROT], hp[N_FF]
    emb = mats[glob[0]]
    dequant_rows(u8, i8, u16, emb, tok, tok + 1, 0, emb[NBLK], logits)  # logits as scratch
    for i in range(n_embd):
        x[i] = logits[0, i]
    for il in range(n_layers):
        rms_norm(x, f32, norms[il, 0], eps, h)
        _group(w, lr, model, buf, counts, il, MQ, 3, h, P)  # q, k, v: one input, one region
        q, k, v = outs[0], outs[1], outs[2]
        rope(q, n_head, hd, n_rot, cos, sin, pos)
        rope(k, n_kv, hd, n_rot, cos, sin, pos)
        for j in range(n_kv * hd):
            kc[il, pos, j // hd, j % hd] = k[j]
            vc[il, pos, j // hd, j % hd] = v[j]
        attend(q, kc, vc, il, pos, n_head, n_kv, hd, scores, att)
        _group(w, lr, model, buf, counts, il, MO, 1, att, P)
        for i in range(n_embd):
            x[i] += outs[0, i]
        rms_norm(x, f32, norms[il, 1], eps, h)
        _group(w, lr, model, buf, counts, il, MGATE, 2, h, P)  # gate, up: one region
        for i in range(n_ff):
            g = outs[0, i]
            outs[2, i] = g / (np.float32(1.0) + np.exp(-g)) * outs[1, i]
        _group(w, lr, model, buf, counts, il, MDOWN, 1, outs[2], P)
        for i in range(n_embd):
            x[i] += outs[0, i]
    rms_norm(x, f32, glob[2], eps, h)
    acts = buf[3]
    for j in range(n_embd):
        acts[0, j] = j
    wide_matvec(u8, i8, u16, f32, mats[glob[1]], h, acts[0], n_embd, logits[0], P)
