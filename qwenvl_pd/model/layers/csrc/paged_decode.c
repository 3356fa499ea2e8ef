/* Decode attention that reads a paged KV cache in place through block tables (CPU).
 *
 * One task per (row, KV head): the heads sharing that KV head score each key row while it is in
 * L1, with an online softmax over chunks of CHUNK keys, so K and V are read once from memory
 * and nothing is copied out of the cache. Built by cpu_paged.py with -O3 -march=native. On
 * AVX512-BF16, bf16 runs the tiled path below (16 keys at a time on the bf16 dot instruction);
 * float32, and bf16 elsewhere, run the portable loops, written for the compiler to vectorise.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAXG 16   /* query heads per KV head */
#define MAXD 256  /* head_dim */
#define CHUNK 128 /* keys scored before their softmax update */

typedef struct {
    const void *q, *k, *v;
    void *out;
    const int64_t *tables, *lens;
    int64_t q_row, q_head, o_row, o_head;  /* strides in elements */
    int64_t k_block, k_head, k_token;      /* cache strides in elements, K and V alike */
    int64_t table_row;
    int rows, heads, kv_heads, dim, block_size, bf16, threads;
    float scale;
} Args;

static inline float bf2f(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* e^x for x <= 0 to float precision: 2^(x log2 e) split into 2^n * e^r, |r| <= ln2 / 2 */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    int32_t ni = (int32_t)(x * 1.44269504088896341f - 0.5f); /* x <= 0: rounds to nearest */
    float n = (float)ni;
    float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-06f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t bits = (uint32_t)(ni + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* Where the row's keys are: a table entry and a place in that block, stepped one key at a time */
typedef struct {
    const int64_t *table;
    int64_t block;
    int offset, block_size;
} Cursor;

static inline int64_t next_key(Cursor *c, int64_t k_block, int64_t k_token) {
    int64_t at = c->table[c->block] * k_block + c->offset * k_token;
    if (++c->offset == c->block_size) c->offset = 0, c->block++;
    return at;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* The tiled bf16 path. The bf16 dot instruction (vdpbf16ps) adds, in each of 16 f32 lanes, the
 * products of one bf16 pair. q.k: a tile of 16 keys leaves 16 vectors of partial sums per head,
 * summed together by one shuffle tree (30 shuffles where 16 separate reductions take 64), so a
 * head's 16 scores come out as one vector and the softmax works 16 lanes at a time. P.V: two
 * keys' V rows interleaved by unpack (pairs (v_t[d], v_t+1[d])) meet a broadcast pair of their
 * bf16 weights, so each instruction adds 2 keys x 16 dims. Numerics as the portable path: q and
 * K as stored, scores, max and sums in float32, weights rounded to bf16 (as SDPA's bf16 path
 * rounds its probabilities) only for P.V. */
#include <immintrin.h>
#define HAVE_TILED_BF16 1
#define TILE 16
#define SPAN 256 /* keys scored before their softmax update: measured better than 128 */

/* out lane t = sum of x[t]'s lanes */
static inline __m512 sum16(const __m512 *x) {
    __m512 y[8], z[4], w[2];
    for (int i = 0; i < 8; i++) /* per 128 bits: [a0+a2, b0+b2, a1+a3, b1+b3] for keys a, b */
        y[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]),
                             _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128 bits: one partial of each of 4 keys */
        __m512d a = _mm512_castps_pd(y[2 * i]), b = _mm512_castps_pd(y[2 * i + 1]);
        z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++) /* 128-bit lanes 0, 1: keys 0-3; 2, 3: keys 4-7 */
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88),
                         _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
}

/* 32 bf16 of a row: piece i of NP, the last one masked to the row's end (one masked load for
 * all: a choice of two load intrinsics made gcc 12 copy each load through the stack) */
static inline __m512i load32(const uint16_t *row, int i, int NP, __mmask32 last) {
    return _mm512_maskz_loadu_epi16(i == NP - 1 ? last : ~(__mmask32)0, row + 32 * i);
}

/* The keys PF_TILES tiles past those being worked on, whose K and V rows are fetched into L2 a
 * few keys at a time over a tile's work: a tile's 128 lines at once (head_dim 128) wait on the
 * core's few outstanding-miss slots and stall the work; fetched into L1 they crowd it */
#define PF_TILES 8
typedef struct {
    Cursor at;
    int64_t left; /* keys not yet fetched */
    const uint16_t *k, *v;
    int64_t k_block, k_token;
    int bytes, per; /* bytes of a row; keys per call */
} Ahead;

static inline void fetch(Ahead *f, int keys) {
    for (; keys > 0 && f->left > 0; keys--, f->left--) {
        int64_t o = next_key(&f->at, f->k_block, f->k_token);
        for (int i = 0; i < f->bytes; i += 64) {
            __builtin_prefetch((const char *)(f->k + o) + i, 0, 2);
            __builtin_prefetch((const char *)(f->v + o) + i, 0, 2);
        }
    }
}

/* sum16 of x[j * n + t] = q[j] . key t, for H heads (1 or 2) and n = 16 / H keys */
static inline __attribute__((always_inline)) __m512 dots(
    __m512bh (*q)[MAXD / 32], int H, const uint16_t *const *key, int NP, __mmask32 last) {
    __m512 x[TILE];
    int n = TILE / H;
    for (int t = 0; t < n; t++) {
        for (int j = 0; j < H; j++) x[j * n + t] = _mm512_setzero_ps();
        for (int i = 0; i < NP; i++) {
            __m512bh k = (__m512bh)load32(key[t], i, NP, last);
            for (int j = 0; j < H; j++) x[j * n + t] = _mm512_dpbf16_ps(x[j * n + t], q[j][i], k);
        }
    }
    return sum16(x);
}

/* s[g][t] = scale * q[g] . key t, for a tile's 16 keys; q zero-padded to NP * 32. Heads go in
 * pairs where their q fits in registers, so each K piece is loaded once for both */
static inline __attribute__((always_inline)) void score_tile(
    const uint16_t (*qb)[MAXD], const uint16_t *const *key, int G, int NP, __mmask32 last,
    float scale, float *s, Ahead *f) {
    __m512 sc = _mm512_set1_ps(scale);
    for (int g = 0; g < G;) {
        int H = NP <= 4 && g + 1 < G ? 2 : 1;
        __m512bh q[2][MAXD / 32];
        for (int j = 0; j < H; j++)
            for (int i = 0; i < NP; i++) q[j][i] = (__m512bh)_mm512_loadu_si512(qb[g + j] + 32 * i);
        fetch(f, f->per);
        if (H == 2) { /* lanes 0-7 head g, 8-15 head g + 1; keys 0-7 then 8-15 */
            __m512 a = dots(q, 2, key, NP, last);
            fetch(f, f->per);
            __m512 b = dots(q, 2, key + 8, NP, last);
            __m512 s0 = _mm512_shuffle_f32x4(a, b, 0x44), s1 = _mm512_shuffle_f32x4(a, b, 0xee);
            _mm512_storeu_ps(s + g * SPAN, _mm512_mul_ps(s0, sc));
            _mm512_storeu_ps(s + (g + 1) * SPAN, _mm512_mul_ps(s1, sc));
        } else {
            _mm512_storeu_ps(s + g * SPAN, _mm512_mul_ps(dots(q, 1, key, NP, last), sc));
        }
        g += H;
    }
}

/* acc[g] += w[g][t] * V row t over a tile's keys. unpacklo/hi interleave per 128 bits, so the
 * accumulators of each 32 dims hold dims {0-3, 8-11, 16-19, 24-27} then {4-7, ..., 28-31}:
 * put back in order on output (dim_at) */
static inline __attribute__((always_inline)) void pv_tile(
    float (*acc)[MAXD], const uint32_t (*w)[SPAN / 2], int t0, const uint16_t *const *val,
    int G, int NP, __mmask32 last, Ahead *f) {
    for (int c = 0; c < NP; c++) {
        __m512bh lo[TILE / 2], hi[TILE / 2];
        fetch(f, f->per);
        for (int j = 0; j < TILE / 2; j++) {
            __m512i a = load32(val[2 * j], c, NP, last), b = load32(val[2 * j + 1], c, NP, last);
            lo[j] = (__m512bh)_mm512_unpacklo_epi16(a, b);
            hi[j] = (__m512bh)_mm512_unpackhi_epi16(a, b);
        }
        for (int g = 0; g < G; g++) {
            __m512 l = _mm512_loadu_ps(acc[g] + 32 * c), h = _mm512_loadu_ps(acc[g] + 32 * c + 16);
            __m512 l2 = _mm512_setzero_ps(), h2 = _mm512_setzero_ps();
            for (int j = 0; j < TILE / 2; j += 2) {
                __m512bh p = (__m512bh)_mm512_set1_epi32((int)w[g][t0 / 2 + j]);
                __m512bh p2 = (__m512bh)_mm512_set1_epi32((int)w[g][t0 / 2 + j + 1]);
                l = _mm512_dpbf16_ps(l, p, lo[j]);
                h = _mm512_dpbf16_ps(h, p, hi[j]);
                l2 = _mm512_dpbf16_ps(l2, p2, lo[j + 1]);
                h2 = _mm512_dpbf16_ps(h2, p2, hi[j + 1]);
            }
            _mm512_storeu_ps(acc[g] + 32 * c, _mm512_add_ps(l, l2));
            _mm512_storeu_ps(acc[g] + 32 * c + 16, _mm512_add_ps(h, h2));
        }
    }
}

static inline int dim_at(int d) { /* where pv_tile accumulates dim d */
    int e = d % 32, k = e / 8, r = e % 8;
    return d - e + (r < 4 ? 4 * k + r : 16 + 4 * k + r - 4);
}

/* e^x, x <= 0, 16 lanes, as exp_neg but 0 below -87 (so -inf, keys past the row, gives 0) */
static inline __m512 exp16(__m512 x) {
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-06f), r);
    static const float c[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    for (int i = 0; i < 7; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
    p = _mm512_scalef_ps(p, n);
    return _mm512_mask_mov_ps(p, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ),
                              _mm512_setzero_ps());
}

/* online softmax over one chunk: s[g][:n] (n a multiple of 16) become bf16 weight pairs in w;
 * m, l and acc follow the new max */
static void softmax_tiles(float (*s)[SPAN], int n, int G, int D, float *m, float *l,
                          float (*acc)[MAXD], uint32_t (*w)[SPAN / 2]) {
    for (int g = 0; g < G; g++) {
        __m512 mx = _mm512_set1_ps(m[g]), sum = _mm512_setzero_ps();
        for (int t = 0; t < n; t += TILE) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s[g] + t));
        float top = _mm512_reduce_max_ps(mx);
        float corr = m[g] == -INFINITY ? 0.0f : exp_neg(m[g] - top);
        for (int t = 0; t < n; t += TILE) {
            __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s[g] + t), _mm512_set1_ps(top)));
            sum = _mm512_add_ps(sum, p);
            _mm256_storeu_si256((__m256i *)(w[g] + t / 2), (__m256i)_mm512_cvtneps_pbh(p));
        }
        l[g] = l[g] * corr + _mm512_reduce_add_ps(sum);
        m[g] = top;
        if (corr != 1.0f)
            for (int i = 0; i < D; i++) acc[g][i] *= corr;
    }
}

/* one (row, KV head) task with NP pieces of 32 dims, a constant where it is inlined */
static inline __attribute__((always_inline)) void attend_tiles(const Args *a, int row, int h,
                                                               int NP) {
    int G = a->heads / a->kv_heads, D = a->dim;
    __mmask32 last = D % 32 ? ((__mmask32)1 << (D % 32)) - 1 : ~(__mmask32)0;
    uint16_t qb[MAXG][MAXD];
    float acc[MAXG][MAXD], s[MAXG][SPAN], m[MAXG], l[MAXG];
    uint32_t w[MAXG][SPAN / 2];
    const uint16_t *key[SPAN], *val[SPAN];
    const uint16_t *qs = (const uint16_t *)a->q + row * a->q_row + (int64_t)h * G * a->q_head;
    for (int g = 0; g < G; g++) {
        memset(qb[g], 0, 64 * NP);
        memcpy(qb[g], qs + g * a->q_head, 2 * D);
        memset(acc[g], 0, 128 * NP);
        m[g] = -INFINITY, l[g] = 0;
    }
    const uint16_t *kbase = (const uint16_t *)a->k + h * a->k_head;
    const uint16_t *vbase = (const uint16_t *)a->v + h * a->k_head;
    Cursor at = {a->tables + row * a->table_row, 0, 0, a->block_size};
    int calls = (NP <= 4 ? G / 2 * 2 + G % 2 : G) + NP; /* fetch calls a tile makes */
    Ahead f = {at, a->lens[row], kbase, vbase, a->k_block, a->k_token, 2 * D,
               (TILE + calls - 1) / calls};
    fetch(&f, PF_TILES * TILE);
    for (int64_t start = 0; start < a->lens[row]; start += SPAN) {
        int cnt = a->lens[row] - start < SPAN ? (int)(a->lens[row] - start) : SPAN;
        int n = (cnt + TILE - 1) / TILE * TILE;
        for (int t = 0; t < n; t++) { /* past the row: a real key again, its score set to -inf */
            int64_t o = t < cnt ? next_key(&at, a->k_block, a->k_token) : key[0] - kbase;
            key[t] = kbase + o, val[t] = vbase + o;
        }
        for (int t = 0; t < n; t += TILE)
            score_tile((const uint16_t (*)[MAXD])qb, key + t, G, NP, last, a->scale, &s[0][t], &f);
        for (int g = 0; g < G; g++)
            for (int t = cnt; t < n; t++) s[g][t] = -INFINITY;
        softmax_tiles(s, n, G, 32 * NP, m, l, acc, w);
        for (int t = 0; t < n; t += TILE)
            pv_tile(acc, (const uint32_t (*)[SPAN / 2])w, t, val + t, G, NP, last, &f);
    }
    uint16_t *os = (uint16_t *)a->out + row * a->o_row + (int64_t)h * G * a->o_head;
    for (int g = 0; g < G; g++) {
        float inv = l[g] > 0 ? 1.0f / l[g] : 0.0f;
        for (int i = 0; i < D; i++) os[g * a->o_head + i] = f2bf(acc[g][dim_at(i)] * inv);
    }
}

#define NP_CASE(np) \
    case np: attend_tiles(a, row, h, np); break;
static void attend_bf16(const Args *a, int row, int h) {
    switch ((a->dim + 31) / 32) { /* NP a constant in each, so the loops over pieces unroll */
        NP_CASE(1) NP_CASE(2) NP_CASE(3) NP_CASE(4) NP_CASE(5) NP_CASE(6) NP_CASE(7) NP_CASE(8)
    }
}
#endif

/* The portable path: s[g] = q[g] . key for the G heads of a group, key of either dtype */
#define DEFINE_DOT(NAME, T, LOAD)                                                        \
    static inline void NAME(const float (*q)[MAXD], const T *key, int G, int D, float *s) { \
        float kf[MAXD];                                                                  \
        for (int i = 0; i < D; i++) kf[i] = LOAD(key[i]);                                \
        for (int g = 0; g < G; g++) {                                                    \
            float acc[16] = {0};                                                         \
            int i = 0;                                                                   \
            for (; i + 16 <= D; i += 16)                                                 \
                for (int j = 0; j < 16; j++) acc[j] += q[g][i + j] * kf[i + j];          \
            for (int w = 8; w > 0; w >>= 1) /* a tree: no 16-add dependency chain */       \
                for (int j = 0; j < w; j++) acc[j] += acc[j + w];                        \
            float sum = acc[0];                                                          \
            for (; i < D; i++) sum += q[g][i] * kf[i];                                   \
            s[g * CHUNK] = sum;                                                          \
        }                                                                                \
    }

/* acc[g] += p[g] * value for the G heads */
#define DEFINE_AXPY(NAME, T, LOAD)                                                          \
    static inline void NAME(float (*acc)[MAXD], const T *value, int G, int D, const float *p) { \
        float vf[MAXD];                                                                     \
        for (int i = 0; i < D; i++) vf[i] = LOAD(value[i]);                                 \
        for (int g = 0; g < G; g++) {                                                       \
            float w = p[g * CHUNK];                                                         \
            for (int i = 0; i < D; i++) acc[g][i] += w * vf[i];                             \
        }                                                                                   \
    }

/* softmax update of one chunk: s[g][:cnt] become weights; acc, l rescaled to the new max */
static void rescale(float (*s)[CHUNK], int cnt, int G, int D, float *m, float *l,
                    float (*acc)[MAXD]) {
    for (int g = 0; g < G; g++) {
        float mx = m[g];
        for (int t = 0; t < cnt; t++) mx = s[g][t] > mx ? s[g][t] : mx;
        float corr = m[g] == -INFINITY ? 0.0f : exp_neg(m[g] - mx), sum = 0;
        for (int t = 0; t < cnt; t++) {
            s[g][t] = exp_neg(s[g][t] - mx);
            sum += s[g][t];
        }
        l[g] = l[g] * corr + sum;
        m[g] = mx;
        if (corr != 1.0f)
            for (int i = 0; i < D; i++) acc[g][i] *= corr;
    }
}

#define DEFINE_ATTEND(NAME, T, LOAD, STORE)                                                 \
    DEFINE_DOT(NAME##_dot, T, LOAD)                                                         \
    DEFINE_AXPY(NAME##_axpy, T, LOAD)                                                       \
    static void NAME(const Args *a, int row, int h) {                                       \
        int G = a->heads / a->kv_heads, D = a->dim;                                         \
        float q[MAXG][MAXD], acc[MAXG][MAXD], s[MAXG][CHUNK], m[MAXG], l[MAXG];             \
        const T *qs = (const T *)a->q + row * a->q_row + (int64_t)h * G * a->q_head;        \
        for (int g = 0; g < G; g++) {                                                       \
            for (int i = 0; i < D; i++) q[g][i] = LOAD(qs[g * a->q_head + i]) * a->scale;   \
            memset(acc[g], 0, sizeof(float) * D);                                           \
            m[g] = -INFINITY;                                                               \
            l[g] = 0;                                                                       \
        }                                                                                   \
        const int64_t n = a->lens[row];                                                     \
        const T *kbase = (const T *)a->k + h * a->k_head, *vbase = (const T *)a->v + h * a->k_head; \
        Cursor kc = {a->tables + row * a->table_row, 0, 0, a->block_size}, vc = kc;          \
        for (int64_t start = 0; start < n; start += CHUNK) {                                \
            int cnt = n - start < CHUNK ? (int)(n - start) : CHUNK;                         \
            for (int t = 0; t < cnt; t++) {                                                 \
                int64_t at = next_key(&kc, a->k_block, a->k_token);                         \
                /* V of this key is read after the chunk's scores: fetched meanwhile */     \
                for (int i = 0; i < D * (int)sizeof(T); i += 64)                            \
                    __builtin_prefetch((const char *)(vbase + at) + i);                     \
                NAME##_dot(q, kbase + at, G, D, &s[0][t]);                                  \
            }                                                                               \
            rescale(s, cnt, G, D, m, l, acc);                                               \
            for (int t = 0; t < cnt; t++)                                                   \
                NAME##_axpy(acc, vbase + next_key(&vc, a->k_block, a->k_token), G, D, &s[0][t]); \
        }                                                                                   \
        T *os = (T *)a->out + row * a->o_row + (int64_t)h * G * a->o_head;                 \
        for (int g = 0; g < G; g++) {                                                       \
            float inv = l[g] > 0 ? 1.0f / l[g] : 0.0f;                                      \
            for (int i = 0; i < D; i++) os[g * a->o_head + i] = STORE(acc[g][i] * inv);    \
        }                                                                                   \
    }

#define AS_FLOAT(x) (x)
DEFINE_ATTEND(attend_f32, float, AS_FLOAT, AS_FLOAT)
#ifndef HAVE_TILED_BF16
DEFINE_ATTEND(attend_bf16, uint16_t, bf2f, f2bf)
#endif

static void attend(const Args *a, int i) {
    int t = a->rows * a->kv_heads - 1 - i; /* the runner sorts rows shortest first: longest first */
    if (a->bf16)
        attend_bf16(a, t / a->kv_heads, t % a->kv_heads);
    else
        attend_f32(a, t / a->kv_heads, t % a->kv_heads);
}

/* Returns 0, or -1 where the shapes exceed the kernel's fixed buffers (caller falls back).
 * Threads come from OpenMP, which resolves to the runtime torch already loaded (same soname),
 * so the kernel runs on torch's warm pool, not on threads started per call; tasks are taken
 * one at a time, so a thread the OS parks on a busy machine does not hold up the layer. */
int paged_decode(Args *a) {
    if (a->heads % a->kv_heads || a->heads / a->kv_heads > MAXG || a->dim > MAXD) return -1;
    int tasks = a->rows * a->kv_heads;
    int threads = a->threads < 1 ? 1 : a->threads > tasks ? tasks : a->threads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int i = 0; i < tasks; i++) attend(a, i);
    return 0;
}
