/* zotune's noise on x86 CPUs, compiled at first use by zotune/kernels/_native.py.

The numbers of zotune.noise (Philox4x32-10 in Triton's tl.randn, tl.randn4x and randint4x
conventions; see its docstring), with the arithmetic of torch's compiled path
(zotune/kernels/_philox.py) operation for operation: the same Sleef functions that torch's
vectorized log, cos and sin call, no fused multiply-add. So the normals here are bit-equal to the
compiled path's on the same CPU capability, and rademacher is exact. What this adds is speed:
32x32->64 products as two even/odd vector multiplies, which x86 has in AVX2 and AVX-512 alike; the
three ops of the default step in one pass for float32 (at the end, with the arithmetic of their
PyTorch twins); and no code generated at run time beyond this file. */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#if defined(__AVX512F__)
#define W 16
typedef __m512i vi;
typedef __m512 vf;
extern __m512 Sleef_logf16_u10(__m512);
extern __m512 Sleef_cosf16_u35(__m512);
extern __m512 Sleef_sinf16_u35(__m512);
#define LOG Sleef_logf16_u10
#define COS Sleef_cosf16_u35
#define SIN Sleef_sinf16_u35
#define VI_LOADU(p) _mm512_loadu_si512((const void *)(p))
#define VI_STOREU(p, v) _mm512_storeu_si512((void *)(p), v)
#define VI_SET1(x) _mm512_set1_epi32((int)(x))
#define VI_ADD _mm512_add_epi32
#define VI_XOR _mm512_xor_si512
#define VI_SRAI _mm512_srai_epi32
#define MUL_EVEN _mm512_mul_epu32
#define SRL64 _mm512_srli_epi64
#define SLL64 _mm512_slli_epi64
#define BLEND_ODD(a, b) _mm512_mask_blend_epi32((__mmask16)0xAAAA, a, b)
#define IOTA _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#define VF_STOREU _mm512_storeu_ps
#define VF_SET1 _mm512_set1_ps
#define VF_MUL _mm512_mul_ps
#define VF_MAX _mm512_max_ps
#define VF_SQRT _mm512_sqrt_ps
#define VF_FROM_INT _mm512_cvtepi32_ps
#elif defined(__AVX2__)
#define W 8
typedef __m256i vi;
typedef __m256 vf;
extern __m256 Sleef_logf8_u10(__m256);
extern __m256 Sleef_cosf8_u35(__m256);
extern __m256 Sleef_sinf8_u35(__m256);
#define LOG Sleef_logf8_u10
#define COS Sleef_cosf8_u35
#define SIN Sleef_sinf8_u35
#define VI_LOADU(p) _mm256_loadu_si256((const __m256i *)(p))
#define VI_STOREU(p, v) _mm256_storeu_si256((__m256i *)(p), v)
#define VI_SET1(x) _mm256_set1_epi32((int)(x))
#define VI_ADD _mm256_add_epi32
#define VI_XOR _mm256_xor_si256
#define VI_SRAI _mm256_srai_epi32
#define MUL_EVEN _mm256_mul_epu32
#define SRL64 _mm256_srli_epi64
#define SLL64 _mm256_slli_epi64
#define BLEND_ODD(a, b) _mm256_blend_epi32(a, b, 0xAA)
#define IOTA _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
#define VF_STOREU _mm256_storeu_ps
#define VF_SET1 _mm256_set1_ps
#define VF_MUL _mm256_mul_ps
#define VF_MAX _mm256_max_ps
#define VF_SQRT _mm256_sqrt_ps
#define VF_FROM_INT _mm256_cvtepi32_ps
#else
#error "zotune's native noise needs AVX2 or AVX-512"
#endif

/* hi and lo words of each 32-bit lane of a times the 32-bit constant in every lane of m */
static inline void mulhilo(vi a, vi m, vi *hi, vi *lo) {
  vi even = MUL_EVEN(a, m);             /* the products of lanes 0, 2, ... as 64-bit lanes */
  vi odd = MUL_EVEN(SRL64(a, 32), m);   /* of lanes 1, 3, ... */
  *lo = BLEND_ODD(even, SLL64(odd, 32));
  *hi = BLEND_ODD(SRL64(even, 32), odd);
}

/* Philox4x32-10 of the W counters (c0, c1, 0, 0) */
static inline void philox(vi *c0, vi *c1, vi *c2, vi *c3, uint32_t k0, uint32_t k1) {
  const vi a = VI_SET1(0xD2511F53u), b = VI_SET1(0xCD9E8D57u);
  *c2 = VI_SET1(0);
  *c3 = VI_SET1(0);
  for (int r = 0; r < 10; r++) {
    vi hi_a, lo_a, hi_b, lo_b;
    mulhilo(*c0, a, &hi_a, &lo_a);
    mulhilo(*c2, b, &hi_b, &lo_b);
    *c0 = VI_XOR(VI_XOR(hi_b, *c1), VI_SET1(k0));
    *c1 = lo_b;
    *c2 = VI_XOR(VI_XOR(hi_a, *c3), VI_SET1(k1));
    *c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

/* the low and high words of counters first .. first + W - 1 */
static inline void counters(uint64_t first, vi *lo, vi *hi) {
  if ((uint32_t)first <= 0xFFFFFFFFu - (W - 1)) {
    *lo = VI_ADD(VI_SET1((uint32_t)first), IOTA);
    *hi = VI_SET1((uint32_t)(first >> 32));
  } else { /* the low word wraps inside this group */
    uint32_t l[W], h[W];
    for (int k = 0; k < W; k++) {
      l[k] = (uint32_t)(first + k);
      h[k] = (uint32_t)((first + k) >> 32);
    }
    *lo = VI_LOADU(l);
    *hi = VI_LOADU(h);
  }
}

/* Triton's uint_to_uniform_float: a word >= 2**31 (negative as int32) becomes its complement */
static inline vf uniform(vi x) {
  return VF_MUL(VF_FROM_INT(VI_XOR(x, VI_SRAI(x, 31))), VF_SET1(4.6566127342e-10f));
}

/* Box-Muller's radius and angle of two words' uniforms */
static inline void polar(vi x0, vi x1, vf *radius, vf *theta) {
  vf u0 = VF_MAX(uniform(x0), VF_SET1(1e-7f));
  *radius = VF_SQRT(VF_MUL(VF_SET1(-2.0f), LOG(u0)));
  *theta = VF_MUL(VF_SET1(6.283185307179586f), uniform(x1));
}

static inline void gaussian_group(uint64_t first, uint32_t k0, uint32_t k1, float *out) {
  vi c0, c1, c2, c3;
  vf radius, theta;
  counters(first, &c0, &c1);
  philox(&c0, &c1, &c2, &c3, k0, k1);
  polar(c0, c1, &radius, &theta);
  VF_STOREU(out, VF_MUL(radius, COS(theta)));
}

/* the 4 * W normals of counters first .. first + W - 1, in element order */
static inline void gaussian4x_group(uint64_t first, uint32_t k0, uint32_t k1, float *out) {
  vi c0, c1, c2, c3;
  vf r01, t01, r23, t23;
  float n[4][W];
  counters(first, &c0, &c1);
  philox(&c0, &c1, &c2, &c3, k0, k1);
  polar(c0, c1, &r01, &t01);
  polar(c2, c3, &r23, &t23);
  VF_STOREU(n[0], VF_MUL(r01, COS(t01)));
  VF_STOREU(n[1], VF_MUL(r01, SIN(t01)));
  VF_STOREU(n[2], VF_MUL(r23, COS(t23)));
  VF_STOREU(n[3], VF_MUL(r23, SIN(t23)));
  for (int k = 0; k < W; k++)
    for (int j = 0; j < 4; j++) out[4 * k + j] = n[j][k];
}

/* the 128 * W signs of counters first .. first + W - 1: element 128k + 32w + b takes bit b of word w of counter first + k */
static inline void rademacher_group(uint64_t first, uint32_t k0, uint32_t k1, float *out) {
  vi c0, c1, c2, c3;
  uint32_t words[4][W];
  counters(first, &c0, &c1);
  philox(&c0, &c1, &c2, &c3, k0, k1);
  VI_STOREU(words[0], c0);
  VI_STOREU(words[1], c1);
  VI_STOREU(words[2], c2);
  VI_STOREU(words[3], c3);
  for (int k = 0; k < W; k++)
    for (int w = 0; w < 4; w++)
      for (int b = 0; b < 32; b++) out[128 * k + 32 * w + b] = (float)((words[w][k] >> b) & 1u) * 2.0f - 1.0f;
}

/* out[j] = z of element start + j, j < n (one thread), from `group`, which writes the elements of W counters
   from its first (per_counter each); a group the range cuts goes through a buffer */
static inline void fill_groups(void (*group)(uint64_t, uint32_t, uint32_t, float *), uint64_t per_counter,
                               uint32_t k0, uint32_t k1, uint64_t start, int64_t n, float *out) {
  uint64_t span = per_counter * W, end = start + (uint64_t)n;
  for (uint64_t lo = start / span * span; lo < end; lo += span) {
    if (lo >= start && lo + span <= end) {
      group(lo / per_counter, k0, k1, out + (lo - start));
    } else {
      float cut[128 * W];
      uint64_t a = lo > start ? lo : start, z = lo + span < end ? lo + span : end;
      group(lo / per_counter, k0, k1, cut);
      memcpy(out + (a - start), cut + (a - lo), (size_t)(z - a) * sizeof(float));
    }
  }
}

/* kinds, numbered as zotune/kernels/_native.py's KIND_ID */
enum { GAUSSIAN = 0, RADEMACHER = 1, GAUSSIAN4X = 2 };

/* elements per counter: zotune.noise.PER_COUNTER */
static void fill(int kind, uint64_t seed, uint64_t start, int64_t n, float *out) {
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  if (kind == GAUSSIAN) fill_groups(gaussian_group, 1, k0, k1, start, n, out);
  else if (kind == GAUSSIAN4X) fill_groups(gaussian4x_group, 4, k0, k1, start, n, out);
  else fill_groups(rademacher_group, 128, k0, k1, start, n, out);
}

/* Elements per block: the unit the threads share out, and the ops' z buffers (8 KB each, in L1). */
#define BLOCK 2048
#define BLOCKS(n) for (int64_t b = 0; b < (n); b += BLOCK)
#define BLOCK_LENGTH(n, b) ((n) - (b) < BLOCK ? (n) - (b) : BLOCK)

/* out[j] = z of element start + j, j < n */
void zotune_noise(int kind, uint64_t seed, uint64_t start, int64_t n, float *out) {
#pragma omp parallel for schedule(static) if (n >= 8 * BLOCK)
  BLOCKS(n) fill(kind, seed, start + (uint64_t)b, BLOCK_LENGTH(n, b), out + b);
}

/* The ops for float32 tensors without a master copy or stochastic rounding, each in one pass with
   the arithmetic of its PyTorch twin (zotune/kernels/<op>.py, `*_math`) operation for operation. */

/* perturb_: y = x + scale * z (y == x in place) */
void zotune_perturb(int kind, uint64_t seed, uint64_t start, int64_t n, const float *x, float *y, float scale) {
#pragma omp parallel for schedule(static) if (n >= 8 * BLOCK)
  BLOCKS(n) {
    float z[BLOCK];
    int64_t m = BLOCK_LENGTH(n, b);
    fill(kind, seed, start + (uint64_t)b, m, z);
    for (int64_t i = 0; i < m; i++) y[b + i] = x[b + i] + scale * z[i];
  }
}

/* move_perturbation_: param = (param + prev_coef * z_prev) + next_scale * z_next */
void zotune_move_perturbation(int kind, uint64_t prev_seed, uint64_t next_seed, uint64_t start, int64_t n,
                              float *param, float prev_coef, float next_scale) {
#pragma omp parallel for schedule(static) if (n >= 8 * BLOCK)
  BLOCKS(n) {
    float z_prev[BLOCK], z_next[BLOCK];
    int64_t m = BLOCK_LENGTH(n, b);
    fill(kind, prev_seed, start + (uint64_t)b, m, z_prev);
    fill(kind, next_seed, start + (uint64_t)b, m, z_next);
    for (int64_t i = 0; i < m; i++) param[b + i] = (param[b + i] + prev_coef * z_prev[i]) + next_scale * z_next[i];
  }
}

/* restore_and_update_: θ = (param + eps * z) * decay - coef * z */
void zotune_restore_and_update(int kind, uint64_t seed, uint64_t start, int64_t n, float *param, float eps,
                               float decay, float coef) {
#pragma omp parallel for schedule(static) if (n >= 8 * BLOCK)
  BLOCKS(n) {
    float z[BLOCK];
    int64_t m = BLOCK_LENGTH(n, b);
    fill(kind, seed, start + (uint64_t)b, m, z);
    for (int64_t i = 0; i < m; i++) {
      float theta = param[b + i] + eps * z[i];
      param[b + i] = theta * decay - coef * z[i];
    }
  }
}
