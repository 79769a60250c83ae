/* Quantized sparse decode for edge: one call per token (see edge/sparse/qnative.py).
 *
 * Portable C11 + OpenMP, no intrinsics: the compiler vectorizes the inner loops for the
 * machine it runs on (AVX2, NEON, ...). Built at first use with the system compiler and
 * cached under EDGE_CACHE. The data layout and the formulas are those of
 * edge/sparse/qformat.py and edge/sparse/qkernels.py (the numba fallback, same tests).
 *
 * A matrix row j (one input channel of Wᵀ) is `row_bytes` of values (int8, or two 4-bit
 * values per byte) then its float16 scales, one per 32 values; rows are `stride` apart.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { FMT, NROWS, NCOLS, OFF, STRIDE, ROWB, NBLK, COFF, SOFF, NCOL }; /* SOFF < 0: no output scales */
enum { MQ, MK, MV, MO, MGATE, MUP, MDOWN, NMOD };
#define AHEAD 8 /* rows ahead that are prefetched while four are summed */
typedef uint8_t v16u8 __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16f __attribute__((vector_size(64)));
/* uint8 -> int32 -> float: a direct uint8 -> float conversion is scalarized by GCC 12 */
#define TO_F32(q) __builtin_convertvector(__builtin_convertvector((q), v16i), v16f)

typedef struct {
    const uint8_t *base;   /* the rows store's data */
    const int64_t *mats;   /* (n_mats, NCOL) matrix table */
    const uint8_t *lbase;  /* the low-rank store's data (or base) */
    const int64_t *lmats;
    const int64_t *lin;    /* (L, 7) matrix ids */
    const int64_t *norms;  /* (L, 2) float offsets of attn_norm, ffn_norm */
    const int64_t *glob;   /* embedding matrix, output matrix, output_norm offset */
    const float *thr;      /* (L, 7) thresholds, < 0 keeps every channel */
    const int64_t *lr;     /* (L, 7, 2) low-rank A and B ids, or -1 */
    const int64_t *ranks;  /* (L, 7) */
    int64_t n_layers, n_embd, n_head, n_head_kv, head_dim, n_rot, n_ff, n_vocab;
    float eps;
} model_t;

typedef struct {
    const float *cos, *sin; /* (n_ctx, n_rot / 2) */
    float *k, *v;           /* (L, n_ctx, n_kv, hd) */
    int64_t n_ctx;
} kv_t;

typedef struct {
    float *x, *h, *xs, *outs, *zs, *att, *scores, *acc, *coef;
    int32_t *acts, *inacts, *iota;
    int64_t max_in, max_out, max_r, max_nb;
} ws_t;

static inline float h2f(uint16_t h) {
    /* float16 bits -> float32 for zero and normal values (the store holds no others) */
    uint32_t em = h & 0x7fffu;
    uint32_t bits = ((uint32_t)(h & 0x8000u) << 16) | ((em << 13) + 0x38000000u);
    bits &= 0u - (uint32_t)(em != 0);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline void prefetch(const void *p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 0, 3);
#else
    (void)p;
#endif
}

static inline const uint8_t *row_at(const uint8_t *base, const int64_t *m, int64_t j) {
    return base + m[OFF] + j * m[STRIDE];
}

/* c[b] = x_j * scale_b: a row's per-block multipliers, widened in one vector loop */
static void coefs(const uint8_t *row, int64_t rb, float xj, int64_t b0, int64_t b1, float *restrict c) {
    const uint16_t *s = (const uint16_t *)(row + rb);
    for (int64_t b = b0; b < b1; b++) c[b] = xj * h2f(s[b]);
}

static void prefetch_row(const uint8_t *row, int64_t from, int64_t to) {
    for (int64_t o = from; o < to; o += 64) prefetch(row + o);
}

/* out[32 b0 : 32 b1] += sum over a in [a0, a1) of x[idx[a]] * row idx[a] */
static void accum(const uint8_t *base, const int64_t *m, const float *x, const int32_t *idx,
                  int64_t a0, int64_t a1, float *restrict out, int64_t b0, int64_t b1,
                  float *restrict c) {
    const int64_t rb = m[ROWB], nbm = m[NBLK];
    const int q8 = m[FMT] == 0;
    const int64_t vb = q8 ? 32 : 16; /* value bytes per block */
    int64_t a = a0;
    for (; a + 4 <= a1; a += 4) {
        const uint8_t *r[4], *n[4];
        int64_t an = a + AHEAD < a1 - 4 ? a + AHEAD : a1 - 4;
        for (int u = 0; u < 4; u++) {
            r[u] = row_at(base, m, idx[a + u]);
            n[u] = row_at(base, m, idx[an + u]);
            prefetch_row(n[u], rb + 2 * b0, rb + 2 * b1); /* the next rows' scales */
            coefs(r[u], rb, x[idx[a + u]], b0, b1, c + u * nbm);
        }
        const float *c0 = c, *c1 = c + nbm, *c2 = c + 2 * nbm, *c3 = c + 3 * nbm;
        for (int64_t b = b0; b < b1; b++) {
            const float k0 = c0[b], k1 = c1[b], k2 = c2[b], k3 = c3[b];
            float *restrict ob = out + b * 32;
            if (((b * vb) & 63) == 0)
                for (int u = 0; u < 4; u++) prefetch(n[u] + b * vb);
            if (q8) {
                const int8_t *p0 = (const int8_t *)r[0] + b * 32, *p1 = (const int8_t *)r[1] + b * 32;
                const int8_t *p2 = (const int8_t *)r[2] + b * 32, *p3 = (const int8_t *)r[3] + b * 32;
                for (int i = 0; i < 32; i++)
                    ob[i] += (k0 * p0[i] + k1 * p1[i]) + (k2 * p2[i] + k3 * p3[i]);
            } else {
                /* value = (nibble - 8) * d: the -8 of four rows folded into one constant.
                 * Written with the compilers' generic vectors (GCC >= 9, clang; any target):
                 * auto-vectorized, the packed nibbles got narrow vectors (2x slower) */
                const float off8 = -8.0f * ((k0 + k1) + (k2 + k3));
                v16f lo = {0}, hi = {0};
                const float kk[4] = {k0, k1, k2, k3};
                for (int v = 0; v < 4; v++) {
                    v16u8 q;
                    memcpy(&q, r[v] + b * 16, 16);
                    lo += kk[v] * TO_F32(q & 15);
                    hi += kk[v] * TO_F32(q >> 4);
                }
                v16f o0, o1;
                memcpy(&o0, ob, 64);
                memcpy(&o1, ob + 16, 64);
                o0 += lo + off8;
                o1 += hi + off8;
                memcpy(ob, &o0, 64);
                memcpy(ob + 16, &o1, 64);
            }
        }
    }
    for (; a < a1; a++) {
        const uint8_t *r0 = row_at(base, m, idx[a]);
        coefs(r0, rb, x[idx[a]], b0, b1, c);
        for (int64_t b = b0; b < b1; b++) {
            const float k0 = c[b];
            float *restrict ob = out + b * 32;
            if (q8) {
                const int8_t *p0 = (const int8_t *)r0 + b * 32;
                for (int i = 0; i < 32; i++) ob[i] += k0 * p0[i];
            } else {
                const uint8_t *p0 = r0 + b * 16;
                for (int i = 0; i < 16; i++) {
                    ob[i] += k0 * (p0[i] & 15) - 8.0f * k0;
                    ob[i + 16] += k0 * (p0[i] >> 4) - 8.0f * k0;
                }
            }
        }
    }
}

void edge_accum(const uint8_t *base, const int64_t *m, const float *x, const int32_t *idx,
                int64_t a0, int64_t a1, float *out, int64_t b0, int64_t b1, float *c) {
    accum(base, m, x, idx, a0, a1, out, b0, b1, c);
}

int64_t edge_select(const float *x, const float *c, float t, int64_t n, int32_t *act,
                    int32_t *inact, int64_t *n_inact) {
    int64_t na = 0, ni = 0;
    if (t < 0) {
        for (int64_t j = 0; j < n; j++) act[j] = (int32_t)j;
        *n_inact = 0;
        return n;
    }
    for (int64_t j = 0; j < n; j++) {
        if (fabsf(x[j] * c[j]) > t) act[na++] = (int32_t)j;
        else inact[ni++] = (int32_t)j;
    }
    *n_inact = ni;
    return na;
}

/* out[(r - r0) * width + c - 32 b0] = value of row r, column c (prefill's slabs) */
void edge_dequant(const uint8_t *base, const int64_t *m, int64_t r0, int64_t r1, int64_t b0,
                  int64_t b1, float *out) {
    const int64_t width = 32 * (b1 - b0), rb = m[ROWB];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = row_at(base, m, r);
        const uint16_t *s = (const uint16_t *)(row + rb);
        float *o = out + (r - r0) * width;
        for (int64_t b = b0; b < b1; b++) {
            const float d = h2f(s[b]);
            float *ob = o + (b - b0) * 32;
            if (m[FMT] == 0) {
                const int8_t *p = (const int8_t *)row + b * 32;
                for (int i = 0; i < 32; i++) ob[i] = d * p[i];
            } else {
                const uint8_t *p = row + b * 16;
                for (int i = 0; i < 16; i++) {
                    ob[i] = d * ((p[i] & 15) - 8);
                    ob[i + 16] = d * ((p[i] >> 4) - 8);
                }
            }
        }
    }
}

/* ---- the decode step ---------------------------------------------------------------- */
typedef struct {
    int64_t ids[3], n_act[3], n_inact[3], b_ids[3], rank[3];
    int G;
} group_t;

static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    const float inv = (float)(1.0 / sqrt(s / n + eps));
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

static void rope(float *v, int64_t heads, int64_t hd, int64_t n_rot, const float *cs, const float *sn) {
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < n_rot / 2; i++) {
            float *p = v + h * hd + 2 * i;
            const float x0 = p[0], x1 = p[1];
            p[0] = x0 * cs[i] - x1 * sn[i];
            p[1] = x0 * sn[i] + x1 * cs[i];
        }
}

/* serial: masks and low-rank inputs of modules m0 .. m0+G-1 of layer il on input x */
static void prepare(const model_t *M, ws_t *W, group_t *g, int64_t *counts, int64_t il, int m0, int G,
                    const float *x) {
    const float *f32 = (const float *)M->base;
    g->G = G;
    for (int u = 0; u < G; u++) {
        const int m = m0 + u;
        const int64_t id = M->lin[il * NMOD + m];
        const int64_t *mat = M->mats + NCOL * id;
        const int64_t n_in = mat[NROWS];
        float *xs = W->xs + u * W->max_in;
        memcpy(xs, x, n_in * sizeof(float));
        int32_t *act = W->acts + u * W->max_in, *inact = W->inacts + u * W->max_in;
        g->ids[u] = id;
        g->n_act[u] = edge_select(xs, f32 + mat[COFF], M->thr[il * NMOD + m], n_in, act, inact, &g->n_inact[u]);
        counts[(il * NMOD + m) * 2] += g->n_act[u];
        counts[(il * NMOD + m) * 2 + 1] += g->n_inact[u];
        const int64_t a_id = M->lr[(il * NMOD + m) * 2];
        g->b_ids[u] = M->lr[(il * NMOD + m) * 2 + 1];
        g->rank[u] = M->ranks[il * NMOD + m];
        if (a_id >= 0) {
            const int64_t *am = M->lmats + NCOL * a_id;
            float *z = W->zs + u * W->max_r;
            memset(z, 0, W->max_r * sizeof(float));
            accum(M->lbase, am, xs, inact, 0, g->n_inact[u], z, 0, am[NBLK], W->coef);
        }
    }
}

/* parallel: thread p sums its share of every module's active rows into its accumulator */
static void rows_share(const model_t *M, ws_t *W, const group_t *g, int p, int P) {
    for (int u = 0; u < g->G; u++) {
        const int64_t *mat = M->mats + NCOL * g->ids[u];
        const int64_t nb = mat[NBLK];
        float *a = W->acc + ((int64_t)p * 3 + u) * W->max_out;
        float *c = W->coef + (int64_t)(p + 1) * 4 * W->max_nb;
        memset(a, 0, nb * 32 * sizeof(float));
        const int64_t n = g->n_act[u];
        accum(M->base, mat, W->xs + u * W->max_in, W->acts + u * W->max_in, n * p / P, n * (p + 1) / P, a, 0, nb, c);
        if (g->b_ids[u] >= 0) {
            const int64_t r = g->rank[u];
            accum(M->lbase, M->lmats + NCOL * g->b_ids[u], W->zs + u * W->max_r, W->iota, r * p / P,
                  r * (p + 1) / P, a, 0, nb, c);
        }
    }
}

/* out[o] *= s[o] for the matrix's per-output scales, when it has them */
static void scale_out(const model_t *M, const int64_t *mat, float *out, int64_t o0, int64_t o1) {
    if (mat[SOFF] < 0) return;
    const float *s = (const float *)M->base + mat[SOFF];
    for (int64_t o = o0; o < o1; o++) out[o] *= s[o];
}

static void reduce(const model_t *M, ws_t *W, const group_t *g, int P) {
    for (int u = 0; u < g->G; u++) {
        const int64_t *mat = M->mats + NCOL * g->ids[u];
        const int64_t n = mat[NBLK] * 32;
        float *out = W->outs + u * W->max_out;
        memcpy(out, W->acc + (int64_t)u * W->max_out, n * sizeof(float));
        for (int p = 1; p < P; p++) {
            const float *a = W->acc + ((int64_t)p * 3 + u) * W->max_out;
            for (int64_t o = 0; o < n; o++) out[o] += a[o];
        }
        scale_out(M, mat, out, 0, n);
    }
}

static void attend_head(const kv_t *kv, const model_t *M, ws_t *W, int64_t il, int64_t pos, int64_t h,
                        float *scores) {
    const int64_t hd = M->head_dim, nkv = M->n_head_kv, kvh = h / (M->n_head / nkv);
    const float *q = W->outs + h * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const float *kb = kv->k + ((il * kv->n_ctx) * nkv + kvh) * hd;
    const float *vb = kv->v + ((il * kv->n_ctx) * nkv + kvh) * hd;
    float mx = -INFINITY;
    for (int64_t s = 0; s <= pos; s++) {
        const float *kr = kb + s * nkv * hd;
        float acc = 0;
        for (int64_t i = 0; i < hd; i++) acc += q[i] * kr[i];
        scores[s] = acc * scale;
        mx = scores[s] > mx ? scores[s] : mx;
    }
    float tot = 0;
    for (int64_t s = 0; s <= pos; s++) {
        scores[s] = expf(scores[s] - mx);
        tot += scores[s];
    }
    float *o = W->att + h * hd;
    for (int64_t i = 0; i < hd; i++) o[i] = 0;
    for (int64_t s = 0; s <= pos; s++) {
        const float w = scores[s] / tot;
        const float *vr = vb + s * nkv * hd;
        for (int64_t i = 0; i < hd; i++) o[i] += w * vr[i];
    }
}

int edge_decode(const model_t *M, const kv_t *kv, ws_t *W, int64_t tok, int64_t pos, float *logits,
                int64_t *counts, int P) {
    const float *f32 = (const float *)M->base;
    const int64_t n_embd = M->n_embd, hd = M->head_dim, nkv = M->n_head_kv;
    const int64_t *emb = M->mats + NCOL * M->glob[0], *outm = M->mats + NCOL * M->glob[1];
    edge_dequant(M->base, emb, tok, tok + 1, 0, emb[NBLK], logits); /* logits as scratch */
    memcpy(W->x, logits, n_embd * sizeof(float));
    group_t g;
#ifdef _OPENMP
#pragma omp parallel num_threads(P)
#endif
    {
#ifdef _OPENMP
        const int p = omp_get_thread_num(), np = omp_get_num_threads();
#else
        const int p = 0, np = 1;
#endif
        for (int64_t il = 0; il < M->n_layers; il++) {
#ifdef _OPENMP
#pragma omp single
#endif
            {
                rms_norm(W->x, f32 + M->norms[il * 2], M->eps, n_embd, W->h);
                prepare(M, W, &g, counts, il, MQ, 3, W->h);
            }
            rows_share(M, W, &g, p, np);
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
            {
                reduce(M, W, &g, np);
                float *q = W->outs, *k = W->outs + W->max_out, *v = W->outs + 2 * W->max_out;
                const float *cs = kv->cos + pos * (M->n_rot / 2), *sn = kv->sin + pos * (M->n_rot / 2);
                rope(q, M->n_head, hd, M->n_rot, cs, sn);
                rope(k, nkv, hd, M->n_rot, cs, sn);
                const int64_t at = (il * kv->n_ctx + pos) * nkv * hd;
                memcpy(kv->k + at, k, nkv * hd * sizeof(float));
                memcpy(kv->v + at, v, nkv * hd * sizeof(float));
            }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t h = 0; h < M->n_head; h++)
                attend_head(kv, M, W, il, pos, h, W->scores + (int64_t)p * kv->n_ctx);
#ifdef _OPENMP
#pragma omp single
#endif
            prepare(M, W, &g, counts, il, MO, 1, W->att);
            rows_share(M, W, &g, p, np);
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
            {
                reduce(M, W, &g, np);
                for (int64_t i = 0; i < n_embd; i++) W->x[i] += W->outs[i];
                rms_norm(W->x, f32 + M->norms[il * 2 + 1], M->eps, n_embd, W->h);
                prepare(M, W, &g, counts, il, MGATE, 2, W->h);
            }
            rows_share(M, W, &g, p, np);
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
            {
                reduce(M, W, &g, np);
                float *gt = W->outs, *up = W->outs + W->max_out, *hid = W->outs + 2 * W->max_out;
                for (int64_t i = 0; i < M->n_ff; i++) hid[i] = gt[i] / (1.0f + expf(-gt[i])) * up[i];
                prepare(M, W, &g, counts, il, MDOWN, 1, hid);
            }
            rows_share(M, W, &g, p, np);
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
            {
                reduce(M, W, &g, np);
                for (int64_t i = 0; i < n_embd; i++) W->x[i] += W->outs[i];
            }
        }
#ifdef _OPENMP
#pragma omp single
#endif
        {
            rms_norm(W->x, f32 + M->glob[2], M->eps, n_embd, W->h);
            for (int64_t j = 0; j < n_embd; j++) W->acts[j] = (int32_t)j;
        }
        /* the output layer's rows are long (one value per vocabulary entry): split columns */
        const int64_t nb = outm[NBLK], b0 = nb * p / np, b1 = nb * (p + 1) / np;
        memset(logits + b0 * 32, 0, (b1 - b0) * 32 * sizeof(float));
        accum(M->base, outm, W->h, W->acts, 0, n_embd, logits, b0, b1, W->coef + (int64_t)(p + 1) * 4 * W->max_nb);
        scale_out(M, outm, logits, b0 * 32, b1 * 32);
    }
    return 0;
}

int edge_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---- building the rows (edge/sparse/qrows.py; qformat.py is the numpy reference) ------ */
/* float32 -> float16 bits, round to nearest even; nonzero values below 2^-14 become 2^-14
 * (qformat._f16_scale: the store holds no subnormals). Scales never reach the f16 max. */
static uint16_t f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax == 0) return (uint16_t)sign;
    if (ax < 0x38800000u) ax = 0x38800000u;
    ax += 0xfffu + ((ax >> 13) & 1u);
    uint32_t h = (ax - 0x38000000u) >> 13;
    if (h > 0x7bffu) h = 0x7bffu;
    return (uint16_t)(sign | h);
}

/* Row r of the matrix to quantize is src[r * rs + c * cs] for c < n_cols (rs = 1, cs = n_in
 * reads Wᵀ's rows straight out of W). Writes values then scales at dst + r * stride
 * (n_cols zero-padded to 32 * nb), the row's L2 norm to norms[r] when norms is not NULL,
 * and adds Σ (dequantized − w)² and Σ w² to err[0], err[1]. fmt 0: q8, 1: q4. */
void edge_quantize(const float *src, int64_t rs, int64_t cs, int64_t n_rows, int64_t n_cols,
                   int fmt, int64_t nb, int64_t rb, int64_t stride, uint8_t *dst, float *norms,
                   double *err, int P) {
    double e_tot = 0, w_tot = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(P) schedule(static) reduction(+ : e_tot, w_tot)
#endif
    for (int64_t r = 0; r < n_rows; r++) {
        float v[32];
        uint8_t *row = dst + r * stride;
        uint16_t *sc = (uint16_t *)(row + rb);
        double nrm = 0;
        for (int64_t b = 0; b < nb; b++) {
            float amax = 0, pick = 0;
            for (int i = 0; i < 32; i++) {
                const int64_t c = b * 32 + i;
                v[i] = c < n_cols ? src[r * rs + c * cs] : 0.0f;
                const float a = fabsf(v[i]);
                if (a > amax) { amax = a; pick = v[i]; } /* the first of equal magnitudes */
                nrm += (double)v[i] * v[i];
            }
            const uint16_t hd = f2h(fmt == 0 ? amax / 127.0f : pick / -8.0f);
            sc[b] = hd;
            const float d = h2f(hd), inv = d != 0 ? 1.0f / d : 0.0f;
            for (int i = 0; i < 32; i++) {
                float back;
                if (fmt == 0) {
                    float q = rintf(v[i] * inv);
                    q = q > 127 ? 127 : (q < -127 ? -127 : q);
                    row[b * 32 + i] = (uint8_t)(int8_t)q;
                    back = q * d;
                } else {
                    float q = floorf(v[i] * inv + 8.5f);
                    q = q > 15 ? 15 : (q < 0 ? 0 : q);
                    const uint8_t u = (uint8_t)q;
                    if (i < 16) row[b * 16 + i] = u;
                    else row[b * 16 + i - 16] |= (uint8_t)(u << 4);
                    back = (q - 8) * d;
                }
                if (b * 32 + i < n_cols) {
                    e_tot += (double)(back - v[i]) * (back - v[i]);
                    w_tot += (double)v[i] * v[i];
                }
            }
        }
        if (norms) norms[r] = (float)sqrt(nrm);
    }
    err[0] += e_tot;
    err[1] += w_tot;
}
