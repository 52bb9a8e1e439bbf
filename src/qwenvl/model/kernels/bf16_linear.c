/* bf16 linear layer for x86 CPUs with AVX512-BF16: y = x W^T (+ bias), fp32 accumulation.
 *
 * The weight (N, K) is stored packed, as wp[N/16][K/2][16][2]: for each block of 16 outputs, the K inputs in
 * pairs, the 16 outputs' pairs side by side. One 64-byte load then holds one input pair for 16 outputs, the
 * operand of `vdpbf16ps`, and the input pair x[m][2k:2k+2] is broadcast to all lanes. A block of MM input rows
 * by R output blocks keeps MM*R accumulators in registers; each weight load feeds MM instructions, so a
 * batch of 8 rows reads the weight once (as one row does) and is compute-bound only at ~8x the work.
 *
 * Built at first use by qwenvl.model.bf16_kernel (the C compiler and OpenMP that torch.compile uses on
 * CPUs); the caller checks shapes: N % 16 == 0, K % 2 == 0, all pointers contiguous. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __m512i bcast_pair(const uint16_t* p) {
  int32_t v;
  memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

/* Each weight line is asked into L2 one group of R blocks (+64 KB) before it is read: the hardware
 * prefetcher alone leaves the 8-row kernel waiting on memory (mid benchmark model, 2 threads, bf16: a pass
 * over every LM matrix at 8 rows 13.5-14.3 ms without, 11.6-12.2 ms with, in alternating rounds; one row
 * unchanged at ~11 ms). Offset in bf16 elements. */
#define PREFETCH_AHEAD 32768

/* y[m][n0*16 .. (n0+R)*16) for rows m < MM; x, y start at the block's first row */
#define BLOCK(MM, R)                                                                                        \
  static inline void block_##MM##_##R(const uint16_t* x, const uint16_t* wp, const uint16_t* bias,          \
                                      uint16_t* y, long N, long K, long n0) {                               \
    __m512 acc[MM][R];                                                                                      \
    for (int r = 0; r < R; ++r) {                                                                           \
      __m512 b0 = _mm512_setzero_ps();                                                                      \
      if (bias)                                                                                             \
        b0 = _mm512_castsi512_ps(_mm512_slli_epi32(                                                         \
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(bias + (n0 + r) * 16))), 16));       \
      for (int m = 0; m < MM; ++m) acc[m][r] = b0;                                                          \
    }                                                                                                       \
    const long half = K / 2;                                                                                \
    const uint16_t* w0 = wp + n0 * 16 * K;                                                                  \
    for (long kp = 0; kp < half; ++kp) {                                                                    \
      __m512i wv[R];                                                                                        \
      for (int r = 0; r < R; ++r) {                                                                         \
        wv[r] = _mm512_loadu_si512(w0 + (r * half + kp) * 32);                                              \
        _mm_prefetch((const char*)(w0 + ((R + r) * half + kp) * 32 + PREFETCH_AHEAD), _MM_HINT_T1);          \
      }                                                                                                     \
      for (int m = 0; m < MM; ++m) {                                                                        \
        __m512i xv = bcast_pair(x + m * K + 2 * kp);                                                        \
        for (int r = 0; r < R; ++r)                                                                         \
          acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv[r], (__m512bh)xv);                         \
      }                                                                                                     \
    }                                                                                                       \
    for (int m = 0; m < MM; ++m)                                                                            \
      for (int r = 0; r < R; ++r)                                                                           \
        _mm256_storeu_si256((__m256i*)(y + m * N + (n0 + r) * 16), (__m256i)_mm512_cvtneps_pbh(acc[m][r])); \
  }

/* R output blocks per step: MM*R accumulators and R weight vectors fit the 32 registers. One row reads 12
 * streams at once (mid benchmark model, bf16, one-row pass over every LM matrix: 9.8-10.1 ms against
 * 10.8-11.2 ms with 4, in alternating rounds); 8 rows take 3 (24 accumulators). */
BLOCK(1, 12) BLOCK(2, 8) BLOCK(3, 6) BLOCK(4, 5) BLOCK(5, 4) BLOCK(6, 4) BLOCK(7, 3) BLOCK(8, 3)
BLOCK(1, 1) BLOCK(2, 1) BLOCK(3, 1) BLOCK(4, 1) BLOCK(5, 1) BLOCK(6, 1) BLOCK(7, 1) BLOCK(8, 1)

typedef void (*block_fn)(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, long, long, long);
static const block_fn WIDE[9] = {0, block_1_12, block_2_8, block_3_6, block_4_5,
                                 block_5_4, block_6_4, block_7_3, block_8_3};
static const block_fn NARROW[9] = {0, block_1_1, block_2_1, block_3_1, block_4_1,
                                   block_5_1, block_6_1, block_7_1, block_8_1};
static const int WIDE_R[9] = {0, 12, 8, 6, 5, 4, 4, 3, 3};

static inline int wide_r(long mm) { return WIDE_R[mm]; }

/* groups of R output blocks are split between threads; every group runs all rows, 8 at a time (its
 * weights stay in cache between row chunks). The last group takes the leftover blocks one by one. */
void qwenvl_bf16_linear(const uint16_t* x, const uint16_t* wp, const uint16_t* bias, uint16_t* y,
                        long M, long N, long K, int threads) {
  const long blocks = N / 16;
  const int r = wide_r(M < 8 ? M : 8);
  const long groups = blocks / r;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long g = 0; g <= groups; ++g) {
    for (long m0 = 0; m0 < M; m0 += 8) {
      const long mm = M - m0 < 8 ? M - m0 : 8;
      const uint16_t* xm = x + m0 * K;
      uint16_t* ym = y + m0 * N;
      if (g < groups && wide_r(mm) == r) {
        WIDE[mm](xm, wp, bias, ym, N, K, g * r);
      } else {
        const long first = g < groups ? g * r : groups * r, last = g < groups ? (g + 1) * r : blocks;
        for (long b = first; b < last; ++b) NARROW[mm](xm, wp, bias, ym, N, K, b);
      }
    }
  }
}
