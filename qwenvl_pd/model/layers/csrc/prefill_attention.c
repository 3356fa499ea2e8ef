/* Prefill (and vision) attention in bf16 on CPUs with the bf16 dot instruction (AVX512-BF16).
 *
 * Why: without AMX, torch's CPU flash kernel computes bf16 attention at the float32 GEMM rate
 * (~80 GFLOP/s a core here, against ~200 for bf16 GEMMs), and long prompts and full-attention
 * vision blocks spend most of their time in it. Here scores and weighted sums run on the dot
 * instruction: K and V of each KV head are first repacked (once per call, read through the
 * sequence's block table, so nothing is gathered out of a paged cache) into the instruction's
 * pair-interleaved layout; then each task (one KV head x QB query positions, with the G heads that
 * share the KV head, so each key block is loaded once for all of them) runs an online softmax
 * over blocks of KB keys. Scores and sums stay in float32; the softmax weights are rounded to bf16
 * before they meet V, as torch's bf16 kernels round them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const uint16_t *q, *k, *v;
    uint16_t *out;
    const int64_t *table;                 /* block ids holding the keys, in order */
    int64_t q_row, q_head, o_row, o_head; /* strides in elements */
    int64_t k_block, k_head, k_token;
    int64_t v_block, v_head, v_token;
    int n, ctx, heads, kv_heads, dim, block_size, causal, threads;
    float scale;
} Args;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define KB 64     /* keys a block: four 16-wide vectors */
#define ROWS 256  /* query rows (positions x heads) a task holds */
#define MAXD 256

typedef struct {
    const Args *a;
    uint32_t *kp, *vp; /* packed K, V of all KV heads (pairs of bf16 as one 32-bit word) */
    int G, D, Dv, ctxp;
} Plan;

static const uint16_t *k_row(const Args *a, int h, int64_t t) {
    return a->k + a->table[t / a->block_size] * a->k_block + h * a->k_head
           + (t % a->block_size) * a->k_token;
}

static const uint16_t *v_row(const Args *a, int h, int64_t t) {
    return a->v + a->table[t / a->block_size] * a->v_block + h * a->v_head
           + (t % a->block_size) * a->v_token;
}

/* K of 16 keys as [D/2 pairs][16 keys] words: one vector holds a dim pair of 16 keys */
static void pack_k(const Plan *p, int h, int group) {
    const Args *a = p->a;
    uint32_t *dst = p->kp + ((int64_t)h * p->ctxp / 16 + group) * (p->D / 2) * 16;
    for (int j = 0; j < 16; j++) {
        int64_t t = (int64_t)group * 16 + j;
        const uint16_t *row = t < a->ctx ? k_row(a, h, t) : NULL;
        for (int dp = 0; dp < p->D / 2; dp++) {
            uint32_t w = 0;
            if (row) memcpy(&w, row + 2 * dp, 4);
            dst[dp * 16 + j] = w;
        }
    }
}

/* V of 2 keys as [Dv/16][16 dims] words: one vector holds 16 dims of a key pair */
static void pack_v(const Plan *p, int h, int pair) {
    const Args *a = p->a;
    uint32_t *dst = p->vp + ((int64_t)h * p->ctxp / 2 + pair) * p->Dv;
    int64_t t = 2 * (int64_t)pair;
    const uint16_t *r0 = t < a->ctx ? v_row(a, h, t) : NULL;
    const uint16_t *r1 = t + 1 < a->ctx ? v_row(a, h, t + 1) : NULL;
    for (int d = 0; d < p->Dv; d++) {
        uint32_t lo = r0 && d < p->D ? r0[d] : 0, hi = r1 && d < p->D ? r1[d] : 0;
        dst[d] = lo | hi << 16;
    }
}

static inline __m512 bcast(const uint16_t *pair) {
    int32_t w;
    memcpy(&w, pair, 4);
    return _mm512_castsi512_ps(_mm512_set1_epi32(w));
}

#define DP(acc, x, y) (acc) = _mm512_dpbf16_ps((acc), (__m512bh)(x), (__m512bh)(y))

/* s[r][0:KB] = scale * q_r . k for 4 rows and the KB keys of block kb */
static void scores4(const Plan *p, const uint16_t *const *q, const uint32_t *kblock, float *s,
                    float scale) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    int pairs = p->D / 2;
    for (int dp = 0; dp < pairs; dp++) {
        __m512 k[4];
        for (int c = 0; c < 4; c++)
            k[c] = _mm512_castsi512_ps(_mm512_loadu_si512(kblock + (c * pairs + dp) * 16));
        for (int r = 0; r < 4; r++) {
            __m512 b = bcast(q[r] + 2 * dp);
            for (int c = 0; c < 4; c++) DP(acc[r][c], b, k[c]);
        }
    }
    __m512 sc = _mm512_set1_ps(scale);
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + r * KB + 16 * c, _mm512_mul_ps(acc[r][c], sc));
}

/* o[r][c0*16 : (c0+nv)*16] += w_r . V over the block's `pairs` key pairs, for 4 rows */
static void weighted4(const Plan *p, const uint16_t *w, const uint32_t *vblock, float *o, int c0,
                      int nv, int pairs) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < nv; c++) acc[r][c] = _mm512_loadu_ps(o + r * p->Dv + (c0 + c) * 16);
    for (int kp = 0; kp < pairs; kp++) {
        __m512 v[4];
        for (int c = 0; c < nv; c++)
            v[c] = _mm512_castsi512_ps(_mm512_loadu_si512(vblock + kp * p->Dv + (c0 + c) * 16));
        for (int r = 0; r < 4; r++) {
            __m512 b = bcast(w + r * KB + 2 * kp);
            for (int c = 0; c < nv; c++) DP(acc[r][c], b, v[c]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < nv; c++) _mm512_storeu_ps(o + r * p->Dv + (c0 + c) * 16, acc[r][c]);
}

/* e^x for x <= 0, 16 at a time; -inf (a masked key) gives exactly 0 */
static inline __m512 exp16(__m512 x) {
    __m512 c = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), c);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-06f), r);
    static const float coef[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    __m512 poly = _mm512_set1_ps(coef[0]);
    for (int i = 1; i < 8; i++) poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(coef[i]));
    __mmask16 masked = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
    return _mm512_maskz_mov_ps(~masked, _mm512_scalef_ps(poly, n));
}

/* masks keys at or past each row's end, turns scores into bf16 weights, updates m, l, o */
static void softmax_block(const Plan *p, float *s, uint16_t *w, const int64_t *end, int64_t k0,
                          float *m, float *l, float *o, int rows) {
    for (int r = 0; r < rows; r++) {
        float *sr = s + r * KB;
        for (int64_t j = end[r] > k0 ? end[r] - k0 : 0; j < KB; j++) sr[j] = -INFINITY;
        __m512 mx = _mm512_set1_ps(m[r]);
        for (int c = 0; c < KB; c += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + c));
        float top = _mm512_reduce_max_ps(mx);
        __m512 sum = _mm512_setzero_ps(), topv = _mm512_set1_ps(top);
        for (int c = 0; c < KB; c += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + c), topv));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(w + r * KB + c), (__m256i)_mm512_cvtneps_pbh(e));
        }
        float corr = m[r] == -INFINITY ? 0.0f : expf(m[r] - top);
        l[r] = l[r] * corr + _mm512_reduce_add_ps(sum);
        m[r] = top;
        if (corr != 1.0f)
            for (int d = 0; d < p->Dv; d++) o[r * p->Dv + d] *= corr;
    }
}

typedef struct {
    float *s, *o, *m, *l;
    uint16_t *w;
    const uint16_t *q[ROWS];
    int64_t end[ROWS]; /* keys each row sees */
} Scratch;

static void store_rows(const Plan *p, const Scratch *x, int h, int p0, int rows) {
    const Args *a = p->a;
    for (int r = 0; r < rows; r++) {
        uint16_t *dst = a->out + (int64_t)(p0 + r / p->G) * a->o_row + (int64_t)(h * p->G + r % p->G) * a->o_head;
        float inv = x->l[r] > 0 ? 1.0f / x->l[r] : 0.0f;
        for (int d = 0; d < p->D; d += 16) {
            __mmask16 k = p->D - d >= 16 ? 0xffff : (__mmask16)((1u << (p->D - d)) - 1);
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x->o + r * p->Dv + d), _mm512_set1_ps(inv));
            _mm256_mask_storeu_epi16(dst + d, k, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

/* one task: KV head h, query positions [p0, p0 + count) with all G heads */
static void attend(const Plan *p, Scratch *x, int h, int p0, int count) {
    const Args *a = p->a;
    int rows = count * p->G, padded = (rows + 3) & ~3;
    int64_t last = 0;
    for (int r = 0; r < padded; r++) {
        int rr = r < rows ? r : 0; /* padding rows repeat row 0; their results are dropped */
        int pos = p0 + rr / p->G;
        x->q[r] = a->q + (int64_t)pos * a->q_row + (int64_t)(h * p->G + rr % p->G) * a->q_head;
        x->end[r] = a->causal ? (int64_t)a->ctx - a->n + pos + 1 : a->ctx;
        last = x->end[r] > last ? x->end[r] : last;
        x->m[r] = -INFINITY, x->l[r] = 0;
    }
    memset(x->o, 0, sizeof(float) * padded * p->Dv);
    const uint32_t *kh = p->kp + (int64_t)h * p->ctxp * p->D / 2;
    const uint32_t *vh = p->vp + (int64_t)h * p->ctxp / 2 * p->Dv;
    for (int64_t k0 = 0; k0 < last; k0 += KB) {
        const uint32_t *kblock = kh + k0 * p->D / 2;
        for (int r = 0; r < padded; r += 4) scores4(p, x->q + r, kblock, x->s + r * KB, a->scale);
        softmax_block(p, x->s, x->w, x->end, k0, x->m, x->l, x->o, padded);
        int pairs = (int)((last - k0 < KB ? last - k0 : KB) + 1) / 2;
        for (int r = 0; r < padded; r += 4)
            for (int c0 = 0; c0 < p->Dv / 16; c0 += 4)
                weighted4(p, x->w + r * KB, vh + k0 / 2 * p->Dv, x->o + r * p->Dv, c0,
                          p->Dv / 16 - c0 < 4 ? p->Dv / 16 - c0 : 4, pairs);
    }
    store_rows(p, x, h, p0, rows);
}

static void scratch_init(Scratch *x, const Plan *p) {
    x->s = aligned_alloc(64, sizeof(float) * ROWS * KB);
    x->o = aligned_alloc(64, sizeof(float) * ROWS * p->Dv);
    x->m = malloc(sizeof(float) * ROWS), x->l = malloc(sizeof(float) * ROWS);
    x->w = aligned_alloc(64, sizeof(uint16_t) * ROWS * KB);
}

static void scratch_free(Scratch *x) { free(x->s), free(x->o), free(x->m), free(x->l), free(x->w); }

static int run(const Args *a) {
    Plan p = {a, NULL, NULL, a->heads / a->kv_heads, a->dim, (a->dim + 15) & ~15,
              (a->ctx + KB - 1) / KB * KB};
    int span = ROWS / p.G, blocks = (a->n + span - 1) / span, tasks = blocks * a->kv_heads;
    int threads = a->threads < 1 ? 1 : a->threads, groups = p.ctxp / 16;
    p.kp = aligned_alloc(64, (size_t)a->kv_heads * p.ctxp * p.D * 2);
    p.vp = aligned_alloc(64, (size_t)a->kv_heads * p.ctxp * p.Dv * 2);
    if (!p.kp || !p.vp) return free(p.kp), free(p.vp), -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int i = 0; i < a->kv_heads * groups; i++) {
        pack_k(&p, i / groups, i % groups);
        for (int j = 0; j < 8; j++) pack_v(&p, i / groups, 8 * (i % groups) + j);
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Scratch *x = malloc(sizeof(Scratch));
        scratch_init(x, &p);
        /* the last query blocks see the most keys under a causal mask: they go first */
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < tasks; i++) {
            int b = blocks - 1 - i / a->kv_heads, start = b * span;
            attend(&p, x, i % a->kv_heads, start, a->n - start < span ? a->n - start : span);
        }
        scratch_free(x);
        free(x);
    }
    free(p.kp), free(p.vp);
    return 0;
}
#endif

/* Returns 0, or -1 where this CPU or these shapes are not the kernel's (caller falls back). */
int prefill_attention(const Args *a) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (a->heads % a->kv_heads || a->dim % 2 || a->dim > MAXD || a->heads / a->kv_heads > ROWS / 4
        || a->n < 1 || a->ctx < a->n)
        return -1;
    return run(a);
#else
    (void)a;
    return -1;
#endif
}
