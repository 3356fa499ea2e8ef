/* y = x W^T (+ bias) in bf16 on the CPU's bf16 dot instruction (AVX512-BF16), float32 sums.
 *
 * Decode runs every linear at a few rows (one per running sequence), where the whole weight is
 * streamed once per step: oneDNN's blocked GEMM reaches about half the dot instruction's rate
 * there. W is packed once (bf16_linear.py) as [n / 32][k / 2][32][2]: for each 32 output columns,
 * every input pair (k, k + 1) of those columns side by side, so one 64-byte load feeds 16 columns'
 * dot products for a pair of inputs and the weight is read as one sequential stream. Each row's
 * pair of inputs is broadcast to all lanes. A task holds up to 8 rows x 32 columns of sums in
 * registers (16 accumulators), so each weight byte loaded is used 8 times.
 */
#include <immintrin.h>
#include <stdint.h>

#define COLS 32 /* output columns per packed tile: two 16-lane accumulators per row */

typedef struct {
    const uint16_t *x;   /* [m, k] bf16, rows x_row apart */
    const uint16_t *w;   /* packed [tiles][k / 2][COLS][2] bf16 */
    const float *bias;   /* [n] float32, or NULL */
    uint16_t *out;       /* [m, n] bf16, rows o_row apart */
    int64_t x_row, o_row;
    int m, k, n, threads;
} Args;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
static inline __m512bh pair(const uint16_t *x) { /* x[0], x[1] in every 32-bit lane */
    return (__m512bh)_mm512_set1_epi32(*(const int32_t *)x);
}

/* (sum + bias) rounded to bf16 as F.linear rounds it; only columns below n are written */
static inline void store(const Args *a, __m512 y, int row, int c) {
    if (c >= a->n) return;
    __mmask16 keep = a->n - c >= 16 ? 0xffff : (__mmask16)((1u << (a->n - c)) - 1);
    if (a->bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(keep, a->bias + c));
    _mm256_mask_storeu_epi16(a->out + row * a->o_row + c, keep, (__m256i)_mm512_cvtneps_pbh(y));
}

/* R rows from `row` times one tile (the COLS columns from `col`), over every input pair */
#define DEFINE_TILE(R)                                                                      \
    static void tile_##R(const Args *a, const uint16_t *w, int row, int col) {             \
        __m512 lo[R], hi[R];                                                                \
        for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm512_setzero_ps();                    \
        const uint16_t *x = a->x + row * a->x_row;                                          \
        for (int p = 0; p < a->k / 2; p++, w += 2 * COLS) {                                 \
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);                                  \
            __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + COLS);                           \
            for (int r = 0; r < R; r++) {                                                   \
                __m512bh xr = pair(x + r * a->x_row + 2 * p);                               \
                lo[r] = _mm512_dpbf16_ps(lo[r], xr, w0);                                    \
                hi[r] = _mm512_dpbf16_ps(hi[r], xr, w1);                                    \
            }                                                                               \
        }                                                                                   \
        for (int r = 0; r < R; r++) {                                                       \
            store(a, lo[r], row + r, col);                                                  \
            store(a, hi[r], row + r, col + 16);                                             \
        }                                                                                   \
    }
DEFINE_TILE(8)
DEFINE_TILE(4)
DEFINE_TILE(2)
DEFINE_TILE(1)

/* every row times tile t: 8 rows a pass (the tile's slice of W stays in L2 between passes),
 * the last 1-7 rows as 4 + 2 + 1 */
static void one_tile(const Args *a, int t) {
    const uint16_t *w = a->w + (int64_t)t * a->k * COLS;
    int row = 0, col = t * COLS;
    for (; a->m - row >= 8; row += 8) tile_8(a, w, row, col);
    if (a->m - row >= 4) tile_4(a, w, row, col), row += 4;
    if (a->m - row >= 2) tile_2(a, w, row, col), row += 2;
    if (a->m - row >= 1) tile_1(a, w, row, col);
}

#endif

/* Returns 0, or -1 for shapes it does not take (odd k) and on CPUs without the instruction. Threads split the tiles evenly: a
 * decode step's linears are short, so a static split costs no scheduling per tile. */
int bf16_linear(Args *a) {
#if !defined(__AVX512BF16__)
    return -1;
#else
    if (a->k % 2) return -1;
    int tiles = (a->n + COLS - 1) / COLS;
    int threads = a->threads < 1 ? 1 : a->threads > tiles ? tiles : a->threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int t = 0; t < tiles; t++) one_tile(a, t);
    return 0;
#endif
}
