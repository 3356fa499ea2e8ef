/* Sampling's exponential race on CPU: per row, argmax over tokens of p_i / E_i, E_i = -ln(u_i),
 * which draws token i with probability p_i / sum(p). The uniforms come from a counter-based
 * hash of (the row's 64-bit key, i), so a row's noise is a function of its key alone (a seeded
 * row's key is made from (seed, position)) and nothing per token is stored: one pass over the
 * row, where torch's generator, log, divide and argmax took four. A race, unlike a draw through
 * the cumulative probabilities, barely moves when the logits move by float rounding (another
 * TP degree): the winner changes only where two ratios tie that closely.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const float *probs;    /* [rows, vocab], rows row_stride apart; >= 0 */
    const uint64_t *keys;  /* [rows] */
    int64_t *out;          /* [rows] token ids */
    int64_t row_stride;
    int rows, vocab, threads;
} Args;

static inline uint32_t mix(uint32_t h) { /* a 32-bit avalanche: every input bit moves the output */
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return h;
}

static inline uint32_t noise(uint64_t key, uint32_t i) {
    return mix(mix(i * 0x9e3779b1u ^ (uint32_t)key) ^ (uint32_t)(key >> 32));
}

/* -ln(u), u = (top 24 bits + 0.5) / 2^24 in (0, 1): exponent and mantissa m in [1, 2) split,
 * ln m = 2 atanh((m - 1) / (m + 1)) to 5 terms (|t| <= 1/3: ~1e-6, plenty for noise) */
static inline float neg_log_uniform(uint32_t h) {
    float u = ((float)(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
    uint32_t bits;
    memcpy(&bits, &u, 4);
    float e = (float)((int)(bits >> 23) - 127);
    bits = (bits & 0x007fffffu) | 0x3f800000u;
    float m;
    memcpy(&m, &bits, 4);
    float t = (m - 1.0f) / (m + 1.0f), t2 = t * t;
    float ln_m = 2.0f * t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
    return -(e * 0.69314718056f + ln_m);
}

static int64_t race_row(const float *p, uint64_t key, int vocab) {
    int64_t best = 0;
    float best_score = -1.0f;
    for (int i = 0; i < vocab; i++) {
        if (!(p[i] > 0.0f)) continue;
        float score = p[i] / neg_log_uniform(noise(key, (uint32_t)i));
        if (score > best_score) best_score = score, best = i;
    }
    return best;
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* the same arithmetic 16 tokens at a time; ties go to the lowest id, as in race_row */
static int64_t race_row16(const float *p, uint64_t key, int vocab) {
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i k0 = _mm512_set1_epi32((int)(uint32_t)key), k1 = _mm512_set1_epi32((int)(key >> 32));
    __m512 best = _mm512_set1_ps(-1.0f);
    __m512i best_id = _mm512_setzero_si512();
    int i = 0;
    for (; i + 16 <= vocab; i += 16) {
        __m512i id = _mm512_add_epi32(_mm512_set1_epi32(i), lanes);
        __m512i h = _mm512_xor_si512(_mm512_mullo_epi32(id, _mm512_set1_epi32((int)0x9e3779b1u)), k0);
        for (int round = 0; round < 2; round++) {
            h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
            h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb352d));
            h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
            h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x846ca68bu));
            h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
            if (round == 0) h = _mm512_xor_si512(h, k1);
        }
        __m512 u = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)),
                                               _mm512_set1_ps(0.5f)), _mm512_set1_ps(1.0f / 16777216.0f));
        __m512i bits = _mm512_castps_si512(u);
        __m512 e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(127)));
        __m512 m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007fffff)),
                                                        _mm512_set1_epi32(0x3f800000)));
        __m512 one = _mm512_set1_ps(1.0f);
        __m512 t = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one)), t2 = _mm512_mul_ps(t, t);
        __m512 s = _mm512_fmadd_ps(t2, _mm512_set1_ps(1.0f / 9), _mm512_set1_ps(1.0f / 7));
        s = _mm512_fmadd_ps(t2, s, _mm512_set1_ps(1.0f / 5));
        s = _mm512_fmadd_ps(t2, s, _mm512_set1_ps(1.0f / 3));
        s = _mm512_fmadd_ps(t2, s, one);
        __m512 ln_m = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2.0f), t), s);
        __m512 q = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_fmadd_ps(e, _mm512_set1_ps(0.69314718056f), ln_m));
        __m512 pv = _mm512_loadu_ps(p + i);
        __mmask16 live = _mm512_cmp_ps_mask(pv, _mm512_setzero_ps(), _CMP_GT_OQ);
        __m512 score = _mm512_mask_div_ps(_mm512_set1_ps(-1.0f), live, pv, q);
        __mmask16 better = _mm512_cmp_ps_mask(score, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, better, score);
        best_id = _mm512_mask_mov_epi32(best_id, better, id);
    }
    float scores[16];
    int32_t ids[16];
    _mm512_storeu_ps(scores, best);
    _mm512_storeu_si512(ids, best_id);
    int64_t winner = 0;
    float top = -1.0f;
    for (int l = 0; l < 16; l++)
        if (scores[l] > top || (scores[l] == top && ids[l] < winner)) top = scores[l], winner = ids[l];
    for (; i < vocab; i++) {
        if (!(p[i] > 0.0f)) continue;
        float score = p[i] / neg_log_uniform(noise(key, (uint32_t)i));
        if (score > top) top = score, winner = i;
    }
    return winner;
}
#define RACE race_row16
#else
#define RACE race_row
#endif

/* Returns 0. Rows are independent: threads take them in turn. */
int race(Args *a) {
    int threads = a->threads < 1 ? 1 : a->threads > a->rows ? a->rows : a->threads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int r = 0; r < a->rows; r++) a->out[r] = RACE(a->probs + r * a->row_stride, a->keys[r], a->vocab);
    return 0;
}
