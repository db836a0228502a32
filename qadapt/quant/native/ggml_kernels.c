/* Exact CPU kernels over raw GGUF blocks: y[M, N] = x[M, K] @ W^T, and W -> float32.
 *
 * Compiled on first use by qadapt/quant/native/__init__.py (cc -O3 -march=native
 * -fopenmp -ffp-contract=off) and called through ctypes; no Python or torch headers.
 *
 * Exactness: every weight is dequantized with the same float32 operations, in the
 * same order, as gguf-py's quants.py (-ffp-contract=off keeps `d * q + m` two rounded
 * operations, never a fused multiply-add), so the weights are gguf-py's bit for bit.
 * Only the dot products differ from a float64 reference: float32 fused multiply-adds
 * accumulated in a fixed order, |error| <= K * 2^-24 * sum_k |x_k| |w_k| (the classical
 * bound for any summation order).
 *
 * Layout: W is `rows` rows of `row_bytes` bytes each (whole blocks), x is row-major
 * [M, K] float32 with row stride ldx, y is row-major [M, N] float32 with row stride ldy.
 * Type ids are gguf's GGMLQuantizationType values.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>

/* -DQA_PORTABLE builds the plain-C loops only (the tests check them on AVX2 machines too). */
#if defined(__AVX2__) && defined(__FMA__) && !defined(QA_PORTABLE)
#include <immintrin.h>
#define QA_AVX2 1
#endif
#if defined(__F16C__) && !defined(QA_PORTABLE)
#include <immintrin.h>
#define QA_F16C 1
#endif

#define QK_K 256
/* The plain-C dequantizers are the AVX2 build's reference and the portable build's code. */
#define SCALAR static __attribute__((unused))
/* Elements dequantized into the per-thread scratch at a time: a multiple of every block. */
#define CH 256
/* Input rows handled per pass over a weight row (accumulators must fit in registers). */
#define MT_MAX 4

/* Type ids and block geometry: one table, generated from gguf-py's (ggml_types.h, tools/gen_native_types.py). */
#include "ggml_types.h"
#define QA_TYPE(name, id, block, size) T_##name = id, BLOCK_##name = block, BYTES_##name = size,
enum { QA_TYPES };
#undef QA_TYPE

/* ------------------------------------------------------------------ scalars */
static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(QA_F16C)
    return _cvtsh_ss(h);
#else
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, f;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-8f; /* m * 2^-24, exact */
        memcpy(&f, &v, 4);
        f |= s;
    } else if (e == 31) {
        f = s | 0x7f800000u | (m << 13);
    } else {
        f = s | ((e + 112) << 23) | (m << 13);
    }
    float r;
    memcpy(&r, &f, 4);
    return r;
#endif
}

static const float IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* ------------------------------------------------------------------ blocks -> float32
 * One function per type: `n` elements starting at element e0 of a row (both multiples of
 * the block size), written to out. Written as plain loops the compiler vectorises. */

SCALAR void dq_f32(const uint8_t *row, int64_t e0, int n, float *out) {
    memcpy(out, row + e0 * 4, (size_t)n * 4);
}

SCALAR void dq_f16(const uint8_t *row, int64_t e0, int n, float *out) {
    const uint8_t *p = row + e0 * 2;
    int j = 0;
#if defined(QA_F16C) && defined(QA_AVX2)
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * j))));
#endif
    for (; j < n; j++) out[j] = h2f(p + 2 * j);
}

SCALAR void dq_bf16(const uint8_t *row, int64_t e0, int n, float *out) {
    const uint8_t *p = row + e0 * 2;
    for (int j = 0; j < n; j++) {
        uint16_t h;
        memcpy(&h, p + 2 * j, 2);
        uint32_t f = (uint32_t)h << 16;
        memcpy(out + j, &f, 4);
    }
}

SCALAR void dq_q8_0(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 34;
        const float d = h2f(blk);
        const int8_t *q = (const int8_t *)(blk + 2);
        for (int j = 0; j < 32; j++) out[j] = d * (float)q[j];
    }
}

SCALAR void dq_q4_0(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 18;
        const float d = h2f(blk);
        const uint8_t *q = blk + 2;
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)((int)(q[j] & 0x0F) - 8);
            out[j + 16] = d * (float)((int)(q[j] >> 4) - 8);
        }
    }
}

SCALAR void dq_q4_1(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 20;
        const float d = h2f(blk), m = h2f(blk + 2);
        const uint8_t *q = blk + 4;
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)(q[j] & 0x0F) + m;
            out[j + 16] = d * (float)(q[j] >> 4) + m;
        }
    }
}

SCALAR void dq_q5_0(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 22;
        const float d = h2f(blk);
        uint32_t qh;
        memcpy(&qh, blk + 2, 4);
        const uint8_t *q = blk + 6;
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)((int)((q[j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16);
            out[j + 16] = d * (float)((int)((q[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
        }
    }
}

SCALAR void dq_q5_1(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 24;
        const float d = h2f(blk), m = h2f(blk + 2);
        uint32_t qh;
        memcpy(&qh, blk + 4, 4);
        const uint8_t *q = blk + 8;
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)((q[j] & 0x0F) | (((qh >> j) & 1) << 4)) + m;
            out[j + 16] = d * (float)((q[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m;
        }
    }
}

SCALAR void dq_iq4_nl(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 18;
        const float d = h2f(blk);
        const uint8_t *q = blk + 2;
        for (int j = 0; j < 16; j++) {
            out[j] = d * IQ4_VALUES[q[j] & 0x0F];
            out[j + 16] = d * IQ4_VALUES[q[j] >> 4];
        }
    }
}

/* Q2_K: scales[16] qs[64] d dmin; 16 groups of 16; w = (d * (sc & 15)) * q - dmin * (sc >> 4). */
SCALAR void dq_q2_k(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 84;
        const uint8_t *sc = blk, *qs = blk + 16;
        const float d = h2f(blk + 80), dmin = h2f(blk + 82);
        for (int g = 0; g < 16; g++) {
            const float dl = d * (float)(sc[g] & 0x0F), ml = dmin * (float)(sc[g] >> 4);
            /* element e = r*128 + s*32 + j holds (qs[r*32 + j] >> 2s) & 3; group g covers e = 16g.. */
            const int r = g / 8, s = (g / 2) % 4, j0 = (g % 2) * 16;
            for (int j = 0; j < 16; j++) out[g * 16 + j] = dl * (float)((qs[r * 32 + j0 + j] >> (2 * s)) & 3) - ml;
        }
    }
}

/* Q3_K: hmask[32] qs[64] scales[12] d; w = (d * (sc - 32)) * (ql - 4 * !hbit). */
SCALAR void dq_q3_k(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 110;
        const uint8_t *hm = blk, *qs = blk + 32, *sc = blk + 96;
        const float d = h2f(blk + 108);
        for (int g = 0; g < 16; g++) {
            const int lo = g < 8 ? (sc[g] & 0x0F) : (sc[g - 8] >> 4);
            const int hi = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
            const float dl = d * (float)((lo | (hi << 4)) - 32);
            const int r = g / 8, s = (g / 2) % 4, j0 = (g % 2) * 16, hb = g / 2; /* element 16g+j: plane (16g+j)/32 */
            for (int j = 0; j < 16; j++) {
                const int ql = (qs[r * 32 + j0 + j] >> (2 * s)) & 3;
                const int h = (hm[j0 + j] >> hb) & 1;
                out[g * 16 + j] = dl * (float)(ql - ((h ^ 1) << 2));
            }
        }
    }
}

/* Q4_K / Q5_K 6-bit scales and mins from 12 bytes. */
static inline void k_scale_min(const uint8_t *s, float *sc, float *mn) {
    for (int i = 0; i < 4; i++) {
        sc[i] = (float)(s[i] & 0x3F);
        mn[i] = (float)(s[4 + i] & 0x3F);
        sc[4 + i] = (float)((s[8 + i] & 0x0F) | ((s[i] >> 2) & 0x30));
        mn[4 + i] = (float)((s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30));
    }
}

/* Q4_K: d dmin scales[12] qs[128]; 8 groups of 32; element r*64 + h*32 + j = nibble h of qs[r*32 + j]. */
SCALAR void dq_q4_k(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 144;
        const float d = h2f(blk), dmin = h2f(blk + 2);
        float sc[8], mn[8];
        k_scale_min(blk + 4, sc, mn);
        const uint8_t *qs = blk + 16;
        for (int r = 0; r < 4; r++) {
            const float dl0 = d * sc[2 * r], ml0 = dmin * mn[2 * r];
            const float dl1 = d * sc[2 * r + 1], ml1 = dmin * mn[2 * r + 1];
            for (int j = 0; j < 32; j++) {
                out[r * 64 + j] = dl0 * (float)(qs[r * 32 + j] & 0x0F) - ml0;
                out[r * 64 + 32 + j] = dl1 * (float)(qs[r * 32 + j] >> 4) - ml1;
            }
        }
    }
}

/* Q5_K: d dmin scales[12] qh[32] qs[128]; bit 4 of element i*32 + j is bit i of qh[j]. */
SCALAR void dq_q5_k(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 176;
        const float d = h2f(blk), dmin = h2f(blk + 2);
        float sc[8], mn[8];
        k_scale_min(blk + 4, sc, mn);
        const uint8_t *qh = blk + 16, *qs = blk + 48;
        for (int r = 0; r < 4; r++) {
            const float dl0 = d * sc[2 * r], ml0 = dmin * mn[2 * r];
            const float dl1 = d * sc[2 * r + 1], ml1 = dmin * mn[2 * r + 1];
            for (int j = 0; j < 32; j++) {
                const int q0 = (qs[r * 32 + j] & 0x0F) | (((qh[j] >> (2 * r)) & 1) << 4);
                const int q1 = (qs[r * 32 + j] >> 4) | (((qh[j] >> (2 * r + 1)) & 1) << 4);
                out[r * 64 + j] = dl0 * (float)q0 - ml0;
                out[r * 64 + 32 + j] = dl1 * (float)q1 - ml1;
            }
        }
    }
}

/* Q6_K: ql[128] qh[64] scales[16] (int8) d; 16 groups of 16;
 * element r*128 + s*32 + j (s = 0..3): low nibble from ql[r*64 + (s&1)*32 + j] (shift 4*(s>>1)),
 * high two bits (qh[r*32 + j] >> 2s) & 3; w = (d * sc) * (q - 32). */
SCALAR void dq_q6_k(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 210;
        const uint8_t *ql = blk, *qh = blk + 128;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = h2f(blk + 208);
        for (int r = 0; r < 2; r++) {
            for (int s = 0; s < 4; s++) {
                const uint8_t *l = ql + r * 64 + (s & 1) * 32;
                const int ls = 4 * (s >> 1);
                const uint8_t *h = qh + r * 32;
                const int g0 = r * 8 + s * 2;
                const float dl0 = d * (float)sc[g0], dl1 = d * (float)sc[g0 + 1];
                float *o = out + r * 128 + s * 32;
                for (int j = 0; j < 16; j++)
                    o[j] = dl0 * (float)((int)(((l[j] >> ls) & 0x0F) | (((h[j] >> (2 * s)) & 3) << 4)) - 32);
                for (int j = 16; j < 32; j++)
                    o[j] = dl1 * (float)((int)(((l[j] >> ls) & 0x0F) | (((h[j] >> (2 * s)) & 3) << 4)) - 32);
            }
        }
    }
}

/* IQ4_XS: d scales_h(u16) scales_l[4] qs[128]; 8 groups of 32; sc = (lo | hi << 4) - 32. */
SCALAR void dq_iq4_xs(const uint8_t *row, int64_t e0, int n, float *out) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 136;
        const float d = h2f(blk);
        uint16_t sh;
        memcpy(&sh, blk + 2, 2);
        const uint8_t *sl = blk + 4, *qs = blk + 8;
        for (int g = 0; g < 8; g++) {
            const int lo = (sl[g / 2] >> (4 * (g % 2))) & 0x0F, hi = (sh >> (2 * g)) & 3;
            const float dl = d * (float)((lo | (hi << 4)) - 32);
            const uint8_t *q = qs + g * 16;
            for (int j = 0; j < 16; j++) {
                out[g * 32 + j] = dl * IQ4_VALUES[q[j] & 0x0F];
                out[g * 32 + 16 + j] = dl * IQ4_VALUES[q[j] >> 4];
            }
        }
    }
}

#ifdef QA_AVX2
/* ------------------------------------------------------------------ AVX2 dequantizers
 * Same maths as the loops above (so gguf-py's bits): the codes of 16 or 32 weights are
 * gathered as signed bytes in a register, converted exactly to float32, then one rounded
 * multiply by the group scale and, for types with a min, one rounded add. */

#define AI static inline __attribute__((always_inline))

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}


/* Every AVX2 dequantizer below is written once over "emit" calls and compiled twice:
 * mode 0 stores the weights to out (dequantize, and the scratch of the multi-row matmul);
 * mode 1 multiplies them straight into x (out then points into x) and adds the products
 * into two of the four accumulators acc[0..3], so a one-row matmul never stores a weight. */
AI void put16(__m256 w0, __m256 w1, float *o, const int mode, __m256 *acc) {
    if (mode == 0) {
        _mm256_storeu_ps(o, w0);
        _mm256_storeu_ps(o + 8, w1);
    } else {
        acc[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(o), acc[0]);
        acc[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(o + 8), acc[1]);
    }
}

static inline __m256 cvt8(__m128i q) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)); }

/* o[0..15] = d * q (q: 16 signed bytes). */
AI void emit16(__m128i q, __m256 d, float *o, const int mode, __m256 *acc) {
    put16(_mm256_mul_ps(d, cvt8(q)), _mm256_mul_ps(d, cvt8(_mm_srli_si128(q, 8))), o, mode, acc);
}

/* o[0..15] = d * q + m (callers pass m = -min for the K-quants: a - b == a + -b exactly). */
AI void emit16_off(__m128i q, __m256 d, __m256 m, float *o, const int mode, __m256 *acc) {
    put16(_mm256_add_ps(_mm256_mul_ps(d, cvt8(q)), m), _mm256_add_ps(_mm256_mul_ps(d, cvt8(_mm_srli_si128(q, 8))), m),
          o, mode, acc);
}

static inline __m128i lo128(__m256i v) { return _mm256_castsi256_si128(v); }
static inline __m128i hi128(__m256i v) { return _mm256_extracti128_si256(v, 1); }

AI void emit32(__m256i q, __m256 d0, __m256 d1, float *o, const int mode, __m256 *acc) {
    emit16(lo128(q), d0, o, mode, acc);
    emit16(hi128(q), d1, o + 16, mode, acc + 2);
}

AI void emit32_off(__m256i q, __m256 d, __m256 m, float *o, const int mode, __m256 *acc) {
    emit16_off(lo128(q), d, m, o, mode, acc);
    emit16_off(hi128(q), d, m, o + 16, mode, acc + 2);
}

/* 16 bytes -> 32 nibbles: low nibbles first, then high nibbles (gguf's order in 32-blocks). */
static inline __m256i nibbles16(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
}

/* 32 bits (little-endian) -> 32 bytes, 0x10 where the bit is set (the fifth bit of Q5 codes). */
static inline __m256i bit4_from_bits32(const uint8_t *p) {
    uint32_t x32;
    memcpy(&x32, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

/* 4-bit codes -> IQ4 codebook values (all fit in int8). */
static inline __m256i iq4_lookup(__m256i codes) {
    const __m256i table = _mm256_broadcastsi128_si256(
        _mm_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113));
    return _mm256_shuffle_epi8(table, codes);
}

static inline __m256i load32(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* (v >> s) & mask per byte (16-bit shifts are safe: the mask drops the bits shifted across). */
static inline __m256i field(__m256i v, int s, int mask) {
    return _mm256_and_si256(_mm256_srli_epi16(v, s), _mm256_set1_epi8((char)mask));
}

AI void dqv_q8_0_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 34;
        const __m256 d = _mm256_set1_ps(h2f(blk));
        emit32(load32(blk + 2), d, d, out, mode, acc);
    }
}

AI void dqv_q4_0_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 18;
        const __m256 d = _mm256_set1_ps(h2f(blk));
        emit32(_mm256_sub_epi8(nibbles16(blk + 2), _mm256_set1_epi8(8)), d, d, out, mode, acc);
    }
}

AI void dqv_q4_1_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 20;
        emit32_off(nibbles16(blk + 4), _mm256_set1_ps(h2f(blk)), _mm256_set1_ps(h2f(blk + 2)), out, mode, acc);
    }
}

AI void dqv_q5_0_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 22;
        const __m256 d = _mm256_set1_ps(h2f(blk));
        const __m256i q = _mm256_or_si256(nibbles16(blk + 6), bit4_from_bits32(blk + 2));
        emit32(_mm256_sub_epi8(q, _mm256_set1_epi8(16)), d, d, out, mode, acc);
    }
}

AI void dqv_q5_1_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 24;
        const __m256i q = _mm256_or_si256(nibbles16(blk + 8), bit4_from_bits32(blk + 4));
        emit32_off(q, _mm256_set1_ps(h2f(blk)), _mm256_set1_ps(h2f(blk + 2)), out, mode, acc);
    }
}

AI void dqv_iq4_nl_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / 32; b++, out += 32) {
        const uint8_t *blk = row + (e0 / 32 + b) * 18;
        const __m256 d = _mm256_set1_ps(h2f(blk));
        emit32(iq4_lookup(nibbles16(blk + 2)), d, d, out, mode, acc);
    }
}

/* K-quants: element r*128 + s*32 + j of Q2_K/Q3_K/Q6_K is field s of byte j of run r (see above). */
AI void dqv_q2_k_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 84;
        const uint8_t *sc = blk;
        const float d = h2f(blk + 80), dmin = h2f(blk + 82);
        for (int r = 0; r < 2; r++) {
            const __m256i v = load32(blk + 16 + r * 32);
            for (int s = 0; s < 4; s++) {
                const __m256i q = field(v, 2 * s, 3);
                const int g = r * 8 + s * 2;
                float *o = out + r * 128 + s * 32;
                emit16_off(lo128(q), _mm256_set1_ps(d * (float)(sc[g] & 0x0F)),
                           _mm256_set1_ps(-(dmin * (float)(sc[g] >> 4))), o, mode, acc);
                emit16_off(hi128(q), _mm256_set1_ps(d * (float)(sc[g + 1] & 0x0F)),
                           _mm256_set1_ps(-(dmin * (float)(sc[g + 1] >> 4))), o + 16, mode, acc + 2);
            }
        }
    }
}

AI void dqv_q3_k_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 110;
        const uint8_t *sc = blk + 96;
        const float d = h2f(blk + 108);
        float dl[16];
        for (int g = 0; g < 16; g++) {
            const int lo = g < 8 ? (sc[g] & 0x0F) : (sc[g - 8] >> 4);
            const int hi = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
            dl[g] = d * (float)((lo | (hi << 4)) - 32);
        }
        const __m256i hm = load32(blk);
        for (int r = 0; r < 2; r++) {
            const __m256i v = load32(blk + 32 + r * 32);
            for (int s = 0; s < 4; s++) {
                /* q = ql - 4 where the hmask bit (plane r*4 + s) is clear */
                const __m256i h = field(hm, r * 4 + s, 1);
                const __m256i q = _mm256_sub_epi8(field(v, 2 * s, 3),
                                                  _mm256_slli_epi16(_mm256_xor_si256(h, _mm256_set1_epi8(1)), 2));
                const int g = r * 8 + s * 2;
                emit32(q, _mm256_set1_ps(dl[g]), _mm256_set1_ps(dl[g + 1]), out + r * 128 + s * 32, mode, acc);
            }
        }
    }
}

AI void dqv_q4_k_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 144;
        const float d = h2f(blk), dmin = h2f(blk + 2);
        float sc[8], mn[8];
        k_scale_min(blk + 4, sc, mn);
        for (int r = 0; r < 4; r++) {
            const __m256i v = load32(blk + 16 + r * 32);
            emit32_off(field(v, 0, 0x0F), _mm256_set1_ps(d * sc[2 * r]), _mm256_set1_ps(-(dmin * mn[2 * r])),
                       out + r * 64, mode, acc);
            emit32_off(field(v, 4, 0x0F), _mm256_set1_ps(d * sc[2 * r + 1]),
                       _mm256_set1_ps(-(dmin * mn[2 * r + 1])), out + r * 64 + 32, mode, acc);
        }
    }
}

AI void dqv_q5_k_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 176;
        const float d = h2f(blk), dmin = h2f(blk + 2);
        float sc[8], mn[8];
        k_scale_min(blk + 4, sc, mn);
        const __m256i qh = load32(blk + 16);
        for (int r = 0; r < 4; r++) {
            const __m256i v = load32(blk + 48 + r * 32);
            const __m256i q0 = _mm256_or_si256(field(v, 0, 0x0F), _mm256_slli_epi16(field(qh, 2 * r, 1), 4));
            const __m256i q1 = _mm256_or_si256(field(v, 4, 0x0F), _mm256_slli_epi16(field(qh, 2 * r + 1, 1), 4));
            emit32_off(q0, _mm256_set1_ps(d * sc[2 * r]), _mm256_set1_ps(-(dmin * mn[2 * r])), out + r * 64, mode, acc);
            emit32_off(q1, _mm256_set1_ps(d * sc[2 * r + 1]), _mm256_set1_ps(-(dmin * mn[2 * r + 1])),
                       out + r * 64 + 32, mode, acc);
        }
    }
}

AI void dqv_q6_k_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = h2f(blk + 208);
        for (int r = 0; r < 2; r++) {
            const __m256i l0 = load32(blk + r * 64), l1 = load32(blk + r * 64 + 32);
            const __m256i h = load32(blk + 128 + r * 32);
            for (int s = 0; s < 4; s++) {
                const __m256i l = field(s & 1 ? l1 : l0, 4 * (s >> 1), 0x0F);
                const __m256i q = _mm256_sub_epi8(_mm256_or_si256(l, _mm256_slli_epi16(field(h, 2 * s, 3), 4)),
                                                  _mm256_set1_epi8(32));
                const int g = r * 8 + s * 2;
                emit32(q, _mm256_set1_ps(d * (float)sc[g]), _mm256_set1_ps(d * (float)sc[g + 1]),
                       out + r * 128 + s * 32, mode, acc);
            }
        }
    }
}

AI void dqv_iq4_xs_(const uint8_t *row, int64_t e0, int n, float *out, const int mode, __m256 *acc) {
    for (int b = 0; b < n / QK_K; b++, out += QK_K) {
        const uint8_t *blk = row + (e0 / QK_K + b) * 136;
        const float d = h2f(blk);
        uint16_t sh;
        memcpy(&sh, blk + 2, 2);
        const uint8_t *sl = blk + 4;
        for (int g = 0; g < 8; g++) {
            const int lo = (sl[g / 2] >> (4 * (g % 2))) & 0x0F, hi = (sh >> (2 * g)) & 3;
            const __m256 dl = _mm256_set1_ps(d * (float)((lo | (hi << 4)) - 32));
            emit32(iq4_lookup(nibbles16(blk + 8 + g * 16)), dl, dl, out + g * 32, mode, acc);
        }
    }
}

/* The two compilations of each dequantizer (see put16). */
static void dqv_q8_0(const uint8_t *row, int64_t e0, int n, float *out) { dqv_q8_0_(row, e0, n, out, 0, 0); }
static float dot1_q8_0(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_q8_0_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
static void dqv_q4_0(const uint8_t *row, int64_t e0, int n, float *out) { dqv_q4_0_(row, e0, n, out, 0, 0); }
static float dot1_q4_0(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_q4_0_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
static void dqv_q4_1(const uint8_t *row, int64_t e0, int n, float *out) { dqv_q4_1_(row, e0, n, out, 0, 0); }
static float dot1_q4_1(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_q4_1_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
static void dqv_q5_0(const uint8_t *row, int64_t e0, int n, float *out) { dqv_q5_0_(row, e0, n, out, 0, 0); }
static float dot1_q5_0(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_q5_0_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
static void dqv_q5_1(const uint8_t *row, int64_t e0, int n, float *out) { dqv_q5_1_(row, e0, n, out, 0, 0); }
static float dot1_q5_1(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_q5_1_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
static void dqv_iq4_nl(const uint8_t *row, int64_t e0, int n, float *out) { dqv_iq4_nl_(row, e0, n, out, 0, 0); }
static float dot1_iq4_nl(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_iq4_nl_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
static void dqv_q2_k(const uint8_t *row, int64_t e0, int n, float *out) { dqv_q2_k_(row, e0, n, out, 0, 0); }
static float dot1_q2_k(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_q2_k_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
static void dqv_q3_k(const uint8_t *row, int64_t e0, int n, float *out) { dqv_q3_k_(row, e0, n, out, 0, 0); }
static float dot1_q3_k(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_q3_k_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
static void dqv_q4_k(const uint8_t *row, int64_t e0, int n, float *out) { dqv_q4_k_(row, e0, n, out, 0, 0); }
static float dot1_q4_k(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_q4_k_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
static void dqv_q5_k(const uint8_t *row, int64_t e0, int n, float *out) { dqv_q5_k_(row, e0, n, out, 0, 0); }
static float dot1_q5_k(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_q5_k_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
static void dqv_q6_k(const uint8_t *row, int64_t e0, int n, float *out) { dqv_q6_k_(row, e0, n, out, 0, 0); }
static float dot1_q6_k(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_q6_k_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
static void dqv_iq4_xs(const uint8_t *row, int64_t e0, int n, float *out) { dqv_iq4_xs_(row, e0, n, out, 0, 0); }
static float dot1_iq4_xs(const uint8_t *row, int64_t K, const float *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    dqv_iq4_xs_(row, 0, (int)K, (float *)x, 1, acc);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

/* Q8_0 and Q4_0, one input row, with the block scale factored out: sum_j (d q_j) x_j is
 * computed as d * (sum_j q_j x_j), the inner sum from exact int -> float codes, then one
 * fused multiply-add by d. d q_j is exact in float32 for these two types (fp16 scale times
 * an 8- or 4-bit code), so |d| sum|q_j x_j| = sum |w_j x_j| and the float32 accumulation
 * bound of the module header still holds (each product sees <= 4 more roundings); it saves
 * the multiply per 8 weights that dominates these two inner loops. */
AI __m256 block_sum32(__m256i q, const float *x) {
    const __m128i lo = lo128(q), hi = hi128(q);
    __m256 s = _mm256_mul_ps(cvt8(lo), _mm256_loadu_ps(x));
    __m256 t = _mm256_mul_ps(cvt8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(x + 8));
    s = _mm256_fmadd_ps(cvt8(hi), _mm256_loadu_ps(x + 16), s);
    t = _mm256_fmadd_ps(cvt8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(x + 24), t);
    return _mm256_add_ps(s, t);
}

#define DOT1_FACTORED(name, SIZE, CODES)                                                            \
    static float dot1f_##name(const uint8_t *row, int64_t K, const float *x) {                     \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;                                                   \
        const int64_t nb = K / 32;                                                                  \
        int64_t b = 0;                                                                              \
        for (; b + 2 <= nb; b += 2) {                                                               \
            const uint8_t *b0 = row + b * SIZE, *b1 = b0 + SIZE;                                    \
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(b0)), block_sum32(CODES(b0), x + b * 32), a0);  \
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(b1)), block_sum32(CODES(b1), x + b * 32 + 32), a1); \
        }                                                                                           \
        if (b < nb) {                                                                               \
            const uint8_t *b0 = row + b * SIZE;                                                     \
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(b0)), block_sum32(CODES(b0), x + b * 32), a0);  \
        }                                                                                           \
        return hsum(_mm256_add_ps(a0, a1));                                                         \
    }
static inline __m256i codes_q8_0(const uint8_t *blk) { return load32(blk + 2); }
static inline __m256i codes_q4_0(const uint8_t *blk) { return _mm256_sub_epi8(nibbles16(blk + 2), _mm256_set1_epi8(8)); }
DOT1_FACTORED(q8_0, 34, codes_q8_0)
DOT1_FACTORED(q4_0, 18, codes_q4_0)

/* Stored floats, one input row: converted in registers (F16C, bf16 << 16), four accumulators. */
#define DOT1_FLOAT(name, W8, ESZ)                                                                   \
    static float dot1_##name(const uint8_t *row, int64_t K, const float *x) {                      \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                 \
        int64_t k = 0;                                                                              \
        for (; k + 32 <= K; k += 32) {                                                              \
            a0 = _mm256_fmadd_ps(W8(row + ESZ * k), _mm256_loadu_ps(x + k), a0);                    \
            a1 = _mm256_fmadd_ps(W8(row + ESZ * (k + 8)), _mm256_loadu_ps(x + k + 8), a1);          \
            a2 = _mm256_fmadd_ps(W8(row + ESZ * (k + 16)), _mm256_loadu_ps(x + k + 16), a2);        \
            a3 = _mm256_fmadd_ps(W8(row + ESZ * (k + 24)), _mm256_loadu_ps(x + k + 24), a3);        \
        }                                                                                           \
        for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(W8(row + ESZ * k), _mm256_loadu_ps(x + k), a0); \
        float t = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));               \
        float w[8];                                                                                 \
        if (k < K) {                                                                                \
            dq_##name(row, k, (int)(K - k), w);                                                     \
            for (int j = 0; j < K - k; j++) t += w[j] * x[k + j];                                   \
        }                                                                                           \
        return t;                                                                                   \
    }
static inline __m256 f32x8(const uint8_t *p) { return _mm256_loadu_ps((const float *)p); }
static inline __m256 bf16x8(const uint8_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
DOT1_FLOAT(f32, f32x8, 4)
DOT1_FLOAT(bf16, bf16x8, 2)
#ifdef QA_F16C
static inline __m256 f16x8(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
DOT1_FLOAT(f16, f16x8, 2)
#define DOT1_F16 dot1_f16
#else
#define DOT1_F16 0
#endif
#define DQ(name) dqv_##name
#define DOT1(name) dot1_##name
#define DOT1F(name) dot1f_##name
#else
#define DQ(name) dq_##name
#define DOT1(name) 0
#define DOT1F(name) 0
#define DOT1_F16 0
#endif

typedef void (*dq_fn)(const uint8_t *, int64_t, int, float *);

typedef float (*dot1_fn)(const uint8_t *, int64_t, const float *);

typedef struct {
    int block, size;
    dq_fn dq;     /* elements -> float32 */
    dot1_fn dot1; /* one input row times one weight row, weights kept in registers (or 0) */
} tinfo;

static const tinfo *type_info(int type) {
#define G(name) BLOCK_##name, BYTES_##name
    static const tinfo F32 = {G(F32), dq_f32, DOT1(f32)}, F16 = {G(F16), dq_f16, DOT1_F16},
        BF16 = {G(BF16), dq_bf16, DOT1(bf16)}, Q8_0 = {G(Q8_0), DQ(q8_0), DOT1F(q8_0)},
        Q4_0 = {G(Q4_0), DQ(q4_0), DOT1F(q4_0)}, Q4_1 = {G(Q4_1), DQ(q4_1), DOT1(q4_1)},
        Q5_0 = {G(Q5_0), DQ(q5_0), DOT1(q5_0)}, Q5_1 = {G(Q5_1), DQ(q5_1), DOT1(q5_1)},
        IQ4_NL = {G(IQ4_NL), DQ(iq4_nl), DOT1(iq4_nl)}, Q2_K = {G(Q2_K), DQ(q2_k), DOT1(q2_k)},
        Q3_K = {G(Q3_K), DQ(q3_k), DOT1(q3_k)}, Q4_K = {G(Q4_K), DQ(q4_k), DOT1(q4_k)},
        Q5_K = {G(Q5_K), DQ(q5_k), DOT1(q5_k)}, Q6_K = {G(Q6_K), DQ(q6_k), DOT1(q6_k)},
        IQ4_XS = {G(IQ4_XS), DQ(iq4_xs), DOT1(iq4_xs)};
#undef G
    switch (type) {
    case T_F32: return &F32;
    case T_F16: return &F16;
    case T_BF16: return &BF16;
    case T_Q8_0: return &Q8_0;
    case T_Q4_0: return &Q4_0;
    case T_Q4_1: return &Q4_1;
    case T_Q5_0: return &Q5_0;
    case T_Q5_1: return &Q5_1;
    case T_IQ4_NL: return &IQ4_NL;
    case T_Q2_K: return &Q2_K;
    case T_Q3_K: return &Q3_K;
    case T_Q4_K: return &Q4_K;
    case T_Q5_K: return &Q5_K;
    case T_Q6_K: return &Q6_K;
    case T_IQ4_XS: return &IQ4_XS;
    default: return 0;
    }
}

/* ------------------------------------------------------------------ dot products */

/* out[m] = W_row . x[m] for m < MT: the row is dequantized CH elements at a time into a
 * scratch in L1 and multiplied into every input row while it is there. */
#define DEFINE_ROW(MT)                                                                              \
    static void row_dot_##MT(const tinfo *t, const uint8_t *row, int64_t K, const float *x,         \
                             int64_t ldx, float *out) {                                             \
        float buf[CH] __attribute__((aligned(32)));                                                 \
        float tail[MT];                                                                             \
        ROW_BODY(MT)                                                                                \
    }

#ifdef QA_AVX2
#define ROW_BODY(MT)                                                                                \
    __m256 a0[MT], a1[MT];                                                                          \
    for (int m = 0; m < MT; m++) { a0[m] = a1[m] = _mm256_setzero_ps(); tail[m] = 0.0f; }           \
    for (int64_t k0 = 0; k0 < K; k0 += CH) {                                                        \
        const int len = (int)(K - k0 < CH ? K - k0 : CH);                                           \
        t->dq(row, k0, len, buf);                                                                   \
        const float *xk = x + k0;                                                                   \
        int j = 0;                                                                                  \
        for (; j + 16 <= len; j += 16) {                                                            \
            const __m256 w0 = _mm256_load_ps(buf + j), w1 = _mm256_load_ps(buf + j + 8);           \
            for (int m = 0; m < MT; m++) {                                                          \
                a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xk + m * ldx + j), a0[m]);              \
                a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xk + m * ldx + j + 8), a1[m]);          \
            }                                                                                       \
        }                                                                                           \
        for (; j < len; j++)                                                                        \
            for (int m = 0; m < MT; m++) tail[m] += buf[j] * xk[m * ldx + j];                       \
    }                                                                                               \
    for (int m = 0; m < MT; m++) out[m] = hsum(_mm256_add_ps(a0[m], a1[m])) + tail[m];
#else
#ifdef _OPENMP
#define OMP_SIMD _Pragma("omp simd reduction(+:s)")
#else
#define OMP_SIMD
#endif
#define ROW_BODY(MT)                                                                                \
    for (int m = 0; m < MT; m++) tail[m] = 0.0f;                                                    \
    for (int64_t k0 = 0; k0 < K; k0 += CH) {                                                        \
        const int len = (int)(K - k0 < CH ? K - k0 : CH);                                           \
        t->dq(row, k0, len, buf);                                                                   \
        for (int m = 0; m < MT; m++) {                                                              \
            const float *xk = x + m * ldx + k0;                                                     \
            float s = 0.0f;                                                                         \
            OMP_SIMD for (int j = 0; j < len; j++) s += buf[j] * xk[j];   \
            tail[m] += s;                                                                           \
        }                                                                                           \
    }                                                                                               \
    for (int m = 0; m < MT; m++) out[m] = tail[m];
#endif

DEFINE_ROW(1)
DEFINE_ROW(2)
DEFINE_ROW(3)
DEFINE_ROW(4)

#ifdef QA_AVX2
/* Two weight rows times MT input rows: each x vector loaded once feeds two FMAs, so the
 * multi-row kernel is bound by FMAs rather than loads. U vectors per step keep enough
 * independent accumulators in flight (2 * MT * U <= 8 registers of the 16). */
#define DEFINE_PAIR(MT, U)                                                                          \
    static void pair_dot_##MT(const tinfo *t, const uint8_t *r0, const uint8_t *r1, int64_t K,      \
                              const float *x, int64_t ldx, float *o0, float *o1) {                  \
        float b0[CH] __attribute__((aligned(32))), b1[CH] __attribute__((aligned(32)));            \
        __m256 a[MT][2 * U];                                                                        \
        float t0[MT], t1[MT];                                                                       \
        for (int m = 0; m < MT; m++) {                                                              \
            for (int u = 0; u < 2 * U; u++) a[m][u] = _mm256_setzero_ps();                          \
            t0[m] = t1[m] = 0.0f;                                                                   \
        }                                                                                           \
        for (int64_t k0 = 0; k0 < K; k0 += CH) {                                                    \
            const int len = (int)(K - k0 < CH ? K - k0 : CH);                                       \
            t->dq(r0, k0, len, b0);                                                                 \
            t->dq(r1, k0, len, b1);                                                                 \
            const float *xk = x + k0;                                                               \
            int j = 0;                                                                              \
            for (; j + 8 * U <= len; j += 8 * U)                                                    \
                for (int u = 0; u < U; u++) {                                                       \
                    const __m256 w0 = _mm256_load_ps(b0 + j + 8 * u), w1 = _mm256_load_ps(b1 + j + 8 * u); \
                    for (int m = 0; m < MT; m++) {                                                  \
                        const __m256 xv = _mm256_loadu_ps(xk + m * ldx + j + 8 * u);                \
                        a[m][2 * u] = _mm256_fmadd_ps(w0, xv, a[m][2 * u]);                         \
                        a[m][2 * u + 1] = _mm256_fmadd_ps(w1, xv, a[m][2 * u + 1]);                 \
                    }                                                                               \
                }                                                                                   \
            for (; j < len; j++)                                                                    \
                for (int m = 0; m < MT; m++) {                                                      \
                    t0[m] += b0[j] * xk[m * ldx + j];                                               \
                    t1[m] += b1[j] * xk[m * ldx + j];                                               \
                }                                                                                   \
        }                                                                                           \
        for (int m = 0; m < MT; m++) {                                                              \
            __m256 s0 = a[m][0], s1 = a[m][1];                                                      \
            for (int u = 1; u < U; u++) {                                                           \
                s0 = _mm256_add_ps(s0, a[m][2 * u]);                                                \
                s1 = _mm256_add_ps(s1, a[m][2 * u + 1]);                                            \
            }                                                                                       \
            o0[m] = hsum(s0) + t0[m];                                                               \
            o1[m] = hsum(s1) + t1[m];                                                               \
        }                                                                                           \
    }
DEFINE_PAIR(1, 4)
DEFINE_PAIR(2, 2)
DEFINE_PAIR(3, 1)
DEFINE_PAIR(4, 1)
#endif

/* ------------------------------------------------------------------ 8-bit activations
 * llama.cpp's arithmetic, opt-in (kernels="q8"): each input row is quantized in blocks of 32,
 * q = round_half_even(x * (127 / amax)) in [-127, 127], d = amax / 127, and each weight block
 * of 32 is written as w = a * u + c (a, c per block or per half-block of 16; u: signed codes
 * for the types whose offset is a fixed multiple of a, else unsigned codes <= 63), so a
 * block's dot product is a * d * sum(u q) + c * d * sum(q), the integer sum exact (VNNI
 * vpdpbusd, or AVX2 maddubs + madd, on |u| and sign(q, u) for signed codes). The only error
 * against the float32 weights is the activation rounding, |y - y_exact| <= sum_blocks d / 2 *
 * sum |w|, plus float32 rounding of the per-block products and their sum. */
typedef struct {
    float d;        /* amax / 127 (0 for an all-zero block) */
    int32_t s;      /* sum of q */
    /* terms the 8-row kernels read by a broadcast from memory (an integer or float multiply and a broadcast
     * from a register per block and input row cost them ~10% at 8 rows): */
    int32_t ns8, ns128; /* -8 s, -128 s: the Q4_0 / Q8_0 offsets' */
    int32_t nh32[2];    /* -32 h: Q6_K's per half-block */
    float ds;           /* d * s: the K-quants' minimums' */
    int16_t h[2];   /* sums of q over elements 0..15 and 16..31 */
    int8_t q[32];
} xblk;

#define Q8_MAX_ROWS 4

#ifdef QA_AVX2
AI __m256i dot32(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); /* u <= 128: no saturation */
#endif
}

static inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* x[0..K) -> K/32 blocks (K % 32 == 0) and ds[b] = d * sum(q) (the offset terms' factor). */
static void quantize_row_q8(const float *x, int64_t K, xblk *out, float *ds) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), lim = _mm256_set1_epi32(127),
                  nlim = _mm256_set1_epi32(-127);
    const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int64_t b = 0; b < K / 32; b++) {
        const float *p = x + b * 32;
        const __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8), v2 = _mm256_loadu_ps(p + 16),
                     v3 = _mm256_loadu_ps(p + 24);
        const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                       _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        xblk *o = out + b;
        if (!(amax > 0.0f)) { /* all zeros (NaN/inf inputs are refused by the caller) */
            memset(o, 0, sizeof *o);
            ds[b] = 0.0f;
            continue;
        }
        o->d = amax / 127.0f;
        const __m256 id = _mm256_set1_ps(127.0f / amax);
#define Q8_CODES(v) _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v, id), rnd)), lim), nlim)
        const __m256i i0 = Q8_CODES(v0), i1 = Q8_CODES(v1), i2 = Q8_CODES(v2), i3 = Q8_CODES(v3);
#undef Q8_CODES
        o->h[0] = (int16_t)hsum_i32(_mm256_add_epi32(i0, i1));
        o->h[1] = (int16_t)hsum_i32(_mm256_add_epi32(i2, i3));
        o->s = o->h[0] + o->h[1];
        o->ns8 = -8 * o->s;
        o->ns128 = -128 * o->s;
        o->nh32[0] = -32 * o->h[0];
        o->nh32[1] = -32 * o->h[1];
        o->ds = o->d * (float)o->s;
        ds[b] = o->d * (float)o->s;
        const __m256i q = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)), perm);
        _mm256_storeu_si256((__m256i *)o->q, q);
    }
}

/* A buffer for M quantized rows of K: the blocks, then ds [M * K / 32] (*ds set). NULL when out of memory. */
static xblk *alloc_rows_q8(int64_t M, int64_t K, float **ds) {
    const int64_t nb = K / 32;
    xblk *xq = (xblk *)malloc((size_t)(M * nb > 0 ? M * nb : 1) * (sizeof(xblk) + sizeof(float)));
    if (xq) *ds = (float *)(xq + M * nb);
    return xq;
}

/* M rows of x quantized into one new buffer (alloc_rows_q8's). NULL when out of memory. */
static xblk *quantize_rows_q8(const float *x, int64_t ldx, int64_t M, int64_t K, float **ds) {
    const int64_t nb = K / 32;
    xblk *xq = alloc_rows_q8(M, K, ds);
    if (xq)
        for (int64_t m = 0; m < M; m++) quantize_row_q8(x + m * ldx, K, xq + m * nb, *ds + m * nb);
    return xq;
}

/* One super-block (1 or 8 blocks of 32) of a weight row: codes u[], scales a[] (per half-block
 * of 16) and, for the unsigned-code types, per-block offsets c[] (w = a u + c). */
#define UNPACK(name) AI void unpack_##name(const uint8_t *blk, __m256i *u, float *a, float *c)

UNPACK(q8_0) { (void)c; u[0] = load32(blk + 2); a[0] = a[1] = h2f(blk); }
UNPACK(iq4_nl) { (void)c; u[0] = iq4_lookup(nibbles16(blk + 2)); a[0] = a[1] = h2f(blk); }
UNPACK(q4_0) { (void)c; u[0] = _mm256_sub_epi8(nibbles16(blk + 2), _mm256_set1_epi8(8)); a[0] = a[1] = h2f(blk); }
UNPACK(q5_0) {
    (void)c;
    u[0] = _mm256_sub_epi8(_mm256_or_si256(nibbles16(blk + 6), bit4_from_bits32(blk + 2)), _mm256_set1_epi8(16));
    a[0] = a[1] = h2f(blk);
}
UNPACK(q4_1) { u[0] = nibbles16(blk + 4); a[0] = a[1] = h2f(blk); c[0] = h2f(blk + 2); }
UNPACK(q5_1) {
    u[0] = _mm256_or_si256(nibbles16(blk + 8), bit4_from_bits32(blk + 4));
    a[0] = a[1] = h2f(blk);
    c[0] = h2f(blk + 2);
}
UNPACK(q4_k) {
    const float d = h2f(blk), dmin = h2f(blk + 2);
    float sc[8], mn[8];
    k_scale_min(blk + 4, sc, mn);
    for (int r = 0; r < 4; r++) {
        const __m256i v = load32(blk + 16 + r * 32);
        u[2 * r] = field(v, 0, 0x0F);
        u[2 * r + 1] = field(v, 4, 0x0F);
    }
    for (int s = 0; s < 8; s++) {
        a[2 * s] = a[2 * s + 1] = d * sc[s];
        c[s] = -(dmin * mn[s]);
    }
}
UNPACK(q5_k) {
    const float d = h2f(blk), dmin = h2f(blk + 2);
    float sc[8], mn[8];
    k_scale_min(blk + 4, sc, mn);
    const __m256i qh = load32(blk + 16);
    for (int r = 0; r < 4; r++) {
        const __m256i v = load32(blk + 48 + r * 32);
        u[2 * r] = _mm256_or_si256(field(v, 0, 0x0F), _mm256_slli_epi16(field(qh, 2 * r, 1), 4));
        u[2 * r + 1] = _mm256_or_si256(field(v, 4, 0x0F), _mm256_slli_epi16(field(qh, 2 * r + 1, 1), 4));
    }
    for (int s = 0; s < 8; s++) {
        a[2 * s] = a[2 * s + 1] = d * sc[s];
        c[s] = -(dmin * mn[s]);
    }
}
UNPACK(q6_k) {
    (void)c;
    const int8_t *sc = (const int8_t *)(blk + 192);
    const float d = h2f(blk + 208);
    for (int r = 0; r < 2; r++) {
        const __m256i l0 = load32(blk + r * 64), l1 = load32(blk + r * 64 + 32);
        const __m256i h = load32(blk + 128 + r * 32);
        for (int s = 0; s < 4; s++)
            u[r * 4 + s] = _mm256_sub_epi8(
                _mm256_or_si256(field(s & 1 ? l1 : l0, 4 * (s >> 1), 0x0F), _mm256_slli_epi16(field(h, 2 * s, 3), 4)),
                _mm256_set1_epi8(32));
    }
    for (int g = 0; g < 16; g++) a[g] = d * (float)sc[g];
}

/* out[m] = W_row . x[m] (m < MT) over quantized inputs. SB: elements per super-block; SIGNED:
 * signed codes, no offsets; HALVES: a differs between the halves of a block. Two accumulators
 * per input row alternate between blocks (one would serialise on the FMA latency). */
AI void q8_row(const uint8_t *row, int64_t K, const xblk *x, const float *ds, int64_t ldx, float *out,
               const int MT, const int SB, const int SIZE, const int SIGNED, const int HALVES,
               void (*unpack)(const uint8_t *, __m256i *, float *, float *)) {
    __m256 acc[Q8_MAX_ROWS][2];
    float corr[Q8_MAX_ROWS][2];
    for (int m = 0; m < MT; m++) {
        acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        corr[m][0] = corr[m][1] = 0.0f;
    }
    const int nsub = SB / 32;
    for (int64_t b = 0; b < K / SB; b++) {
        __m256i u[8];
        float a[16], c[8];
        unpack(row + b * SIZE, u, a, c);
        for (int s = 0; s < nsub; s++) {
            const int64_t j = b * nsub + s;
            for (int m = 0; m < MT; m++) {
                const xblk *xb = x + m * ldx + j;
                const __m256i q = _mm256_loadu_si256((const __m256i *)xb->q);
                const __m256i p = SIGNED ? dot32(_mm256_sign_epi8(u[s], u[s]), _mm256_sign_epi8(q, u[s])) : dot32(u[s], q);
                const float d = xb->d;
                const __m256 A = HALVES ? _mm256_setr_m128(_mm_set1_ps(a[2 * s] * d), _mm_set1_ps(a[2 * s + 1] * d))
                                        : _mm256_set1_ps(a[2 * s] * d);
                acc[m][s & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), A, acc[m][s & 1]);
                if (!SIGNED) corr[m][s & 1] += c[s] * ds[m * ldx + j];
            }
        }
        if (nsub == 1 && b + 1 < K / SB) { /* alternate the accumulators between single blocks too */
            b++;
            unpack(row + b * SIZE, u, a, c);
            for (int m = 0; m < MT; m++) {
                const xblk *xb = x + m * ldx + b;
                const __m256i q = _mm256_loadu_si256((const __m256i *)xb->q);
                const __m256i p = SIGNED ? dot32(_mm256_sign_epi8(u[0], u[0]), _mm256_sign_epi8(q, u[0])) : dot32(u[0], q);
                const float d = xb->d;
                const __m256 A = HALVES ? _mm256_setr_m128(_mm_set1_ps(a[0] * d), _mm_set1_ps(a[1] * d))
                                        : _mm256_set1_ps(a[0] * d);
                acc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), A, acc[m][1]);
                if (!SIGNED) corr[m][1] += c[0] * ds[m * ldx + b];
            }
        }
    }
    for (int m = 0; m < MT; m++) out[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1])) + (corr[m][0] + corr[m][1]);
}

typedef void (*q8_row_fn)(const uint8_t *, int64_t, const xblk *, const float *, int64_t, float *);

#define Q8_ROWS(name, SB, SIZE, SIGNED, HALVES)                                                        \
    static void q8_##name##_1(const uint8_t *r, int64_t K, const xblk *x, const float *ds, int64_t l, float *o) { \
        q8_row(r, K, x, ds, l, o, 1, SB, SIZE, SIGNED, HALVES, unpack_##name);                        \
    }                                                                                                 \
    static void q8_##name##_2(const uint8_t *r, int64_t K, const xblk *x, const float *ds, int64_t l, float *o) { \
        q8_row(r, K, x, ds, l, o, 2, SB, SIZE, SIGNED, HALVES, unpack_##name);                        \
    }                                                                                                 \
    static void q8_##name##_3(const uint8_t *r, int64_t K, const xblk *x, const float *ds, int64_t l, float *o) { \
        q8_row(r, K, x, ds, l, o, 3, SB, SIZE, SIGNED, HALVES, unpack_##name);                        \
    }                                                                                                 \
    static void q8_##name##_4(const uint8_t *r, int64_t K, const xblk *x, const float *ds, int64_t l, float *o) { \
        q8_row(r, K, x, ds, l, o, 4, SB, SIZE, SIGNED, HALVES, unpack_##name);                        \
    }                                                                                                 \
    static const q8_row_fn q8_##name[4] = {q8_##name##_1, q8_##name##_2, q8_##name##_3, q8_##name##_4};

Q8_ROWS(q8_0, 32, 34, 1, 0)
Q8_ROWS(iq4_nl, 32, 18, 1, 0)
Q8_ROWS(q4_0, 32, 18, 1, 0)
Q8_ROWS(q5_0, 32, 22, 1, 0)
Q8_ROWS(q4_1, 32, 20, 0, 0)
Q8_ROWS(q5_1, 32, 24, 0, 0)
Q8_ROWS(q4_k, 256, 144, 0, 0)
Q8_ROWS(q5_k, 256, 176, 0, 0)
Q8_ROWS(q6_k, 256, 210, 1, 1)

static const q8_row_fn *q8_kernels(int type) {
    switch (type) {
    case T_Q8_0: return q8_q8_0;
    case T_IQ4_NL: return q8_iq4_nl;
    case T_Q4_0: return q8_q4_0;
    case T_Q4_1: return q8_q4_1;
    case T_Q5_0: return q8_q5_0;
    case T_Q5_1: return q8_q5_1;
    case T_Q4_K: return q8_q4_k;
    case T_Q5_K: return q8_q5_k;
    case T_Q6_K: return q8_q6_k;
    default: return 0;
    }
}
#endif

/* 1 when qa_matmul_q8 runs this GGUF type (AVX2 builds only). */
int qa_q8_supported(int type) {
#ifdef QA_AVX2
    return q8_kernels(type) != 0;
#else
    (void)type;
    return 0;
#endif
}

/* The activation quantization alone (tests compare it with an independent one): x [M, K] ->
 * d[M, K/32], q[M, K] (int8). Returns 0, -1 for K % 32, -2 without AVX2. */
int qa_quantize_q8(const float *x, int64_t ldx, int64_t M, int64_t K, float *d, int8_t *q) {
#ifdef QA_AVX2
    if (K % 32) return -1;
    float *ds;
    xblk *buf = quantize_rows_q8(x, ldx, M, K, &ds);
    if (!buf) return -3;
    for (int64_t b = 0; b < M * (K / 32); b++) {
        d[b] = buf[b].d;
        memcpy(q + b * 32, buf[b].q, 32);
    }
    free(buf);
    return 0;
#else
    (void)x; (void)ldx; (void)M; (void)K; (void)d; (void)q;
    return -2;
#endif
}

/* y = x @ W^T with x quantized to 8 bits per block of 32 (see above). Returns 0; -1 for bad
 * shapes; -2 when the type (or this build) has no 8-bit kernel; -3 when out of memory. */
int qa_matmul_q8(int type, const uint8_t *w, int64_t N, int64_t K, int64_t row_bytes, const float *x,
                 int64_t ldx, int64_t M, float *y, int64_t ldy, int nthreads) {
#ifdef QA_AVX2
    const tinfo *t = type_info(type);
    const q8_row_fn *fns = q8_kernels(type);
    if (!t || !fns) return -2;
    if (K % t->block || row_bytes != K / t->block * t->size || N < 0 || M < 0) return -1;
    if (nthreads < 1) nthreads = 1;
    const int64_t nb = K / 32;
    float *ds;
    xblk *xq = quantize_rows_q8(x, ldx, M, K, &ds);
    if (!xq) return -3;
    const int64_t chunk = N / ((int64_t)nthreads * 32) > 1 ? N / ((int64_t)nthreads * 32) : 1;
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nthreads) if (nthreads > 1)
    for (int64_t n = 0; n < N; n++) {
        float out[Q8_MAX_ROWS];
        for (int64_t m0 = 0; m0 < M; m0 += Q8_MAX_ROWS) {
            const int mt = (int)(M - m0 < Q8_MAX_ROWS ? M - m0 : Q8_MAX_ROWS);
            fns[mt - 1](w + n * row_bytes, K, xq + m0 * nb, ds + m0 * nb, nb, out);
            for (int m = 0; m < mt; m++) y[(m0 + m) * ldy + n] = out[m];
        }
    }
    free(xq);
    return 0;
#else
    (void)type; (void)w; (void)N; (void)K; (void)row_bytes; (void)x; (void)ldx; (void)M; (void)y; (void)ldy; (void)nthreads;
    return -2;
#endif
}


/* ------------------------------------------------------------------ 8-row interleaved layout
 * For the 8-bit-activation path, Q4_0 and Q8_0 weights are repacked once at load so that one
 * integer dot-product instruction serves 8 output rows: per group of 8 rows and block of 32,
 * the 8 fp16 scales, then the codes in 4-byte runs, run j of rows 0..7 side by side (Q4_0: 16
 * bytes of nibbles per row, low nibble = element e, high = e + 16; Q8_0: the codes + 128 as
 * unsigned bytes). Lane r of an int32 vector then accumulates row r against the broadcast 4
 * activation codes of the run; the offsets (-8, -128) come back through the block's code sum.
 * Same bytes per block as the file (8 * 18, 8 * 34). */
#define X8_Q4_0_SIZE (8 * 18)
/* Input rows per pass over the weights (a batch of up to 8 sequences reads each weight once). */
#define X8_MAX_ROWS 8
#define X8_Q8_0_SIZE (8 * 34)

#if defined(QA_AVX2)
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define QA_VNNI 1
#endif

static void repack_q4_0_x8(const uint8_t *w, int64_t row_bytes, int64_t nb, uint8_t *out) {
    for (int64_t b = 0; b < nb; b++, out += X8_Q4_0_SIZE) {
        for (int r = 0; r < 8; r++) memcpy(out + 2 * r, w + r * row_bytes + b * 18, 2);
        for (int j = 0; j < 4; j++)
            for (int r = 0; r < 8; r++) memcpy(out + 16 + j * 32 + r * 4, w + r * row_bytes + b * 18 + 2 + 4 * j, 4);
    }
}

static void repack_q8_0_x8(const uint8_t *w, int64_t row_bytes, int64_t nb, uint8_t *out) {
    for (int64_t b = 0; b < nb; b++, out += X8_Q8_0_SIZE) {
        for (int r = 0; r < 8; r++) memcpy(out + 2 * r, w + r * row_bytes + b * 34, 2);
        for (int j = 0; j < 8; j++)
            for (int r = 0; r < 8; r++)
                for (int k = 0; k < 4; k++) out[16 + j * 32 + r * 4 + k] = w[r * row_bytes + b * 34 + 2 + 4 * j + k] ^ 0x80;
    }
}

static void unrepack_q4_0_x8(const uint8_t *in, int64_t row_bytes, int64_t nb, uint8_t *w) {
    for (int64_t b = 0; b < nb; b++, in += X8_Q4_0_SIZE) {
        for (int r = 0; r < 8; r++) memcpy(w + r * row_bytes + b * 18, in + 2 * r, 2);
        for (int j = 0; j < 4; j++)
            for (int r = 0; r < 8; r++) memcpy(w + r * row_bytes + b * 18 + 2 + 4 * j, in + 16 + j * 32 + r * 4, 4);
    }
}

static void unrepack_q8_0_x8(const uint8_t *in, int64_t row_bytes, int64_t nb, uint8_t *w) {
    for (int64_t b = 0; b < nb; b++, in += X8_Q8_0_SIZE) {
        for (int r = 0; r < 8; r++) memcpy(w + r * row_bytes + b * 34, in + 2 * r, 2);
        for (int j = 0; j < 8; j++)
            for (int r = 0; r < 8; r++)
                for (int k = 0; k < 4; k++) w[r * row_bytes + b * 34 + 2 + 4 * j + k] = in[16 + j * 32 + r * 4 + k] ^ 0x80;
    }
}

/* acc += u . broadcast(4 activation codes) per int32 lane (u: unsigned, <= 15 without VNNI). */
AI __m256i dp4(__m256i acc, __m256i u, const int8_t *q4) {
    int32_t v;
    memcpy(&v, q4, 4);
#ifdef QA_VNNI
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, _mm256_set1_epi32(v));
#else
    return _mm256_dpbusd_avx_epi32(acc, u, _mm256_set1_epi32(v));
#endif
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_set1_epi32(v)), _mm256_set1_epi16(1)));
#endif
}

/* sum over the 8 steps of a block of 32 (two chains), lane = row. */
AI __m256i dp32(const __m256i *u, const int8_t *q) {
    __m256i p0 = _mm256_setzero_si256(), p1 = _mm256_setzero_si256();
    for (int j = 0; j < 8; j += 2) {
        p0 = dp4(p0, u[j], q + 4 * j);
        p1 = dp4(p1, u[j + 1], q + 4 * j + 4);
    }
    return _mm256_add_epi32(p0, p1);
}

/* acc + (8 rows' codes u . the block's activation codes - offset * their sum) * 8 rows' scales * d
 * (offset 8 or 128; its term starts one of the two chains). */
AI __m256 x8_block32(const __m256i *u, const xblk *xb, const int offset, __m256 dw, __m256 acc) {
    __m256i p0 = _mm256_set1_epi32(offset == 8 ? xb->ns8 : xb->ns128), p1 = _mm256_setzero_si256();
    for (int j = 0; j < 8; j += 2) {
        p0 = dp4(p0, u[j], xb->q + 4 * j);
        p1 = dp4(p1, u[j + 1], xb->q + 4 * j + 4);
    }
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), _mm256_mul_ps(dw, _mm256_set1_ps(xb->d)), acc);
}

/* Ask for the weights ahead into L2: 8 KiB ahead in one-row passes, 32 KiB in passes over several input
 * rows. The hardware prefetcher alone leaves these loops waiting on memory whenever they do more work
 * per byte than a one-row Q4_0 pass: measured on Zen 4 (2 threads, weights streamed from DRAM), a
 * one-row Q6_K pass goes from 20 to 27 GB/s and an 8-row pass over any type gets 25-45% faster (32 KiB
 * ahead ~10% more than 8), while one-row Q4_0 / Q8_0 / Q4_K passes are already at the memory's pace and
 * get 2-5% slower with it: those skip it (the MT tests are compile-time constants). */
AI void prefetch_ahead(const uint8_t *blk, const int size, const int MT) {
    const int ahead = MT > 1 ? 32768 : 8192;
    for (int l = 0; l < size; l += 64) _mm_prefetch((const char *)blk + ahead + l, _MM_HINT_T1);
}

/* out[m * 8 + r] = row r of the group . x[m], m < MT. */
AI void x8_q4_0(const uint8_t *grp, int64_t nb, const xblk *x, int64_t ldx, float *out, const int MT) {
    __m256 acc[X8_MAX_ROWS];
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = grp + b * X8_Q4_0_SIZE;
        if (MT > 1) prefetch_ahead(blk, X8_Q4_0_SIZE, MT);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        __m256i u[8]; /* runs 0..3: low nibbles (elements 4j..), 4..7: high nibbles (elements 16 + 4j..) */
        for (int j = 0; j < 4; j++) {
            const __m256i v = load32(blk + 16 + 32 * j);
            u[j] = _mm256_and_si256(v, m4);
            u[4 + j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        }
        for (int m = 0; m < MT; m++) acc[m] = x8_block32(u, x + m * ldx + b, 8, dw, acc[m]);
    }
    for (int m = 0; m < MT; m++) _mm256_storeu_ps(out + 8 * m, acc[m]);
}

#ifdef QA_VNNI
AI void x8_q8_0(const uint8_t *grp, int64_t nb, const xblk *x, int64_t ldx, float *out, const int MT) {
    __m256 acc[X8_MAX_ROWS];
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = grp + b * X8_Q8_0_SIZE;
        if (MT > 1) prefetch_ahead(blk, X8_Q8_0_SIZE, MT);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        __m256i u[8];
        for (int j = 0; j < 8; j++) u[j] = load32(blk + 16 + 32 * j);
        for (int m = 0; m < MT; m++) acc[m] = x8_block32(u, x + m * ldx + b, 128, dw, acc[m]);
    }
    for (int m = 0; m < MT; m++) _mm256_storeu_ps(out + 8 * m, acc[m]);
}
#endif

/* Two groups of 8 rows in one 512-bit pass (AVX-512 VNNI), for several input rows: each activation
 * broadcast and each float step then serves 16 rows. Zen 4 runs a 512-bit operation as two 256-bit
 * halves, yet an 8-input-row Q4_0 pass takes 25% less time this way (fewer instructions to issue),
 * with the same numbers: the lanes' integer sums and float steps are those of x8_block32. */
#if defined(QA_VNNI) && defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QA_X16 1
/* 32 bytes of group a in the low half, of group b in the high one */
AI __m512i load2x32(const uint8_t *a, const uint8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(load32(a)), load32(b), 1);
}
AI __m512 scales2(const uint8_t *a, const uint8_t *b) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)a)))),
                                               _mm256_castps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b))), 1));
}
AI __m512 x16_block32(const __m512i *u, const xblk *xb, const int offset, __m512 dw, __m512 acc) {
    __m512i p0 = _mm512_set1_epi32(offset == 8 ? xb->ns8 : xb->ns128), p1 = _mm512_setzero_si512();
    for (int j = 0; j < 8; j += 2) {
        int32_t v0, v1;
        memcpy(&v0, xb->q + 4 * j, 4);
        memcpy(&v1, xb->q + 4 * j + 4, 4);
        p0 = _mm512_dpbusd_epi32(p0, u[j], _mm512_set1_epi32(v0));
        p1 = _mm512_dpbusd_epi32(p1, u[j + 1], _mm512_set1_epi32(v1));
    }
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1)), _mm512_mul_ps(dw, _mm512_set1_ps(xb->d)), acc);
}
/* acc[m] += block b of the 16 rows . x[m] for the MT input rows. From 4 rows on, the steps go outermost
 * and each input row keeps one chain: consecutive dot products are then independent, where the
 * row-by-row form leaves the out-of-order window to find them (an 8-row Q4_0 pass ~5% faster, measured
 * on Zen 4 with the weights streamed from memory; the integer sums are exact either way). */
AI void x16_rows(const __m512i *u, const xblk *x, int64_t ldx, int64_t b, const int offset, __m512 dw, __m512 *acc,
                 const int MT) {
    if (MT < 4) {
        for (int m = 0; m < MT; m++) acc[m] = x16_block32(u, x + m * ldx + b, offset, dw, acc[m]);
        return;
    }
    __m512i p[X8_MAX_ROWS];
    for (int m = 0; m < MT; m++) p[m] = _mm512_set1_epi32(offset == 8 ? x[m * ldx + b].ns8 : x[m * ldx + b].ns128);
    for (int j = 0; j < 8; j++)
        for (int m = 0; m < MT; m++) {
            int32_t v;
            memcpy(&v, x[m * ldx + b].q + 4 * j, 4);
            p[m] = _mm512_dpbusd_epi32(p[m], u[j], _mm512_set1_epi32(v));
        }
    for (int m = 0; m < MT; m++)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p[m]), _mm512_mul_ps(dw, _mm512_set1_ps(x[m * ldx + b].d)), acc[m]);
}
/* out[m * 16 + r]: rows 0..7 of group a, then of group b, . x[m] */
AI void x16_q4_0(const uint8_t *ga, const uint8_t *gb, int64_t nb, const xblk *x, int64_t ldx, float *out, const int MT) {
    __m512 acc[X8_MAX_ROWS];
    for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *ba = ga + b * X8_Q4_0_SIZE, *bb = gb + b * X8_Q4_0_SIZE;
        prefetch_ahead(ba, X8_Q4_0_SIZE, MT);
        prefetch_ahead(bb, X8_Q4_0_SIZE, MT);
        const __m512 dw = scales2(ba, bb);
        __m512i u[8];
        for (int j = 0; j < 4; j++) {
            const __m512i v = load2x32(ba + 16 + 32 * j, bb + 16 + 32 * j);
            u[j] = _mm512_and_si512(v, m4);
            u[4 + j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        }
        x16_rows(u, x, ldx, b, 8, dw, acc, MT);
    }
    for (int m = 0; m < MT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}
AI void x16_q8_0(const uint8_t *ga, const uint8_t *gb, int64_t nb, const xblk *x, int64_t ldx, float *out, const int MT) {
    __m512 acc[X8_MAX_ROWS];
    for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *ba = ga + b * X8_Q8_0_SIZE, *bb = gb + b * X8_Q8_0_SIZE;
        prefetch_ahead(ba, X8_Q8_0_SIZE, MT);
        prefetch_ahead(bb, X8_Q8_0_SIZE, MT);
        const __m512 dw = scales2(ba, bb);
        __m512i u[8];
        for (int j = 0; j < 8; j++) u[j] = load2x32(ba + 16 + 32 * j, bb + 16 + 32 * j);
        x16_rows(u, x, ldx, b, 128, dw, acc, MT);
    }
    for (int m = 0; m < MT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}
#endif

/* Q4_K, per group of 8 rows and super-block of 256: d[8], dmin[8] (fp16), the file's 12 bytes of 6-bit
 * scales and mins per row as three 32-bit words, word-major (w[k][8 rows], unpacked by q4k_scales on 8
 * or 16 rows at once), then for each run of 64 elements (r = 0..3) and 4-byte step jj = 0..7 the 8
 * rows' bytes qs[32 r + 4 jj ..] side by side (low nibbles: sub-block 2r, high: 2r + 1). 1152 bytes,
 * as the file (8 * 144): resident memory stays the file's size. */
#define X8_Q4_K_SIZE 1152
/* Q6_K: d[8] (fp16), scales[16 groups][8 rows] (int8), then ql runs (r = 0..1, half h = 0..1,
 * jj = 0..7: the 8 rows' ql[64 r + 32 h + 4 jj ..]) and qh runs (r, jj: qh[32 r + 4 jj ..]).
 * 1680 bytes, as the file. */
#define X8_Q6_K_SIZE 1680

static void repack_q4_k_x8(const uint8_t *w, int64_t row_bytes, int64_t nsb, uint8_t *out) {
    for (int64_t b = 0; b < nsb; b++, out += X8_Q4_K_SIZE) {
        for (int i = 0; i < 8; i++) {
            const uint8_t *blk = w + i * row_bytes + b * 144;
            memcpy(out + 2 * i, blk, 2);
            memcpy(out + 16 + 2 * i, blk + 2, 2);
            for (int k = 0; k < 3; k++) memcpy(out + 32 + (k * 8 + i) * 4, blk + 4 + 4 * k, 4);
            for (int r = 0; r < 4; r++)
                for (int jj = 0; jj < 8; jj++) memcpy(out + 128 + (r * 8 + jj) * 32 + i * 4, blk + 16 + 32 * r + 4 * jj, 4);
        }
    }
}

static void unrepack_q4_k_x8(const uint8_t *in, int64_t row_bytes, int64_t nsb, uint8_t *w) {
    for (int64_t b = 0; b < nsb; b++, in += X8_Q4_K_SIZE) {
        for (int i = 0; i < 8; i++) {
            uint8_t *blk = w + i * row_bytes + b * 144;
            memcpy(blk, in + 2 * i, 2);
            memcpy(blk + 2, in + 16 + 2 * i, 2);
            for (int k = 0; k < 3; k++) memcpy(blk + 4 + 4 * k, in + 32 + (k * 8 + i) * 4, 4);
            for (int r = 0; r < 4; r++)
                for (int jj = 0; jj < 8; jj++) memcpy(blk + 16 + 32 * r + 4 * jj, in + 128 + (r * 8 + jj) * 32 + i * 4, 4);
        }
    }
}

static void q6_k_x8_convert(uint8_t *in, int64_t row_bytes, int64_t nsb, uint8_t *w, const int back) {
    for (int64_t b = 0; b < nsb; b++, in += X8_Q6_K_SIZE) {
        for (int i = 0; i < 8; i++) {
            uint8_t *blk = w + i * row_bytes + b * 210;
#define MOVE(dst_x8, src_file, n) (back ? memcpy(src_file, dst_x8, n) : memcpy(dst_x8, src_file, n))
            MOVE(in + 2 * i, blk + 208, 2);
            for (int g = 0; g < 16; g++) MOVE(in + 16 + g * 8 + i, blk + 192 + g, 1);
            for (int r = 0; r < 2; r++)
                for (int h = 0; h < 2; h++)
                    for (int jj = 0; jj < 8; jj++)
                        MOVE(in + 144 + ((r * 2 + h) * 8 + jj) * 32 + i * 4, blk + 64 * r + 32 * h + 4 * jj, 4);
            for (int r = 0; r < 2; r++)
                for (int jj = 0; jj < 8; jj++) MOVE(in + 144 + 1024 + (r * 8 + jj) * 32 + i * 4, blk + 128 + 32 * r + 4 * jj, 4);
#undef MOVE
        }
    }
}
static void repack_q6_k_x8(const uint8_t *w, int64_t rb, int64_t nsb, uint8_t *out) { q6_k_x8_convert(out, rb, nsb, (uint8_t *)w, 0); }
static void unrepack_q6_k_x8(const uint8_t *in, int64_t rb, int64_t nsb, uint8_t *w) { q6_k_x8_convert((uint8_t *)in, rb, nsb, w, 1); }

/* The 6-bit scales and mins of a super-block from its words w0..w2 (bytes 0..3, 4..7, 8..11 of each row's
 * 12; lane = row), as llama.cpp unpacks them: u[0] = scales 0..3, u[1] = scales 4..7, u[2] = mins 0..3,
 * u[3] = mins 4..7, one byte per value; q4k_value(u[t], k) = byte k of each lane in float. */
AI void q4k_scales(__m256i w0, __m256i w1, __m256i w2, __m256i *u) {
    const __m256i k1 = _mm256_set1_epi32(0x3f3f3f3f), k2 = _mm256_set1_epi32(0x0f0f0f0f), k3 = _mm256_set1_epi32(0x03030303);
    u[0] = _mm256_and_si256(w0, k1);
    u[2] = _mm256_and_si256(w1, k1);
    u[1] = _mm256_or_si256(_mm256_and_si256(w2, k2), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w0, 6), k3), 4));
    u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(w2, 4), k2),
                           _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w1, 6), k3), 4));
}
AI __m256 q4k_value(__m256i u, int k) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(u, 8 * k), _mm256_set1_epi32(0xFF)));
}

AI void x8_q4_k(const uint8_t *grp, int64_t nsb, const xblk *x, int64_t ldx, float *out, const int MT) {
    __m256 acc[X8_MAX_ROWS];
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *blk = grp + b * X8_Q4_K_SIZE;
        if (MT > 1) prefetch_ahead(blk, X8_Q4_K_SIZE, MT);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));
        __m256 f[X8_MAX_ROWS], c[X8_MAX_ROWS];
        for (int m = 0; m < MT; m++) f[m] = c[m] = _mm256_setzero_ps();
        __m256i u[4];
        q4k_scales(load32(blk + 32), load32(blk + 64), load32(blk + 96), u);
        for (int r = 0; r < 4; r++) {
            /* this run's two sub-blocks' scales and mins only: all eight would not fit the registers beside
             * the 16 code vectors */
            const __m256 sc0 = q4k_value(u[r / 2], (2 * r) % 4), sc1 = q4k_value(u[r / 2], (2 * r + 1) % 4);
            const __m256 mn0 = q4k_value(u[2 + r / 2], (2 * r) % 4), mn1 = q4k_value(u[2 + r / 2], (2 * r + 1) % 4);
            __m256i lo[8], hi[8];
            for (int jj = 0; jj < 8; jj++) {
                const __m256i v = load32(blk + 128 + (r * 8 + jj) * 32);
                lo[jj] = _mm256_and_si256(v, m4);
                hi[jj] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
            for (int m = 0; m < MT; m++) {
                const xblk *x0 = x + m * ldx + b * 8 + 2 * r, *x1 = x0 + 1;
                f[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp32(lo, x0->q)), _mm256_mul_ps(sc0, _mm256_set1_ps(x0->d)), f[m]);
                f[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp32(hi, x1->q)), _mm256_mul_ps(sc1, _mm256_set1_ps(x1->d)), f[m]);
                c[m] = _mm256_fmadd_ps(mn0, _mm256_set1_ps(x0->ds), c[m]);
                c[m] = _mm256_fmadd_ps(mn1, _mm256_set1_ps(x1->ds), c[m]);
            }
        }
        for (int m = 0; m < MT; m++) acc[m] = _mm256_fmadd_ps(d, f[m], _mm256_fnmadd_ps(dmin, c[m], acc[m]));
    }
    for (int m = 0; m < MT; m++) _mm256_storeu_ps(out + 8 * m, acc[m]);
}

/* a | (b & c), one instruction where AVX-512VL has ternary logic */
AI __m256i or_and(__m256i a, __m256i b, __m256i c) {
#if defined(__AVX512VL__)
    return _mm256_ternarylogic_epi32(a, b, c, 0xF8);
#else
    return _mm256_or_si256(a, _mm256_and_si256(b, c));
#endif
}

/* Q6_K: 6-bit codes u = ql nibble | qh pair << 4, the -32 offset in integers (u.x - 32 sum x). The dot
 * products of one super-block (f[m] += its 8 rows . input row m, before d) take one of two forms, picked
 * by the number of input rows (measured on Zen 4, 2 threads: each is the faster one on its side). */

/* One or two rows: a run's 8 qh vectors stay in registers across its 4 steps; group scales in float. */
AI void q6_k_sb_few(const uint8_t *blk, const xblk *x, int64_t ldx, int64_t b, __m256 *f, const int MT) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    for (int r = 0; r < 2; r++) {
        __m256i qh[8];
        for (int jj = 0; jj < 8; jj++) qh[jj] = load32(blk + 144 + 1024 + (r * 8 + jj) * 32);
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
            __m256i u[8];
            for (int jj = 0; jj < 8; jj++) {
                const __m256i l = load32(blk + 144 + ((r * 2 + (s & 1)) * 8 + jj) * 32);
                const __m256i lo = s < 2 ? _mm256_and_si256(l, m4) : _mm256_and_si256(_mm256_srli_epi16(l, 4), m4);
                /* bits 2s, 2s + 1 of qh moved to bits 4, 5 */
                const __m256i hi = s == 2 ? _mm256_and_si256(qh[jj], m30)
                                 : s < 2 ? _mm256_and_si256(_mm256_slli_epi16(qh[jj], 4 - 2 * s), m30)
                                         : _mm256_and_si256(_mm256_srli_epi16(qh[jj], 2), m30);
                u[jj] = _mm256_or_si256(lo, hi);
            }
            const int g = r * 8 + s * 2; /* groups g (elements 0..15) and g + 1 (16..31) */
            const __m256 s0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 16 + 8 * g))));
            const __m256 s1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 24 + 8 * g))));
            for (int m = 0; m < MT; m++) {
                const xblk *xb = x + m * ldx + b * 8 + r * 4 + s;
                __m256i p0 = _mm256_setzero_si256(), p1 = _mm256_setzero_si256();
                for (int jj = 0; jj < 4; jj++) {
                    p0 = dp4(p0, u[jj], xb->q + 4 * jj);
                    p1 = dp4(p1, u[jj + 4], xb->q + 16 + 4 * jj);
                }
                p0 = _mm256_sub_epi32(p0, _mm256_set1_epi32(32 * xb->h[0]));
                p1 = _mm256_sub_epi32(p1, _mm256_set1_epi32(32 * xb->h[1]));
                const __m256 dx = _mm256_set1_ps(xb->d);
                f[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_mul_ps(s0, dx), f[m]);
                f[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_mul_ps(s1, dx), f[m]);
            }
        }
    }
}

/* More rows (qh held across steps would spill): qh re-read from L1 per step, the dot products as 4
 * short chains, the group scales in integers (exact), one float step per block of 32. */
AI void q6_k_sb_many(const uint8_t *blk, const xblk *x, int64_t ldx, int64_t b, __m256 *f, const int MT) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    for (int r = 0; r < 2; r++) {
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
            /* ql and qh re-read from L1 per step: holding qh's 8 vectors across the steps spills registers
             * once several input rows share the codes */
            __m256i u[8];
            for (int jj = 0; jj < 8; jj++) {
                const __m256i l = load32(blk + 144 + ((r * 2 + (s & 1)) * 8 + jj) * 32);
                const __m256i qh = load32(blk + 144 + 1024 + (r * 8 + jj) * 32);
                const __m256i lo = s < 2 ? _mm256_and_si256(l, m4) : _mm256_and_si256(_mm256_srli_epi16(l, 4), m4);
                /* bits 2s, 2s + 1 of qh moved to bits 4, 5 */
                const __m256i hs = s == 2 ? qh : s < 2 ? _mm256_slli_epi16(qh, 4 - 2 * s) : _mm256_srli_epi16(qh, 2);
                u[jj] = or_and(lo, hs, m30);
            }
            const int g = r * 8 + s * 2; /* groups g (elements 0..15) and g + 1 (16..31) */
            const __m256i s0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 16 + 8 * g)));
            const __m256i s1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 24 + 8 * g)));
            for (int m = 0; m < MT; m++) {
                const xblk *xb = x + m * ldx + b * 8 + r * 4 + s;
                /* four short chains rather than two long ones: the dot products' latency, not their
                 * count, bounds a one-row pass */
                const __m256i z = _mm256_setzero_si256();
                __m256i p0 = dp4(dp4(_mm256_set1_epi32(xb->nh32[0]), u[0], xb->q), u[1], xb->q + 4);
                __m256i p2 = dp4(dp4(z, u[2], xb->q + 8), u[3], xb->q + 12);
                __m256i p1 = dp4(dp4(_mm256_set1_epi32(xb->nh32[1]), u[4], xb->q + 16), u[5], xb->q + 20);
                __m256i p3 = dp4(dp4(z, u[6], xb->q + 24), u[7], xb->q + 28);
                p0 = _mm256_mullo_epi32(_mm256_add_epi32(p0, p2), s0);
                p1 = _mm256_mullo_epi32(_mm256_add_epi32(p1, p3), s1);
                f[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), _mm256_set1_ps(xb->d), f[m]);
            }
        }
    }
}

AI void x8_q6_k(const uint8_t *grp, int64_t nsb, const xblk *x, int64_t ldx, float *out, const int MT) {
    __m256 acc[X8_MAX_ROWS];
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *blk = grp + b * X8_Q6_K_SIZE;
        prefetch_ahead(blk, X8_Q6_K_SIZE, MT);
        __m256 f[X8_MAX_ROWS];
        for (int m = 0; m < MT; m++) f[m] = _mm256_setzero_ps();
        if (MT <= 2) q6_k_sb_few(blk, x, ldx, b, f, MT);
        else q6_k_sb_many(blk, x, ldx, b, f, MT);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        for (int m = 0; m < MT; m++) acc[m] = _mm256_fmadd_ps(d, f[m], acc[m]);
    }
    for (int m = 0; m < MT; m++) _mm256_storeu_ps(out + 8 * m, acc[m]);
}

#ifdef QA_X16
AI __m512i dp4x16(__m512i acc, __m512i u, const int8_t *q4) {
    int32_t v;
    memcpy(&v, q4, 4);
    return _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(v));
}

/* x8_q4_k on two groups. Per super-block the scales and mins go to float once, times d and dmin (the
 * compiler keeps them on the stack) and go straight into the accumulators: no per-input-row f and c
 * beside the 16 code vectors (those spilled). Per run of 64 elements its 8 code vectors give both
 * sub-blocks' codes; each input row's two sums run as four chains. An 8-row pass 2-4% faster hot,
 * ~1% streamed (Zen 4, 2 threads). */
AI void x16_q4_k(const uint8_t *ga, const uint8_t *gb, int64_t nsb, const xblk *x, int64_t ldx, float *out, const int MT) {
    __m512 acc[X8_MAX_ROWS];
    for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *ba = ga + b * X8_Q4_K_SIZE, *bb = gb + b * X8_Q4_K_SIZE;
        prefetch_ahead(ba, X8_Q4_K_SIZE, MT);
        prefetch_ahead(bb, X8_Q4_K_SIZE, MT);
        const __m512 d = scales2(ba, bb), dmin = scales2(ba + 16, bb + 16);
        __m512 scd[8], mnd[8];
        {
            /* q4k_scales on both groups' words */
            const __m512i w0 = load2x32(ba + 32, bb + 32), w1 = load2x32(ba + 64, bb + 64), w2 = load2x32(ba + 96, bb + 96);
            const __m512i k1 = _mm512_set1_epi32(0x3f3f3f3f), k2 = _mm512_set1_epi32(0x0f0f0f0f),
                          k3 = _mm512_set1_epi32(0x03030303), ff = _mm512_set1_epi32(0xFF);
            __m512i u[4];
            u[0] = _mm512_and_si512(w0, k1);
            u[2] = _mm512_and_si512(w1, k1);
            u[1] = _mm512_or_si512(_mm512_and_si512(w2, k2), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w0, 6), k3), 4));
            u[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w2, 4), k2),
                                   _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w1, 6), k3), 4));
            for (int j = 0; j < 8; j++) {
                scd[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(u[j / 4], 8 * (j % 4)), ff)), d);
                mnd[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(u[2 + j / 4], 8 * (j % 4)), ff)), dmin);
            }
        }
        for (int r = 0; r < 4; r++) { /* run r: sub-blocks 2r (low nibbles) and 2r + 1 (high) */
            __m512i lo[8], hi[8];
            for (int jj = 0; jj < 8; jj++) {
                const __m512i v = load2x32(ba + 128 + (r * 8 + jj) * 32, bb + 128 + (r * 8 + jj) * 32);
                lo[jj] = _mm512_and_si512(v, m4);
                hi[jj] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
            for (int m = 0; m < MT; m++) {
                const xblk *x0 = x + m * ldx + b * 8 + 2 * r, *x1 = x0 + 1;
                __m512i p0 = _mm512_setzero_si512(), p1 = _mm512_setzero_si512(), p2 = _mm512_setzero_si512(),
                        p3 = _mm512_setzero_si512();
                for (int jj = 0; jj < 8; jj += 2) {
                    p0 = dp4x16(p0, lo[jj], x0->q + 4 * jj);
                    p1 = dp4x16(p1, lo[jj + 1], x0->q + 4 * jj + 4);
                    p2 = dp4x16(p2, hi[jj], x1->q + 4 * jj);
                    p3 = dp4x16(p3, hi[jj + 1], x1->q + 4 * jj + 4);
                }
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1)), _mm512_mul_ps(scd[2 * r], _mm512_set1_ps(x0->d)), acc[m]);
                acc[m] = _mm512_fnmadd_ps(mnd[2 * r], _mm512_set1_ps(x0->ds), acc[m]);
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p2, p3)), _mm512_mul_ps(scd[2 * r + 1], _mm512_set1_ps(x1->d)), acc[m]);
                acc[m] = _mm512_fnmadd_ps(mnd[2 * r + 1], _mm512_set1_ps(x1->ds), acc[m]);
            }
        }
    }
    for (int m = 0; m < MT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

#endif

typedef void (*x8_fn)(const uint8_t *, int64_t, const xblk *, int64_t, float *);
#define X8_FN(name, MT) \
    static void name##_##MT(const uint8_t *g, int64_t nb, const xblk *x, int64_t l, float *o) { name(g, nb, x, l, o, MT); }
#define X8_FNS(name)                                                                                 \
    X8_FN(name, 1) X8_FN(name, 2) X8_FN(name, 3) X8_FN(name, 4) X8_FN(name, 5) X8_FN(name, 6) X8_FN(name, 7) \
    X8_FN(name, 8)                                                                                   \
    static const x8_fn name##_fns[X8_MAX_ROWS] = {name##_1, name##_2, name##_3, name##_4, name##_5, name##_6, \
                                                  name##_7, name##_8};
X8_FNS(x8_q4_0)
X8_FNS(x8_q4_k)
X8_FNS(x8_q6_k)
#ifdef QA_VNNI
X8_FNS(x8_q8_0)
#endif

typedef void (*x16_fn)(const uint8_t *, const uint8_t *, int64_t, const xblk *, int64_t, float *);
#ifdef QA_X16
#define X16_FN(name, MT)                                                                             \
    static void name##_##MT(const uint8_t *a, const uint8_t *b, int64_t nb, const xblk *x, int64_t l, float *o) { \
        name(a, b, nb, x, l, o, MT);                                                                 \
    }
#define X16_FNS(name)                                                                                \
    X16_FN(name, 2) X16_FN(name, 3) X16_FN(name, 4) X16_FN(name, 5) X16_FN(name, 6) X16_FN(name, 7)  \
    X16_FN(name, 8)                                                                                  \
    static const x16_fn name##_fns[X8_MAX_ROWS] = {0, name##_2, name##_3, name##_4, name##_5, name##_6, \
                                                   name##_7, name##_8};
X16_FNS(x16_q4_0)
X16_FNS(x16_q8_0)
X16_FNS(x16_q4_k)
#define X16_OR_NULL(fns) fns
#else
#define X16_OR_NULL(fns) 0
#endif

typedef struct {
    int block; /* elements per (super-)block: 32 or 256 */
    int size;  /* bytes per group of 8 rows and (super-)block */
    void (*repack)(const uint8_t *, int64_t, int64_t, uint8_t *);
    void (*unrepack)(const uint8_t *, int64_t, int64_t, uint8_t *);
    const x8_fn *fns;
    const x16_fn *fns16; /* two groups per pass, by input rows (null: none, or none for that count) */
} x8info;

static const x8info *x8_info(int type) {
    static const x8info Q4_0 = {32, X8_Q4_0_SIZE, repack_q4_0_x8, unrepack_q4_0_x8, x8_q4_0_fns, X16_OR_NULL(x16_q4_0_fns)};
    static const x8info Q4_K = {256, X8_Q4_K_SIZE, repack_q4_k_x8, unrepack_q4_k_x8, x8_q4_k_fns, X16_OR_NULL(x16_q4_k_fns)};
    static const x8info Q6_K = {256, X8_Q6_K_SIZE, repack_q6_k_x8, unrepack_q6_k_x8, x8_q6_k_fns, 0}; /* 16-row form measured slower (spills) */
    if (type == T_Q4_K) return &Q4_K;
    if (type == T_Q6_K) return &Q6_K;
#ifdef QA_VNNI
    static const x8info Q8_0 = {32, X8_Q8_0_SIZE, repack_q8_0_x8, unrepack_q8_0_x8, x8_q8_0_fns, X16_OR_NULL(x16_q8_0_fns)};
    if (type == T_Q8_0) return &Q8_0;
#endif
    return type == T_Q4_0 ? &Q4_0 : 0;
}
#else
typedef struct { int block, size; } x8info;
static const x8info *x8_info(int type) { (void)type; return 0; }
#endif

/* Bytes of the 8-row layout of an [N, K] weight, or 0 when this type/shape/build has none. */
int64_t qa_x8_bytes(int type, int64_t N, int64_t K) {
    const x8info *xi = x8_info(type);
    if (!xi || N % 8 || K % xi->block) return 0;
    return N / 8 * (K / xi->block) * xi->size;
}

/* W (file layout) <-> the 8-row layout (direction 0: repack into out, 1: back into w). */
int qa_x8_convert(int type, uint8_t *w, int64_t N, int64_t K, int64_t row_bytes, uint8_t *out, int direction,
                  int nthreads) {
    if (!qa_x8_bytes(type, N, K)) return -2;
#ifdef QA_AVX2
    const x8info *xi = x8_info(type);
    const tinfo *t = type_info(type);
    if (row_bytes != K / t->block * t->size) return -1;
    const int64_t nb = K / xi->block, gbytes = nb * xi->size;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1)
    for (int64_t g = 0; g < N / 8; g++) {
        if (direction == 0) xi->repack(w + g * 8 * row_bytes, row_bytes, nb, out + g * gbytes);
        else xi->unrepack(out + g * gbytes, row_bytes, nb, w + g * 8 * row_bytes);
    }
    return 0;
#else
    (void)w; (void)row_bytes; (void)out; (void)direction; (void)nthreads;
    return -2;
#endif
}

/* A LoRA plan entry: row, A's address, Bt's address, rank r, the scale's double bits, the first output column,
 * the output count N, A's row length (the input width it was built for), and the factors' element type
 * (T_F32, T_F16 or T_BF16: an adapter file's half-precision factors are read as they are, never widened in
 * memory, so a step streams half the bytes; every product and sum is float32 either way). */
#define QA_LORA_FIELDS 9
static int lora_entry(const int64_t *p, const float *x, int64_t ldx, int64_t K, float *y, int64_t ldy);
static int lora_delta(const int64_t *p, const float *x, int64_t ldx, int64_t K, float *out);
static float *lora_spans(int64_t n, const int64_t *plan, int64_t **off);
static void lora_add_spans(int64_t n, const int64_t *plan, const float *buf, const int64_t *off, float *y,
                           int64_t ldy);

/* Every entry of a LoRA plan inside the call's bounds: its row among the M input rows, its outputs inside the
 * ny floats of a y row, a rank the kernel takes (1..256), factors built for inputs of K values. A plan that is
 * not is refused (-4) before anything is written. */
static int lora_plan_ok(int64_t n, const int64_t *plan, int64_t M, int64_t K, int64_t ny) {
    if (n < 0 || (n > 0 && !plan)) return 0;
    for (int64_t e = 0; e < n; e++) {
        const int64_t *p = plan + QA_LORA_FIELDS * e;
        if (p[0] < 0 || p[0] >= M || !p[1] || !p[2] || p[3] < 1 || p[3] > 256 || p[5] < 0 || p[6] < 1 ||
            p[5] + p[6] > ny || p[7] != K || (p[8] != T_F32 && p[8] != T_F16 && p[8] != T_BF16))
            return 0;
    }
    return 1;
}

/* What a grouped call first does to each input row, in its parallel region (a decode step's norms and
 * activations are otherwise serial work that leaves the other threads waiting): nothing (x is the
 * input), an RMS norm of src [M, K] into x, or silu(gate) * up of src [M, 2 K] (gate then up) into x. */
enum { PRE_NONE, PRE_NORM, PRE_SILU };
typedef struct {
    int kind;
    const float *src;
    const float *w; /* the norm's weight */
    float eps;
} x8_pre;

static void rms_row(const float *x, int64_t n, const float *w, float eps, float *out);
static void silu_mul(const float *g, const float *u, int64_t n, float *out);

/* Several weights on the same input in one call (a layer's q, k, v or gate, up): plan[3 i ..]
 * = (type, address of the 8-row layout, rows N_i) for i < n, all with K columns; y [M, sum N_i]
 * gets each weight's outputs side by side. One parallel region: the rows' prologue (pre) and
 * quantization spread over the threads, then the weights' work.
 *
 * With nl LoRA entries (qa_lora_rows' plan, on the same x and y): with several threads each entry is a
 * work item spread among the weights' (its delta into its own span of a buffer, the spans added to y at
 * the end in plan order: entries on the same outputs too, as a row with several adapters or an X-LoRA
 * step's experts), so a step's adapter factors stream from memory while the other thread multiplies
 * (on several input rows the base pass is bound by arithmetic, not memory); one thread: after the
 * weights, in order. */
#ifdef QA_AVX2
/* Row m's prologue and quantization. */
static void pre_row(const x8_pre *pre, float *x, int64_t ldx, int64_t K, int64_t m, xblk *xq, float *ds) {
    const int64_t nb = K / 32;
    float *xm = x + m * ldx;
    if (pre->kind == PRE_NORM) rms_row(pre->src + m * K, K, pre->w, pre->eps, xm);
    else if (pre->kind == PRE_SILU) silu_mul(pre->src + m * 2 * K, pre->src + m * 2 * K + K, K, xm);
    quantize_row_q8(xm, K, xq + m * nb, ds + m * nb);
}
#endif

static int x8_lora_run(int n, const int64_t *plan, int64_t K, float *x, int64_t ldx, int64_t M, float *y,
                       int64_t ldy, int64_t nl, const int64_t *lplan, int nthreads, const x8_pre *pre) {
#ifdef QA_AVX2
    if (n < 1 || n > 8 || nl < 0 || M < 0 || K < 1) return -1;
    if (!lora_plan_ok(nl, lplan, M, K, ldy)) return -4;
    const x8info *xi[8];
    int64_t u0[9], col[8];
    int pair[8];
    u0[0] = 0;
    int64_t c = 0;
    for (int i = 0; i < n; i++) {
        if (!plan[3 * i + 1] || plan[3 * i + 2] < 8 || !qa_x8_bytes((int)plan[3 * i], plan[3 * i + 2], K)) return -2;
        xi[i] = x8_info((int)plan[3 * i]);
        /* work units: pairs of groups where the type has a 16-row pass and there are several input rows */
        pair[i] = xi[i]->fns16 != 0 && M >= 2;
        const int64_t groups = plan[3 * i + 2] / 8;
        u0[i + 1] = u0[i] + (pair[i] ? (groups + 1) / 2 : groups);
        col[i] = c;
        c += plan[3 * i + 2];
    }
    if (c > ldy) return -1;
    if (nthreads < 1) nthreads = 1;
    const int64_t nb = K / 32, U = u0[n];
    /* LoRA items at positions s0 + e * step of the W = U + L work items */
    const int64_t L = nl > 0 && nthreads > 1 ? nl : 0, W = U + L;
    const int64_t step = L ? W / L : 1, s0 = step / 2;
    int64_t *off = 0;
    float *dl = L ? lora_spans(nl, lplan, &off) : 0;
    if (L && !dl) return -3;
    float *ds;
    xblk *xq = alloc_rows_q8(M, K, &ds);
    if (!xq) {
        free(dl);
        free(off);
        return -3;
    }
    int lrc = 0;
    const int64_t chunk = W / ((int64_t)nthreads * 8) > 1 ? W / ((int64_t)nthreads * 8) : 1;
    /* rows' prologue in the region only when every thread gets a row: with fewer rows (a batch-1 step) it
     * runs on this thread, before the region, and the step has one fewer barrier */
    const int rows_par = nthreads > 1 && M >= nthreads;
    if (!rows_par)
        for (int64_t m = 0; m < M; m++) pre_row(pre, x, ldx, K, m, xq, ds);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1) reduction(| : lrc)
    {
        if (rows_par) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) pre_row(pre, x, ldx, K, m, xq, ds);
        }
#pragma omp for schedule(dynamic, chunk)
        for (int64_t t = 0; t < W; t++) {
            const int64_t before = !L || t <= s0 ? 0 : ((t - s0 - 1) / step + 1 < L ? (t - s0 - 1) / step + 1 : L);
            if (L && t >= s0 && (t - s0) % step == 0 && (t - s0) / step < L) {
                const int64_t e = (t - s0) / step;
                lrc |= lora_delta(lplan + QA_LORA_FIELDS * e, x, ldx, K, dl + off[e]);
                continue;
            }
            const int64_t uu = t - before;
            int i = 0;
            while (uu >= u0[i + 1]) i++;
            const int64_t groups = plan[3 * i + 2] / 8, nsb = K / xi[i]->block, gbytes = nsb * xi[i]->size;
            const int64_t g = pair[i] ? 2 * (uu - u0[i]) : uu - u0[i];
            const int width = pair[i] && g + 1 < groups ? 2 : 1;
            const uint8_t *wx = (const uint8_t *)(intptr_t)plan[3 * i + 1] + g * gbytes;
            float out[X8_MAX_ROWS * 16];
            for (int64_t m0 = 0; m0 < M; m0 += X8_MAX_ROWS) {
                const int mt = (int)(M - m0 < X8_MAX_ROWS ? M - m0 : X8_MAX_ROWS);
                float *yo = y + m0 * ldy + col[i] + 8 * g;
                if (width == 2 && xi[i]->fns16[mt - 1]) {
                    xi[i]->fns16[mt - 1](wx, wx + gbytes, nsb, xq + m0 * nb, nb, out);
                    for (int m = 0; m < mt; m++) memcpy(yo + m * ldy, out + 16 * m, 16 * sizeof(float));
                    continue;
                }
                for (int h = 0; h < width; h++) {
                    xi[i]->fns[mt - 1](wx + h * gbytes, nsb, xq + m0 * nb, nb, out);
                    for (int m = 0; m < mt; m++) memcpy(yo + m * ldy + 8 * h, out + 8 * m, 8 * sizeof(float));
                }
            }
        }
    }
    if (L) lora_add_spans(nl, lplan, dl, off, y, ldy);
    free(xq);
    free(dl);
    free(off);
    if (!L)
        for (int64_t e = 0; e < nl; e++) lrc |= lora_entry(lplan + QA_LORA_FIELDS * e, x, ldx, K, y, ldy);
    return lrc;
#else
    (void)n; (void)plan; (void)K; (void)x; (void)ldx; (void)M; (void)y; (void)ldy; (void)nl; (void)lplan; (void)nthreads;
    (void)pre;
    return -2;
#endif
}

int qa_matmul_x8_lora(int n, const int64_t *plan, int64_t K, const float *x, int64_t ldx, int64_t M, float *y,
                      int64_t ldy, int64_t nl, const int64_t *lplan, int nthreads) {
    const x8_pre none = {PRE_NONE, 0, 0, 0.0f};
    return x8_lora_run(n, plan, K, (float *)x, ldx, M, y, ldy, nl, lplan, nthreads, &none); /* x only read */
}


/* y = x @ W^T on the 8-row layout, x quantized to 8 bits per block of 32. Return codes as qa_matmul_q8. */
int qa_matmul_x8(int type, const uint8_t *wx, int64_t N, int64_t K, const float *x, int64_t ldx, int64_t M,
                 float *y, int64_t ldy, int nthreads) {
    const int64_t plan[3] = {type, (int64_t)(intptr_t)wx, N};
    return qa_matmul_x8_lora(1, plan, K, x, ldx, M, y, ldy, 0, 0, nthreads);
}

/* A gated MLP block on rows of x [M, K] in one call: out = x + down(silu(gate(h)) * up(h)), h = rms_norm(x),
 * gate/up/down in the 8-row layout (gate_up: the grouped plan of gate then up, each F rows; down: [K, F]),
 * with LoRA deltas (qa_lora_rows' plans: ngu entries on gate/up's outputs, nd on down's; 0 for none).
 * out may be x. Returns as qa_matmul_x8. */
int qa_mlp_x8_lora(const float *x, int64_t M, int64_t K, const float *norm_w, float eps, const int64_t *gate_up,
                   int64_t F, int down_type, const uint8_t *down, int64_t ngu, const int64_t *lgu, int64_t nd,
                   const int64_t *ld, float *out, int nthreads) {
    float *h = (float *)malloc((size_t)M * (size_t)(K + 3 * F) * sizeof(float));
    if (!h) return -3;
    float *gu = h + M * K, *a = gu + M * 2 * F;
    const x8_pre norm = {PRE_NORM, x, norm_w, eps}, silu = {PRE_SILU, gu, 0, 0.0f};
    int rc = x8_lora_run(2, gate_up, K, h, K, M, gu, 2 * F, ngu, lgu, nthreads, &norm);
    if (!rc) {
        const int64_t dplan[3] = {down_type, (int64_t)(intptr_t)down, K};
        rc = x8_lora_run(1, dplan, F, a, F, M, h, K, nd, ld, nthreads, &silu); /* h now holds down's output */
    }
    if (!rc)
        for (int64_t i = 0; i < M * K; i++) out[i] = x[i] + h[i];
    free(h);
    return rc;
}


/* ------------------------------------------------------------------ small decode-step ops
 * The q8 runtime's one-row helpers (one call instead of a dozen torch ops each). float32. */

/* sum a[i] b[i] and o[i] += w v[i] (8 lanes, fused multiply-adds, where there is AVX2). */
static inline float dotf(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float t = 0.0f;
#ifdef QA_AVX2
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    t = hsum(_mm256_add_ps(s0, s1));
#endif
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

#ifdef QA_AVX2
/* exp of 8 floats (Cephes' expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp on [-87, 88]). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* out = silu(g) * u = g / (1 + exp(-g)) * u; 8 lanes with exp8 where there is AVX2 (scalar expf took
 * ~4 ms of an 8-row decode step's 45: 720k calls) */
static void silu_mul(const float *g, const float *u, int64_t n, float *out) {
    int64_t i = 0;
#ifdef QA_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static inline void axpyf(float *o, float w, const float *v, int64_t n) {
    int64_t i = 0;
#ifdef QA_AVX2
    const __m256 wv = _mm256_set1_ps(w);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
#endif
    for (; i < n; i++) o[i] += w * v[i];
}

#ifdef QA_AVX2
/* Head size 64, the common one: q . k for 8 keys at a time (q in registers, the 8 partial-sum vectors
 * reduced to one by a transpose of horizontal adds), and the value sum with the output in registers. */
static void scores64(const float *q, const float *k, int64_t S, float scale, float *p) {
    __m256 qv[8];
    for (int c = 0; c < 8; c++) qv[c] = _mm256_loadu_ps(q + 8 * c);
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) {
        __m256 a[8];
        for (int j = 0; j < 8; j++) {
            const float *kj = k + (s + j) * 64;
            __m256 t = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kj));
            for (int c = 1; c < 8; c++) t = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kj + 8 * c), t);
            a[j] = t;
        }
        const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
        _mm256_storeu_ps(p + s, _mm256_mul_ps(r, _mm256_set1_ps(scale)));
    }
    for (; s < S; s++) p[s] = dotf(q, k + s * 64, 64) * scale;
}

static void values64(const float *p, const float *v, int64_t S, float inv, float *o) {
    __m256 acc[8];
    for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t s = 0; s < S; s++) {
        const __m256 w = _mm256_set1_ps(p[s]);
        for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + s * 64 + 8 * c), acc[c]);
    }
    for (int c = 0; c < 8; c++) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
}
#endif

/* out = x / sqrt(mean(x^2) + eps) * w for one row (out may be x); the squares (exact in double) summed in
 * double, four lanes at a time where there is AVX2 */
static void rms_row(const float *x, int64_t n, const float *w, float eps, float *out) {
    double ss = 0.0;
    int64_t i = 0;
#ifdef QA_AVX2
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        s0 = _mm256_add_pd(s0, _mm256_mul_pd(lo, lo));
        s1 = _mm256_add_pd(s1, _mm256_mul_pd(hi, hi));
    }
    double l[4];
    _mm256_storeu_pd(l, _mm256_add_pd(s0, s1));
    ss = (l[0] + l[1]) + (l[2] + l[3]);
#endif
    for (; i < n; i++) ss += (double)x[i] * x[i];
    const float inv = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
    for (i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, r < rows (out may be x). */
int qa_rms_norm(const float *x, int64_t rows, int64_t n, const float *w, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) rms_row(x + r * n, n, w, eps, out + r * n);
    return 0;
}

/* One query row (batch 1, one new token at position pos) through a layer's attention core:
 * rotary embedding of q [H, D] and k [Hkv, D] in place (transformers' half-split layout, cos and
 * sign-folded sin rows [rope_dim], rope_dim <= D; x * cos + swap_halves(x) * sin, as the torch
 * path), k and v written to the caches [Hkv, S_max, D] at pos, then softmax(q k^T / sqrt(D)) v
 * over keys first..pos (first > 0: a sliding window) into out [H, D]. H % Hkv == 0. */
/* Rotary on one row's q [H, D] and k [Hkv, D] (in place), and its k/v written to the caches at pos. */
static int attn_args_bad(int64_t H, int64_t Hkv, int64_t D, int64_t rope_dim, int64_t s_max, int64_t pos, int64_t first) {
    return Hkv < 1 || H % Hkv || pos >= s_max || first > pos || first < 0 || rope_dim > D || rope_dim % 2;
}

static void attn_prep(float *q, float *k, const float *v, int64_t H, int64_t Hkv, int64_t D, int64_t rope_dim,
                      const float *cos, const float *sin, float *kc, float *vc, int64_t s_max, int64_t pos) {
    const int64_t half = rope_dim / 2;
    for (int64_t h = 0; h < H + Hkv; h++) {
        float *x = h < H ? q + h * D : k + (h - H) * D;
        int64_t i = 0;
#ifdef QA_AVX2
        /* the same products and sums as the loop below, 8 lanes at a time (the scalar loop was ~1/3 of an
         * 8-row step's attention) */
        for (; i + 8 <= half; i += 8) {
            const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + half);
            const __m256 ra = _mm256_mul_ps(a, _mm256_loadu_ps(cos + i)), rb = _mm256_mul_ps(b, _mm256_loadu_ps(sin + i));
            const __m256 sa = _mm256_mul_ps(b, _mm256_loadu_ps(cos + i + half)),
                         sb = _mm256_mul_ps(a, _mm256_loadu_ps(sin + i + half));
            _mm256_storeu_ps(x + i, _mm256_add_ps(ra, rb));
            _mm256_storeu_ps(x + i + half, _mm256_add_ps(sa, sb));
        }
#endif
        for (; i < half; i++) {
            const float a = x[i], b = x[i + half];
            const float ra = a * cos[i], rb = b * sin[i], sa = b * cos[i + half], sb = a * sin[i + half];
            x[i] = ra + rb;
            x[i + half] = sa + sb;
        }
    }
    for (int64_t g = 0; g < Hkv; g++) {
        memcpy(kc + (g * s_max + pos) * D, k + g * D, (size_t)D * sizeof(float));
        memcpy(vc + (g * s_max + pos) * D, v + g * D, (size_t)D * sizeof(float));
    }
}

/* p[s] = exp(p[s] - max p) in place over S scores; returns their sum (the softmax's denominator) */
static float softmax_exp(float *p, int64_t S) {
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t s = 0; s < S; s++) mx = p[s] > mx ? p[s] : mx;
    int64_t s = 0;
#ifdef QA_AVX2
    __m256 sv = _mm256_setzero_ps();
    const __m256 mv = _mm256_set1_ps(mx);
    for (; s + 8 <= S; s += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), mv));
        _mm256_storeu_ps(p + s, e);
        sv = _mm256_add_ps(sv, e);
    }
    sum = hsum(sv);
#endif
    for (; s < S; s++) {
        p[s] = expf(p[s] - mx);
        sum += p[s];
    }
    return sum;
}

/* Query head h of one row over its keys first..pos: softmax(q k / sqrt(D)) v into out [D]. -3: out of memory. */
static int attn_head(const float *q, int64_t h, int64_t H, int64_t Hkv, int64_t D, const float *kc, const float *vc,
                     int64_t s_max, int64_t pos, int64_t first, float *out) {
    const int64_t rep = H / Hkv, S = pos + 1 - first;
    const float scale = 1.0f / sqrtf((float)D);
    const float *qh = q + h * D, *kh = kc + ((h / rep) * s_max + first) * D, *vh = vc + ((h / rep) * s_max + first) * D;
    float small[1024]; /* the scores of up to 1024 keys on the stack: a malloc per head is ~1/3 of a short step's attention */
    float *p = S <= 1024 ? small : (float *)malloc((size_t)S * sizeof(float));
    if (!p) return -3;
#ifdef QA_AVX2
    if (D == 64) scores64(qh, kh, S, scale, p);
    else
#endif
        for (int64_t s = 0; s < S; s++) p[s] = dotf(qh, kh + s * D, D) * scale;
    const float sum = softmax_exp(p, S);
    int64_t s;
    float *o = out + h * D;
    const float inv = 1.0f / sum;
#ifdef QA_AVX2
    if (D == 64) values64(p, vh, S, inv, o);
    else
#endif
    {
        for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
        for (s = 0; s < S; s++) axpyf(o, p[s], vh + s * D, D);
        for (int64_t i = 0; i < D; i++) o[i] *= inv;
    }
    if (p != small) free(p);
    return 0;
}

#ifdef QA_AVX2
/* o[0..64) += sum_s p[s] * v[s] (the unnormalised values of one head over a tile of keys) */
static void values64_acc(const float *p, const float *v, int64_t S, float *o) {
    __m256 acc[8];
    for (int c = 0; c < 8; c++) acc[c] = _mm256_loadu_ps(o + 8 * c);
    for (int64_t s = 0; s < S; s++) {
        const __m256 w = _mm256_set1_ps(p[s]);
        for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + s * 64 + 8 * c), acc[c]);
    }
    for (int c = 0; c < 8; c++) _mm256_storeu_ps(o + 8 * c, acc[c]);
}

/* Every query head of kv group g (H / Hkv of them, head dim 64) of one row over its keys first..pos, reading
 * each cached key and value once for the whole group: tiles of ATTN_TILE keys stay in L2 while each head of
 * the group uses them (per-head passes re-read the group's keys and values once per head: at 16K keys, 8 MiB
 * per kv head and layer, from DRAM). Same maths as attn_head; -3: out of memory. */
#define ATTN_TILE 256
static int attn_group64(const float *q, int64_t g, int64_t H, int64_t Hkv, const float *kc, const float *vc,
                        int64_t s_max, int64_t pos, int64_t first, float *out) {
    const int64_t rep = H / Hkv, S = pos + 1 - first, D = 64;
    const float scale = 1.0f / sqrtf((float)D);
    const float *kh = kc + (g * s_max + first) * D, *vh = vc + (g * s_max + first) * D;
    float small[2048];
    float *p = rep * S <= 2048 ? small : (float *)malloc((size_t)(rep * S) * sizeof(float));
    if (!p) return -3;
    for (int64_t t0 = 0; t0 < S; t0 += ATTN_TILE) {
        const int64_t n = S - t0 < ATTN_TILE ? S - t0 : ATTN_TILE;
        for (int64_t j = 0; j < rep; j++) scores64(q + (g * rep + j) * D, kh + t0 * D, n, scale, p + j * S + t0);
    }
    float inv[64];
    for (int64_t j = 0; j < rep; j++) {
        inv[j] = 1.0f / softmax_exp(p + j * S, S);
        float *o = out + (g * rep + j) * D;
        for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
    }
    for (int64_t t0 = 0; t0 < S; t0 += ATTN_TILE) {
        const int64_t n = S - t0 < ATTN_TILE ? S - t0 : ATTN_TILE;
        for (int64_t j = 0; j < rep; j++) values64_acc(p + j * S + t0, vh + t0 * D, n, out + (g * rep + j) * D);
    }
    for (int64_t j = 0; j < rep; j++) {
        float *o = out + (g * rep + j) * D;
        for (int64_t i = 0; i < D; i++) o[i] *= inv[j];
    }
    if (p != small) free(p);
    return 0;
}
#endif

int qa_attn_decode_rows(int64_t B, float *q, float *k, const float *v, int64_t H, int64_t Hkv, int64_t D,
                        int64_t rope_dim, const float *cos, const float *sin, float *kc, float *vc, int64_t s_max,
                        const int64_t *pos, const int64_t *first, float *out, int nthreads) {
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) {
        if (attn_args_bad(H, Hkv, D, rope_dim, s_max, pos[b], first[b])) return -1;
        work += (pos[b] + 1 - first[b]) * H * D;
    }
    if (nthreads < 1) nthreads = 1;
    int rc = 0;
    /* one parallel region: the rows' rotary and cache writes, then every row's heads (a batch's rows are
     * independent) */
    const int rows_par = nthreads > 1 && B >= nthreads && work > 65536; /* as in x8_lora_run */
    if (!rows_par)
        for (int64_t b = 0; b < B; b++)
            attn_prep(q + b * H * D, k + b * Hkv * D, v + b * Hkv * D, H, Hkv, D, rope_dim, cos + b * rope_dim,
                      sin + b * rope_dim, kc + b * Hkv * s_max * D, vc + b * Hkv * s_max * D, s_max, pos[b]);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && work > 65536) reduction(| : rc)
    {
        if (rows_par) {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++)
                attn_prep(q + b * H * D, k + b * Hkv * D, v + b * Hkv * D, H, Hkv, D, rope_dim, cos + b * rope_dim,
                          sin + b * rope_dim, kc + b * Hkv * s_max * D, vc + b * Hkv * s_max * D, s_max, pos[b]);
        }
#ifdef QA_AVX2
        /* long contexts, grouped queries: each kv group's heads together (its keys and values read once) */
        const int grouped = D == 64 && H / Hkv > 1 && H / Hkv <= 64 && work > (int64_t)H * D * 512;
        if (grouped) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t bg = 0; bg < B * Hkv; bg++) {
                const int64_t b = bg / Hkv;
                rc |= attn_group64(q + b * H * D, bg % Hkv, H, Hkv, kc + b * Hkv * s_max * D,
                                   vc + b * Hkv * s_max * D, s_max, pos[b], first[b], out + b * H * D);
            }
        } else
#endif
#pragma omp for schedule(dynamic, 4)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H;
            rc |= attn_head(q + b * H * D, bh % H, H, Hkv, D, kc + b * Hkv * s_max * D, vc + b * Hkv * s_max * D,
                            s_max, pos[b], first[b], out + b * H * D);
        }
    }
    return rc;
}


/* y[row] += scale * (x[row] A^T) Bt for each entry of plan (QA_LORA_FIELDS int64 each), A and Bt as
 * addresses of float32 [r, K] / [r, N], scale as the bits of a double; x and y rows ldx / ldy floats apart
 * (y may be one part of a grouped output). One call serves a batch whose rows use different adapters, a
 * row with several adapters, and several tokens on one adapter. */
/* A . x over K elements of a stored-float row (F16 / BF16): converted in registers where the build has the
 * instructions (dot1), else through a float32 buffer 256 elements at a time. */
static float dot_typed(const tinfo *ti, const uint8_t *a, const float *x, int64_t K) {
    if (ti->dot1) return ti->dot1(a, K, x);
    float buf[256], t = 0.0f;
    for (int64_t k = 0; k < K; k += 256) {
        const int n = (int)(K - k < 256 ? K - k : 256);
        ti->dq(a, k, n, buf);
        t += dotf(buf, x + k, n);
    }
    return t;
}

/* o[0..n) += w * v[0..n), v a stored-float row (F16 / BF16) */
static void axpy_typed(const tinfo *ti, int type, float *o, float w, const uint8_t *v, int64_t n) {
    int64_t i = 0;
#ifdef QA_AVX2
    const __m256 wv = _mm256_set1_ps(w);
    if (type == T_BF16)
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(wv, bf16x8(v + 2 * i), _mm256_loadu_ps(o + i)));
#ifdef QA_F16C
    if (type == T_F16)
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(wv, f16x8(v + 2 * i), _mm256_loadu_ps(o + i)));
#endif
#else
    (void)type;
#endif
    float buf[256];
    for (; i < n; i += 256) {
        const int m = (int)(n - i < 256 ? n - i : 256);
        ti->dq(v, i, m, buf);
        axpyf(o + i, w, buf, m);
    }
}

/* One plan entry (row, A, Bt, r, scale bits, col, N, K, type): dst[0 .. N) += scale * (A x[row]) . Bt, dst
 * the entry's outputs (y[row, col ..], or a span of its own). */
static int lora_apply(const int64_t *p, const float *x, int64_t ldx, int64_t K, float *dst) {
    float h[256];
    const int64_t row = p[0], r = p[3], N = p[6];
    const int type = (int)p[8];
    double scale;
    memcpy(&scale, &p[4], sizeof scale);
    if (r > 256) return -1;
    const float *xr = x + row * ldx;
    /* PEFT's order, B(A x) then the scale, up to where float32 rounds: the scale goes on the r values of h */
    if (type == T_F32) {
        const float *A = (const float *)(intptr_t)p[1], *Bt = (const float *)(intptr_t)p[2];
        for (int64_t j = 0; j < r; j++) h[j] = (float)(scale * dotf(A + j * K, xr, K));
        for (int64_t j = 0; j < r; j++) axpyf(dst, h[j], Bt + j * N, N);
        return 0;
    }
    const tinfo *ti = type_info(type);
    const uint8_t *A = (const uint8_t *)(intptr_t)p[1], *Bt = (const uint8_t *)(intptr_t)p[2];
    for (int64_t j = 0; j < r; j++) h[j] = (float)(scale * dot_typed(ti, A + 2 * j * K, xr, K));
    for (int64_t j = 0; j < r; j++) axpy_typed(ti, type, dst, h[j], Bt + 2 * j * N, N);
    return 0;
}

static int lora_entry(const int64_t *p, const float *x, int64_t ldx, int64_t K, float *y, int64_t ldy) {
    return lora_apply(p, x, ldx, K, y + p[0] * ldy + p[5]);
}

/* The entry's delta alone, into out [N] */
static int lora_delta(const int64_t *p, const float *x, int64_t ldx, int64_t K, float *out) {
    memset(out, 0, (size_t)p[6] * sizeof(float));
    return lora_apply(p, x, ldx, K, out);
}

/* A buffer with one span per entry (its N floats, at *off[e]); 0 when out of memory. */
static float *lora_spans(int64_t n, const int64_t *plan, int64_t **off) {
    *off = (int64_t *)malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (!*off) return 0;
    int64_t total = 0;
    for (int64_t e = 0; e < n; e++) {
        (*off)[e] = total;
        total += plan[QA_LORA_FIELDS * e + 6];
    }
    float *buf = (float *)malloc((size_t)(total > 0 ? total : 1) * sizeof(float));
    if (!buf) {
        free(*off);
        *off = 0;
    }
    return buf;
}

/* y[row, col .. col + N) += each entry's span, in plan order (the order a serial run adds them in) */
static void lora_add_spans(int64_t n, const int64_t *plan, const float *buf, const int64_t *off, float *y,
                           int64_t ldy) {
    for (int64_t e = 0; e < n; e++) {
        const int64_t *p = plan + QA_LORA_FIELDS * e;
        float *d = y + p[0] * ldy + p[5];
        const float *sp = buf + off[e];
        for (int64_t i = 0; i < p[6]; i++) d[i] += sp[i];
    }
}

/* Entries whose (row, col) strictly increase write disjoint outputs (a batch with one adapter per row, the
 * q, k and v of one grouped call): they run in parallel; otherwise (several adapters on one output) in
 * order. */
static int lora_distinct(int64_t n, const int64_t *plan) {
    int distinct = 1;
    for (int64_t e = 1; e < n && distinct; e++) {
        const int64_t *a = plan + QA_LORA_FIELDS * (e - 1), *b = plan + QA_LORA_FIELDS * e;
        distinct = b[0] > a[0] || (b[0] == a[0] && b[5] > a[5]);
    }
    return distinct;
}

int qa_lora_rows(int64_t n, const int64_t *plan, const float *x, int64_t ldx, int64_t M, int64_t K, float *y,
                 int64_t ldy, int64_t ny, int nthreads) {
    if (ny > ldy || !lora_plan_ok(n, plan, M, K, ny)) return -4; /* y: M rows of ny floats, ldy apart */
    int rc = 0;
    if (nthreads > 1 && n > 1 && !lora_distinct(n, plan)) {
        /* several entries on the same outputs: each into its own span in parallel, then added in order */
        int64_t *off;
        float *buf = lora_spans(n, plan, &off);
        if (!buf) return -3;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) reduction(| : rc)
        for (int64_t e = 0; e < n; e++) rc |= lora_delta(plan + QA_LORA_FIELDS * e, x, ldx, K, buf + off[e]);
        lora_add_spans(n, plan, buf, off, y, ldy);
        free(buf);
        free(off);
        return rc;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && n > 1) reduction(| : rc)
    for (int64_t e = 0; e < n; e++) rc |= lora_entry(plan + QA_LORA_FIELDS * e, x, ldx, K, y, ldy);
    return rc;
}

/* One decode step (each of B rows one new token) through nl Llama-style layers in one call, x [B, K]
 * updated in place: per layer, RMS norm, q/k/v with their LoRA deltas (one grouped call), rotary + cache
 * write + attention, o with its deltas, the residual, and the fused MLP block. The same calls, in the same
 * order and on the same numbers, as the per-layer path of the decoder; only the ~100 returns to the
 * interpreter per token are gone. Per layer, QA_LAYER_FIELDS int64 (doubles as their bits):
 *   0 attn norm weight, 1 its eps, 2 q/k/v x8 plan (3 weights), 3 q rows, 4 k rows, 5 v rows,
 *   6 q/k/v LoRA entries, 7 their plan, 8 o x8 plan (1 weight), 9 o LoRA entries, 10 their plan,
 *   11 key cache [B, Hkv, s_max, D], 12 value cache, 13 s_max, 14 mlp norm weight, 15 its eps,
 *   16 gate/up x8 plan, 17 ff, 18 down type, 19 down layout, 20 gate/up LoRA entries, 21 their plan,
 *   22 down LoRA entries, 23 their plan, 24 q's per-head RMS norm weight [D] (0: none; Qwen3), 25 its eps,
 *   26 k's, 27 its eps (both or neither).
 * cos/sin [B, rope_dim], pos/first [B] as qa_attn_decode_rows. Returns 0, or the failing call's code. */
#define QA_LAYER_FIELDS 28
int qa_decode_layers(int64_t nl, const int64_t *plans, float *x, int64_t B, int64_t K, int64_t H, int64_t Hkv,
                     int64_t D, int64_t rope_dim, const float *cos, const float *sin, const int64_t *pos,
                     const int64_t *first, int nthreads) {
    int64_t nqkv_max = 0;
    if (nl < 1 || !plans || B < 1 || K < 1 || H < 1 || Hkv < 1 || D < 1) return -1;
    for (int64_t l = 0; l < nl; l++) {
        const int64_t *p = plans + l * QA_LAYER_FIELDS;
        if (p[3] != H * D || p[4] != Hkv * D || p[5] != Hkv * D) return -1;
        /* every address present, the caches as long as the positions need, the LoRA counts non-negative */
        if (!p[0] || !p[2] || !p[8] || !p[11] || !p[12] || !p[14] || !p[16] || !p[19] || p[17] < 8 ||
            p[6] < 0 || p[9] < 0 || p[20] < 0 || p[22] < 0 || !p[24] != !p[26])
            return -1;
        for (int64_t b = 0; b < B; b++)
            if (pos[b] < 0 || pos[b] >= p[13] || first[b] < 0 || first[b] > pos[b]) return -1;
        const int64_t n = p[3] + p[4] + p[5];
        nqkv_max = n > nqkv_max ? n : nqkv_max;
    }
    /* h: the norm's output; qkv: the grouped output; q/k/v: each row's contiguous copies; a: attention; y: o */
    const int64_t HD = H * D, KD = Hkv * D;
    float *buf = (float *)malloc((size_t)B * (size_t)(K + nqkv_max + HD + 2 * KD + HD + K) * sizeof(float));
    if (!buf) return -3;
    float *h = buf, *qkv = h + B * K, *q = qkv + B * nqkv_max, *k = q + B * HD, *v = k + B * KD, *a = v + B * KD,
          *y = a + B * HD;
    int rc = 0;
    for (int64_t l = 0; l < nl && !rc; l++) {
        const int64_t *p = plans + l * QA_LAYER_FIELDS;
        double eps;
        memcpy(&eps, &p[1], sizeof eps);
        const int64_t nqkv = p[3] + p[4] + p[5];
        const x8_pre norm = {PRE_NORM, x, (const float *)(intptr_t)p[0], (float)eps};
        rc = x8_lora_run(3, (const int64_t *)(intptr_t)p[2], K, h, K, B, qkv, nqkv, p[6], (const int64_t *)(intptr_t)p[7],
                         nthreads, &norm);
        if (rc) break;
        for (int64_t b = 0; b < B; b++) {
            memcpy(q + b * HD, qkv + b * nqkv, (size_t)HD * sizeof(float));
            memcpy(k + b * KD, qkv + b * nqkv + HD, (size_t)KD * sizeof(float));
            memcpy(v + b * KD, qkv + b * nqkv + HD + KD, (size_t)KD * sizeof(float));
        }
        if (p[24]) { /* per-head RMS norms of q and k, before rotary (as the decoder's attend) */
            double qe, ke;
            memcpy(&qe, &p[25], sizeof qe);
            memcpy(&ke, &p[27], sizeof ke);
            for (int64_t r = 0; r < B * H; r++) rms_row(q + r * D, D, (const float *)(intptr_t)p[24], (float)qe, q + r * D);
            for (int64_t r = 0; r < B * Hkv; r++) rms_row(k + r * D, D, (const float *)(intptr_t)p[26], (float)ke, k + r * D);
        }
        rc = qa_attn_decode_rows(B, q, k, v, H, Hkv, D, rope_dim, cos, sin, (float *)(intptr_t)p[11],
                                 (float *)(intptr_t)p[12], p[13], pos, first, a, nthreads);
        if (rc) break;
        rc = qa_matmul_x8_lora(1, (const int64_t *)(intptr_t)p[8], HD, a, HD, B, y, K, p[9],
                               (const int64_t *)(intptr_t)p[10], nthreads);
        if (rc) break;
        for (int64_t i = 0; i < B * K; i++) x[i] += y[i];
        memcpy(&eps, &p[15], sizeof eps);
        rc = qa_mlp_x8_lora(x, B, K, (const float *)(intptr_t)p[14], (float)eps, (const int64_t *)(intptr_t)p[16], p[17],
                            (int)p[18], (const uint8_t *)(intptr_t)p[19], p[20], (const int64_t *)(intptr_t)p[21], p[22],
                            (const int64_t *)(intptr_t)p[23], x, nthreads);
    }
    free(buf);
    return rc;
}

/* ------------------------------------------------------------------ entry points */

/* 1 when this build has the AVX2/FMA dot products, 0 for the portable loops. */
int qa_simd(void) {
#ifdef QA_AVX2
    return 1;
#else
    return 0;
#endif
}

#ifndef QA_SOURCE_SHA
#define QA_SOURCE_SHA ""
#endif
/* The first 16 hex digits of this file's sha256, as setup.py compiled it in ("" when built otherwise). */
const char *qa_source_sha(void) { return QA_SOURCE_SHA; }

/* The instruction sets this CPU has, as the build variants need them (setup.py): bit 0 AVX2 (with FMA, F16C,
 * BMI2), bit 1 AVX-VNNI, bit 2 AVX-512 F/BW/VL/DQ + VNNI. 0 elsewhere than x86. Any build answers. */
int qa_cpu_features(void) {
    int f = 0;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                     __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    if (avx2) f |= 1;
    if (avx2 && __builtin_cpu_supports("avxvnni")) f |= 2;
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        f |= 4;
#endif
    return f;
}

/* 1 when built with OpenMP (else every call runs on the calling thread). */
int qa_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* y[m * ldy + n] = sum_k x[m * ldx + k] * W[n, k] for m < M, n < N. Returns 0, or -1 for an
 * unknown type / a K that is not whole blocks / row_bytes that do not match. */
int qa_matmul(int type, const uint8_t *w, int64_t N, int64_t K, int64_t row_bytes, const float *x,
              int64_t ldx, int64_t M, float *y, int64_t ldy, int nthreads) {
    const tinfo *t = type_info(type);
    if (!t || K % t->block || row_bytes != K / t->block * t->size || N < 0 || M < 0) return -1;
    if (nthreads < 1) nthreads = 1;
    /* dynamic chunks of rows: a thread that loses its core to another process (a shared
     * machine) delays only its current chunk, not half the matrix */
    const int64_t chunk = N / ((int64_t)nthreads * 32) > 1 ? N / ((int64_t)nthreads * 32) : 1; /* in pairs */
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nthreads) if (nthreads > 1)
    for (int64_t p = 0; p < (N + 1) / 2; p++) {
        const int64_t n = 2 * p;
        const int two = n + 1 < N;
        const uint8_t *row = w + n * row_bytes;
        float out[MT_MAX], out1[MT_MAX];
        for (int64_t m0 = 0; m0 < M; m0 += MT_MAX) {
            const int mt = (int)(M - m0 < MT_MAX ? M - m0 : MT_MAX);
            const float *xm = x + m0 * ldx;
            if (mt == 1 && t->dot1) {
                y[m0 * ldy + n] = t->dot1(row, K, xm);
                if (two) y[m0 * ldy + n + 1] = t->dot1(row + row_bytes, K, xm);
                continue;
            }
#ifdef QA_AVX2
            if (two) {
                switch (mt) {
                case 1: pair_dot_1(t, row, row + row_bytes, K, xm, ldx, out, out1); break;
                case 2: pair_dot_2(t, row, row + row_bytes, K, xm, ldx, out, out1); break;
                case 3: pair_dot_3(t, row, row + row_bytes, K, xm, ldx, out, out1); break;
                default: pair_dot_4(t, row, row + row_bytes, K, xm, ldx, out, out1); break;
                }
                for (int m = 0; m < mt; m++) {
                    y[(m0 + m) * ldy + n] = out[m];
                    y[(m0 + m) * ldy + n + 1] = out1[m];
                }
                continue;
            }
#endif
            for (int r = 0; r <= two; r++) {
                const uint8_t *rr = row + r * row_bytes;
                switch (mt) {
                case 1: row_dot_1(t, rr, K, xm, ldx, out); break;
                case 2: row_dot_2(t, rr, K, xm, ldx, out); break;
                case 3: row_dot_3(t, rr, K, xm, ldx, out); break;
                default: row_dot_4(t, rr, K, xm, ldx, out); break;
                }
                for (int m = 0; m < mt; m++) y[(m0 + m) * ldy + n + r] = out[m];
            }
        }
    }
    return 0;
}

/* out[r * ldo + k] = W[r, k] as float32 (gguf-py's bits) for r < rows. */
int qa_dequant(int type, const uint8_t *w, int64_t rows, int64_t K, int64_t row_bytes, float *out,
               int64_t ldo, int nthreads) {
    const tinfo *t = type_info(type);
    if (!t || K % t->block || row_bytes != K / t->block * t->size || rows < 0) return -1;
    if (nthreads < 1) nthreads = 1;
    const int64_t chunk = rows / ((int64_t)nthreads * 16) > 1 ? rows / ((int64_t)nthreads * 16) : 1;
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row = w + r * row_bytes;
        for (int64_t k0 = 0; k0 < K; k0 += CH) {
            const int len = (int)(K - k0 < CH ? K - k0 : CH);
            t->dq(row, k0, len, out + r * ldo + k0);
        }
    }
    return 0;
}
