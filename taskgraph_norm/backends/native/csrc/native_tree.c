/* The tree topology's merges of a row's chunk sums (native.c's FLOAT_ROWS, native_narrow.c,
 * the backward's row sums and LayerNorm's): recognised once per call, then run as vectors. */
#include <stdint.h>

#include "tgn_native.h"

#ifdef __FAST_MATH__
#error "native_tree.c must not be compiled with -ffast-math"
#endif

#if defined(__AVX__)
#include <immintrin.h>
#endif

/* The tree topology's merges: n (a power of two) slots, then level after level each
 * level's sums of adjacent pairs written after it, slots[n + k] = slots[2k] + slots[2k +
 * 1] for k < n / 2 and so on to the root at 2n - 2 (lowering's level order for
 * topology="tree").  Checked once per call (native_team_jobs.c), so the kernel's rows
 * run them as vectors: every lane is one of those additions, the even slot plus the odd
 * one, the same bits as the scalar loop of triples. */
int tgn_adds_tree(const int64_t *adds, int64_t n_adds, int64_t n_chunks, int64_t root)
{
    if (!adds || n_chunks < 2 || (n_chunks & (n_chunks - 1)) || n_adds != n_chunks - 1 || root != 2 * n_chunks - 2)
        return 0;
    int64_t t = 0, ok = 1;
    for (int64_t in = 0, L = n_chunks; L > 1; in += L, L /= 2)
        for (int64_t k = 0; k < L / 2; ++k, ++t)
            ok &= adds[3 * t] == in + L + k && adds[3 * t + 1] == in + 2 * k && adds[3 * t + 2] == in + 2 * k + 1;
    return (int)ok;
}

/* Rows of fewer chunks keep the loop of triples: no level fills a vector, and on
 * QK-norm's rows (2 chunks, one addition) the call cost more than the loop. */
#define TREE_VECTOR_CHUNKS 16

int tgn_tree_vectors(const int64_t *adds, int64_t n_adds, int64_t n_chunks, int64_t root)
{
    return n_chunks >= TREE_VECTOR_CHUNKS && tgn_adds_tree(adds, n_adds, n_chunks, root);
}

int64_t tgn_rows_tree_flag(const tgn_rows_cfg_t *c)
{
    return !c->exact && tgn_tree_vectors(c->adds, c->n_adds, (c->hidden + c->chunk - 1) / c->chunk, c->root)
               ? TGN_TREE_ADDS : 0;
}

void tgn_adds_tree_f32(float *s, int64_t n)
{
    float *in = s;
    int64_t L = n;
#if defined(__AVX512F__)
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (; L >= 32; in += L, L /= 2)
        for (int64_t k = 0; k < L; k += 32) {
            __m512 a = _mm512_loadu_ps(in + k), b = _mm512_loadu_ps(in + k + 16);
            _mm512_storeu_ps(in + L + k / 2, _mm512_add_ps(_mm512_permutex2var_ps(a, even, b),
                                                           _mm512_permutex2var_ps(a, odd, b)));
        }
#endif
#if defined(__AVX2__)
    for (; L >= 16; in += L, L /= 2)
        for (int64_t k = 0; k < L; k += 16) {
            __m256 a = _mm256_loadu_ps(in + k), b = _mm256_loadu_ps(in + k + 8);
            /* [a0 a2 b0 b2 | a4 a6 b4 b6] + the odd ones, then in order */
            __m256 sum = _mm256_add_ps(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
            _mm256_storeu_ps(in + L + k / 2, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(sum),
                                                                                    _MM_SHUFFLE(3, 1, 2, 0))));
        }
#endif
    for (; L > 1; in += L, L /= 2)
        for (int64_t k = 0; k < L / 2; ++k)
            in[L + k] = in[2 * k] + in[2 * k + 1];
}
