/* Decode attention that reads a paged KV cache in place through block tables (CPU).
 *
 * One task per (row, KV head): the heads sharing that KV head score each key row while it is in
 * L1, with an online softmax over chunks of CHUNK keys, so K and V are read once from memory
 * and nothing is copied out of the cache. Built by cpu_paged.py with -O3 -march=native; the
 * 16-wide inner loops are written for the compiler to vectorise (bf16 -> f32 is a shift); on
 * AVX512-BF16 the products run on the bf16 dot instruction.
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

/* s[g] = q[g] . key for the G heads of a group; key of either dtype */
#define DEFINE_DOT(NAME, T, LOAD)                                                      \
    static inline void NAME(const float (*q)[MAXD], const uint16_t (*qb)[MAXD], float scale, \
                            const T *key, int G, int D, float *s, int stride) {       \
        (void)qb, (void)scale;                                                         \
        float kf[MAXD];                                                                \
        for (int i = 0; i < D; i++) kf[i] = LOAD(key[i]);                              \
        for (int g = 0; g < G; g++) {                                                  \
            float acc[16] = {0};                                                       \
            int i = 0;                                                                 \
            for (; i + 16 <= D; i += 16)                                               \
                for (int j = 0; j < 16; j++) acc[j] += q[g][i + j] * kf[i + j];        \
            for (int w = 8; w > 0; w >>= 1) /* a tree: no 16-add dependency chain */     \
                for (int j = 0; j < w; j++) acc[j] += acc[j + w];                      \
            float sum = acc[0];                                                        \
            for (; i < D; i++) sum += q[g][i] * kf[i];                                 \
            s[g * stride] = sum;                                                       \
        }                                                                              \
    }

/* acc[g] += p[g] * value for the G heads */
#define DEFINE_AXPY(NAME, T, LOAD)                                                        \
    static inline void NAME(float (*acc)[MAXD], const T *value, int G, int D, const float *p, \
                            int stride) {                                                 \
        float vf[MAXD];                                                                   \
        for (int i = 0; i < D; i++) vf[i] = LOAD(value[i]);                               \
        for (int g = 0; g < G; g++) {                                                     \
            float w = p[g * stride];                                                      \
            for (int i = 0; i < D; i++) acc[g][i] += w * vf[i];                           \
        }                                                                                 \
    }

#define AS_FLOAT(x) (x)
DEFINE_DOT(dot_f32, float, AS_FLOAT)
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
/* bf16 pairs multiplied and summed in f32 by the CPU's dot instruction: q unscaled, as stored */
static inline void dot_bf16(const float (*q)[MAXD], const uint16_t (*qb)[MAXD], float scale,
                            const uint16_t *key, int G, int D, float *s, int stride) {
    if (D % 32) { /* rows the 32-wide loop does not tile: the portable path */
        float kf[MAXD];
        for (int i = 0; i < D; i++) kf[i] = bf2f(key[i]);
        for (int g = 0; g < G; g++) {
            float sum = 0;
            for (int i = 0; i < D; i++) sum += q[g][i] * kf[i];
            s[g * stride] = sum;
        }
        return;
    }
    __m512bh k[MAXD / 32];
    for (int i = 0; i < D / 32; i++) k[i] = (__m512bh)_mm512_loadu_si512(key + 32 * i);
    for (int g = 0; g < G; g++) {
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < D / 32; i++)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qb[g] + 32 * i), k[i]);
        s[g * stride] = _mm512_reduce_add_ps(acc) * scale;
    }
}
#define HAVE_PV_BF16 1
/* acc[g] += sum of s[g][t] * V row t over 8 keys, as 4 token pairs per dot instruction: each
 * pair's rows interleaved (v_t[d], v_t+1[d]), their weights rounded to bf16 (as SDPA's bf16
 * path rounds its probabilities); acc is loaded once per 8 keys, not once per key */
static void pv8_bf16(float (*acc)[MAXD], const float (*s)[CHUNK], int t, const uint16_t **rows,
                     int G, int D) {
    static const short order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i idx = _mm512_loadu_si512(order);
    uint32_t w[MAXG][4];
    for (int g = 0; g < G; g++)
        for (int j = 0; j < 4; j++)
            w[g][j] = f2bf(s[g][t + 2 * j]) | (uint32_t)f2bf(s[g][t + 2 * j + 1]) << 16;
    for (int c = 0; c < D; c += 16) {
        __m512bh v[4];
        for (int j = 0; j < 4; j++) {
            __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(rows[2 * j] + c)));
            __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(rows[2 * j + 1] + c)));
            v[j] = (__m512bh)_mm512_permutex2var_epi16(a, idx, b);
        }
        for (int g = 0; g < G; g++) {
            __m512 sum = _mm512_loadu_ps(acc[g] + c);
            for (int j = 0; j < 4; j++)
                sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_set1_epi32((int)w[g][j]), v[j]);
            _mm512_storeu_ps(acc[g] + c, sum);
        }
    }
}
#else
DEFINE_DOT(dot_bf16, uint16_t, bf2f)
#endif
DEFINE_AXPY(axpy_f32, float, AS_FLOAT)
DEFINE_AXPY(axpy_bf16, uint16_t, bf2f)

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

#define DEFINE_ATTEND(NAME, T, DOT, AXPY, STORE)                                            \
    static void NAME(const Args *a, int row, int h) {                                       \
        int G = a->heads / a->kv_heads, D = a->dim, bs = a->block_size;                     \
        float q[MAXG][MAXD], acc[MAXG][MAXD], s[MAXG][CHUNK], m[MAXG], l[MAXG];             \
        uint16_t qb[MAXG][MAXD]; /* bf16 q as stored, for the dot instruction */           \
        const T *qs = (const T *)a->q + row * a->q_row + (int64_t)h * G * a->q_head;        \
        for (int g = 0; g < G; g++) {                                                       \
            for (int i = 0; i < D; i++) q[g][i] = (float)DOT##_load(qs[g * a->q_head + i]) * a->scale; \
            if (sizeof(T) == 2) memcpy(qb[g], qs + g * a->q_head, 2 * D);                  \
            memset(acc[g], 0, sizeof(float) * D);                                           \
            m[g] = -INFINITY;                                                               \
            l[g] = 0;                                                                       \
        }                                                                                   \
        const int64_t *table = a->tables + row * a->table_row, n = a->lens[row];           \
        const T *kbase = (const T *)a->k + h * a->k_head, *vbase = (const T *)a->v + h * a->k_head; \
        /* block: table entry of the chunk's first key, offset its place in that block */  \
        int64_t block = 0;                                                                  \
        int offset = 0;                                                                     \
        for (int64_t start = 0; start < n; start += CHUNK) {                                \
            int cnt = n - start < CHUNK ? (int)(n - start) : CHUNK;                         \
            int64_t b = block;                                                              \
            int o = offset;                                                                 \
            for (int t = 0; t < cnt; t++) {                                                 \
                int64_t at = table[b] * a->k_block + o * a->k_token;                        \
                /* V of this key is read after the chunk's scores: fetched meanwhile */     \
                for (int i = 0; i < D * (int)sizeof(T); i += 64)                            \
                    __builtin_prefetch((const char *)(vbase + at) + i);                     \
                DOT(q, (const uint16_t (*)[MAXD])qb, a->scale, kbase + at, G, D, &s[0][t], CHUNK); \
                if (++o == bs) o = 0, b++;                                                  \
            }                                                                               \
            rescale(s, cnt, G, D, m, l, acc);                                               \
            for (int t = 0; t < cnt;) {                                                     \
                if (sizeof(T) == 2 && PV8 && D % 16 == 0 && cnt - t >= 8) {                 \
                    const uint16_t *rows[8];                                                \
                    (void)rows;                                                             \
                    for (int j = 0; j < 8; j++) {                                           \
                        rows[j] = (const uint16_t *)(vbase + table[block] * a->k_block      \
                                                     + offset * a->k_token);                \
                        if (++offset == bs) offset = 0, block++;                            \
                    }                                                                       \
                    PV8_CALL(acc, (const float (*)[CHUNK])s, t, rows, G, D);                \
                    t += 8;                                                                 \
                    continue;                                                               \
                }                                                                           \
                AXPY(acc, vbase + table[block] * a->k_block + offset * a->k_token, G, D,    \
                     &s[0][t], CHUNK);                                                      \
                if (++offset == bs) offset = 0, block++;                                    \
                t++;                                                                        \
            }                                                                               \
        }                                                                                   \
        T *os = (T *)a->out + row * a->o_row + (int64_t)h * G * a->o_head;                 \
        for (int g = 0; g < G; g++) {                                                       \
            float inv = l[g] > 0 ? 1.0f / l[g] : 0.0f;                                      \
            for (int i = 0; i < D; i++) os[g * a->o_head + i] = STORE(acc[g][i] * inv);    \
        }                                                                                   \
    }

#ifdef HAVE_PV_BF16
#define PV8 1
#define PV8_CALL pv8_bf16
#else
#define PV8 0
#define PV8_CALL(...) (void)0
#endif
#define dot_f32_load AS_FLOAT
#define dot_bf16_load bf2f
DEFINE_ATTEND(attend_f32, float, dot_f32, axpy_f32, AS_FLOAT)
DEFINE_ATTEND(attend_bf16, uint16_t, dot_bf16, axpy_bf16, f2bf)

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
