/* softmax(q k^T * scale) v on an AVX512 CPU, the maths of torch's CPU flash kernel, in two precisions:
 * - osd_attention_bf16: bf16 q, k, v and output; fp32 scores and softmax, the probabilities rounded to bf16
 *   for the product with v, fp32 sums; both products on the bf16 dot-product instruction (vdpbf16ps,
 *   AVX512-BF16). D must be even (pairs of it feed one dot-product lane).
 * - osd_attention_f32: fp32 throughout, both products on fp32 FMAs (AVX512F).
 *
 * Built on first use by optimizedSD/model/cpu_attention.py with the system C compiler and loaded with
 * ctypes; it links nothing but libc and pthreads. Layout: q (B, H, N, D), k (B, H, M, D), v (B, H, M, DV)
 * and the output (B, H, N, DV), each with its own strides (in elements) for b, h and the token; the last
 * dim contiguous.
 *
 * Per (b, h): k is packed once into 16-key tiles (of d-pairs in bf16, of single dims in fp32) and v into
 * rows of 16-dim vectors (interleaved by key pairs in bf16), the layouts the instructions read. Then each
 * task takes ROWS queries of one (b, h): their scores against every key (ROWS x M fp32, in cache), an exact
 * two-pass softmax per row (max, then exp and sum), the probabilities (as bf16, or fp32), and their product
 * with v, divided by the row's sum. Tasks are shared among `threads` threads.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 24 /* queries per task: a multiple of every row group below (4, 6, 8) */
#define KEY_BLOCK 256 /* keys per partial sum of the product with v (a multiple of 16) */
#define DIM_BLOCK 128 /* head dims per partial sum of the scores (even) */
#define SMALL_WORK (1 << 23) /* multiply-adds below which one thread does it all */
#define QR 4    /* query rows per score tile (with 4 key tiles: 16 accumulators; 6 is no faster) */
#define INLINE static inline __attribute__((always_inline))

typedef struct {
    const char *q, *k, *v;
    char *o;
    int f32;                  /* 1: fp32 elements; 0: bf16 */
    int64_t B, H, N, M, D, DV;
    int64_t qs[3], ks[3], vs[3], os[3];
    float scale;
    int64_t Mp, NV;           /* keys rounded up to 16; 16-dim vectors of DV */
    char *kp, *vp;            /* packed k and v of every (b, h) */
    int64_t kp_size, vp_size; /* elements per (b, h) */
    int64_t tasks, qblocks;
    int64_t next;             /* the next task, taken atomically */
    int failed;
} Job;

INLINE int64_t esize(const Job *j) { return j->f32 ? 4 : 2; }

/* ---- exp on 16 lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2 (Cephes' expf polynomial) ---------- */
INLINE __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

INLINE __m512bh pair(const uint16_t *at) { /* two bf16 broadcast to every lane */
    int32_t bits;
    memcpy(&bits, at, 4);
    return (__m512bh)_mm512_set1_epi32(bits);
}

/* ---- packing ------------------------------------------------------------------------------------------ */
/* k of one (b, h) -> [key tile of 16][d pair][16 keys][2] (bf16) or [key tile][d][16 keys] (fp32); keys
 * past M are zeros. */
static void pack_k(const Job *j, int64_t b, int64_t h, char *dst) {
    const char *src = j->k + (b * j->ks[0] + h * j->ks[1]) * esize(j);
    memset(dst, 0, esize(j) * j->kp_size);
    for (int64_t key = 0; key < j->M; key++) {
        const char *row = src + key * j->ks[2] * esize(j);
        if (j->f32) {
            float *tile = (float *)dst + (key / 16) * j->D * 16 + key % 16;
            for (int64_t d = 0; d < j->D; d++) tile[d * 16] = ((const float *)row)[d];
        } else {
            uint16_t *tile = (uint16_t *)dst + (key / 16) * j->D * 16 + (key % 16) * 2;
            for (int64_t p = 0; p < j->D / 2; p++) {
                tile[p * 32] = ((const uint16_t *)row)[2 * p];
                tile[p * 32 + 1] = ((const uint16_t *)row)[2 * p + 1];
            }
        }
    }
}

/* v of one (b, h) -> [key pair][16-dim vector][16 dims][2] (bf16) or [key][16-dim vector][16 dims] (fp32);
 * keys past M and dims past DV are zeros. */
static void pack_v(const Job *j, int64_t b, int64_t h, char *dst) {
    const char *src = j->v + (b * j->vs[0] + h * j->vs[1]) * esize(j);
    memset(dst, 0, esize(j) * j->vp_size);
    for (int64_t key = 0; key < j->M; key++) {
        const char *row = src + key * j->vs[2] * esize(j);
        if (j->f32) {
            memcpy((float *)dst + key * j->NV * 16, row, 4 * j->DV);
        } else {
            uint16_t *at = (uint16_t *)dst + (key / 2) * j->NV * 32 + (key % 2);
            for (int64_t d = 0; d < j->DV; d++) at[(d / 16) * 32 + (d % 16) * 2] = ((const uint16_t *)row)[d];
        }
    }
}

/* ---- scores: QR query rows x NK 16-key tiles, over dims [d0, d1) (pairs of them in bf16) -------------
 * Dims in blocks of DIM_BLOCK, each block's sums added into s (the first stores, the last scales): a long
 * run of dims in one sum loses fp32 digits (the VAE's head dim is 512). */
INLINE void scores_tile(const Job *j, const char *const *qrow, const char *kp, float *s, int64_t key0, int NK,
                        int64_t d0, int64_t d1, int F32) {
    __m512 acc[QR][4];
    for (int r = 0; r < QR; r++)
        for (int c = 0; c < NK; c++) acc[r][c] = _mm512_setzero_ps();
    if (F32) {
        const float *tile = (const float *)kp + (key0 / 16) * j->D * 16;
        for (int64_t d = d0; d < d1; d++) {
            __m512 kv[4];
            for (int c = 0; c < NK; c++) kv[c] = _mm512_loadu_ps(tile + (c * j->D + d) * 16);
            for (int r = 0; r < QR; r++) {
                __m512 qv = _mm512_set1_ps(((const float *)qrow[r])[d]);
                for (int c = 0; c < NK; c++) acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]);
            }
        }
    } else {
        int64_t pairs = j->D / 2;
        const uint16_t *tile = (const uint16_t *)kp + (key0 / 16) * pairs * 32;
        for (int64_t p = d0 / 2; p < d1 / 2; p++) {
            __m512bh kv[4];
            for (int c = 0; c < NK; c++) kv[c] = (__m512bh)_mm512_loadu_si512(tile + (c * pairs + p) * 32);
            for (int r = 0; r < QR; r++) {
                __m512bh qv = pair((const uint16_t *)qrow[r] + 2 * p);
                for (int c = 0; c < NK; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qv, kv[c]);
            }
        }
    }
    __m512 scale = _mm512_set1_ps(j->scale);
    for (int r = 0; r < QR; r++)
        for (int c = 0; c < NK; c++) {
            float *at = s + r * j->Mp + key0 + 16 * c;
            __m512 sum = d0 ? _mm512_add_ps(_mm512_loadu_ps(at), acc[r][c]) : acc[r][c];
            _mm512_storeu_ps(at, d1 == j->D ? _mm512_mul_ps(sum, scale) : sum);
        }
}

/* ---- probabilities: row r of s -> row of p (bf16 or fp32, zeros past M); returns 1 / the row's sum ----- */
INLINE void store_p(void *p, int64_t at, __m512 e, int F32) {
    if (F32) _mm512_storeu_ps((float *)p + at, e);
    else _mm256_storeu_si256((__m256i *)((uint16_t *)p + at), (__m256i)_mm512_cvtneps_pbh(e));
}

INLINE float softmax_row(const Job *j, const float *s, void *p, int F32) {
    int64_t M = j->M, full = M / 16 * 16;
    __mmask16 tail = (__mmask16)((1u << (M - full)) - 1);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < full; c += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + c));
    if (tail) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, s + full));
    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + c), m));
        sum = _mm512_add_ps(sum, e);
        store_p(p, c, e, F32);
    }
    if (full < j->Mp) {
        __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + full), m)));
        sum = _mm512_add_ps(sum, e);
        store_p(p, full, e, F32);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* ---- output: RG rows x NV 16-dim vectors from vector v0, over every key (pair) ---------------------------
 * HALF: the last of them holds 8 dims or fewer (DV = 40: 16 + 16 + 8) and runs on 256-bit registers. */
INLINE void output_tile(const Job *j, const void *p, const float *inv, const char *vp, char *const *orow,
                        int rows_left, int64_t v0, int RG, int NV, int HALF, int F32) {
    /* sums of KEY_BLOCK keys at a time, added into tot: a long run of keys in one sum loses fp32 digits */
    __m512 acc[8][6], tot[8][6];
    __m256 half[8], toth[8];
    for (int r = 0; r < RG; r++) {
        for (int c = 0; c < NV - HALF; c++) tot[r][c] = _mm512_setzero_ps();
        if (HALF) toth[r] = _mm256_setzero_ps();
    }
    for (int64_t k0 = 0; k0 < j->Mp; k0 += KEY_BLOCK) {
        int64_t k1 = k0 + KEY_BLOCK < j->Mp ? k0 + KEY_BLOCK : j->Mp;
        for (int r = 0; r < RG; r++) {
            for (int c = 0; c < NV - HALF; c++) acc[r][c] = _mm512_setzero_ps();
            if (HALF) half[r] = _mm256_setzero_ps();
        }
        if (F32) {
            const float *pf = (const float *)p;
            for (int64_t key = k0; key < k1; key++) {
                __m512 vv[6];
                __m256 vh;
                const float *at = (const float *)vp + (key * j->NV + v0) * 16;
                for (int c = 0; c < NV - HALF; c++) vv[c] = _mm512_loadu_ps(at + c * 16);
                if (HALF) vh = _mm256_loadu_ps(at + (NV - 1) * 16);
                for (int r = 0; r < RG; r++) {
                    __m512 pv = _mm512_set1_ps(pf[r * j->Mp + key]);
                    for (int c = 0; c < NV - HALF; c++) acc[r][c] = _mm512_fmadd_ps(pv, vv[c], acc[r][c]);
                    if (HALF) half[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(pv), vh, half[r]);
                }
            }
        } else {
            const uint16_t *pb = (const uint16_t *)p;
            for (int64_t kp = k0 / 2; kp < k1 / 2; kp++) {
                __m512bh vv[6];
                __m256bh vh;
                const uint16_t *at = (const uint16_t *)vp + (kp * j->NV + v0) * 32;
                for (int c = 0; c < NV - HALF; c++) vv[c] = (__m512bh)_mm512_loadu_si512(at + c * 32);
                if (HALF) vh = (__m256bh)_mm256_loadu_si256((const __m256i *)(at + (NV - 1) * 32));
                for (int r = 0; r < RG; r++) {
                    __m512bh pv = pair(pb + r * j->Mp + 2 * kp);
                    for (int c = 0; c < NV - HALF; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pv, vv[c]);
                    if (HALF) half[r] = _mm256_dpbf16_ps(half[r], (__m256bh)_mm512_castsi512_si256((__m512i)pv), vh);
                }
            }
        }
        for (int r = 0; r < RG; r++) {
            for (int c = 0; c < NV - HALF; c++) tot[r][c] = _mm512_add_ps(tot[r][c], acc[r][c]);
            if (HALF) toth[r] = _mm256_add_ps(toth[r], half[r]);
        }
    }
    for (int r = 0; r < RG && r < rows_left; r++) {
        __m512 scale = _mm512_set1_ps(inv[r]);
        for (int c = 0; c < NV; c++) {
            int64_t d0 = (v0 + c) * 16, left = j->DV - d0;
            int last_half = HALF && c == NV - 1;
            __m512 out = last_half ? _mm512_castps256_ps512(_mm256_mul_ps(toth[r], _mm512_castps512_ps256(scale)))
                                   : _mm512_mul_ps(tot[r][c], scale);
            __mmask16 keep = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            if (F32) _mm512_mask_storeu_ps((float *)orow[r] + d0, keep, out);
            else _mm256_mask_storeu_epi16((uint16_t *)orow[r] + d0, keep, (__m256i)_mm512_cvtneps_pbh(out));
        }
    }
}

INLINE void output_rows(const Job *j, const void *p, const float *inv, const char *vp, char *const *orow, int rows,
                        int64_t v0, int NV, int F32) {
    int half = v0 + NV == j->NV && j->DV % 16 && j->DV % 16 <= 8;
    int64_t pstride = j->Mp * esize(j);
#define TILES(RG_, NV_)                                                                                         \
    for (int r = 0; r < ROWS; r += RG_) {                                                                       \
        const char *pr = (const char *)p + r * pstride;                                                         \
        if (half) output_tile(j, pr, inv + r, vp, orow + r, rows - r, v0, RG_, NV_, 1, F32);                   \
        else output_tile(j, pr, inv + r, vp, orow + r, rows - r, v0, RG_, NV_, 0, F32);                        \
    }
    switch (NV) {
    case 1: TILES(8, 1) break;
    case 2: TILES(8, 2) break;
    case 3: TILES(8, 3) break;
    case 4: TILES(6, 4) break;
    case 5: TILES(4, 5) break;
    default: TILES(4, 6) break;
    }
#undef TILES
}

/* ---- one task: ROWS queries of one (b, h) ------------------------------------------------------------- */
INLINE void run_task(const Job *j, int64_t task, float *s, char *p, float *inv, int F32) {
    int64_t bh = task / j->qblocks, q0 = (task % j->qblocks) * ROWS;
    int64_t b = bh / j->H, h = bh % j->H;
    int rows = (int)(j->N - q0 < ROWS ? j->N - q0 : ROWS);
    const char *kp = j->kp + bh * j->kp_size * esize(j), *vp = j->vp + bh * j->vp_size * esize(j);
    const char *qrow[ROWS];
    char *orow[ROWS];
    for (int r = 0; r < ROWS; r++) { /* rows past N repeat the last query; their results are not stored */
        int64_t n = q0 + (r < rows ? r : rows - 1);
        qrow[r] = j->q + (b * j->qs[0] + h * j->qs[1] + n * j->qs[2]) * esize(j);
        orow[r] = j->o + (b * j->os[0] + h * j->os[1] + n * j->os[2]) * esize(j);
    }
    for (int r = 0; r < ROWS; r += QR)
        for (int64_t d0 = 0; d0 < j->D; d0 += DIM_BLOCK) {
            int64_t d1 = d0 + DIM_BLOCK < j->D ? d0 + DIM_BLOCK : j->D, key = 0;
            for (; key + 64 <= j->Mp; key += 64) scores_tile(j, qrow + r, kp, s + r * j->Mp, key, 4, d0, d1, F32);
            for (; key < j->Mp; key += 16) scores_tile(j, qrow + r, kp, s + r * j->Mp, key, 1, d0, d1, F32);
        }
    for (int r = 0; r < ROWS; r++) inv[r] = softmax_row(j, s + r * j->Mp, p + r * j->Mp * esize(j), F32);
    int64_t chunks = (j->NV + 5) / 6, per = (j->NV + chunks - 1) / chunks;
    for (int64_t v0 = 0; v0 < j->NV; v0 += per)
        output_rows(j, p, inv, vp, orow, rows, v0, (int)(j->NV - v0 < per ? j->NV - v0 : per), F32);
}

static void *worker_pack(void *arg) {
    Job *j = (Job *)arg;
    for (;;) {
        int64_t bh = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (bh >= j->B * j->H) return NULL;
        pack_k(j, bh / j->H, bh % j->H, j->kp + bh * j->kp_size * esize(j));
        pack_v(j, bh / j->H, bh % j->H, j->vp + bh * j->vp_size * esize(j));
    }
}

static void *worker(void *arg) {
    Job *j = (Job *)arg;
    void *s = NULL, *p = NULL;
    float inv[ROWS];
    if (posix_memalign(&s, 64, sizeof(float) * ROWS * j->Mp) || posix_memalign(&p, 64, esize(j) * ROWS * j->Mp)) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
    } else {
        for (;;) {
            int64_t task = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
            if (task >= j->tasks) break;
            if (j->f32) run_task(j, task, (float *)s, (char *)p, inv, 1);
            else run_task(j, task, (float *)s, (char *)p, inv, 0);
        }
    }
    free(s);
    free(p);
    return NULL;
}

static void run_threads(Job *j, void *(*fn)(void *), int threads) {
    pthread_t ids[256];
    int started = 0;
    j->next = 0;
    for (int t = 1; t < threads && t < 256; t++)
        if (pthread_create(&ids[started], NULL, fn, j) == 0) started++;
    fn(j);
    for (int t = 0; t < started; t++) pthread_join(ids[t], NULL);
}

static int attention(int f32, const void *q, const void *k, const void *v, void *o, int64_t B, int64_t H, int64_t N,
                     int64_t M, int64_t D, int64_t DV, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                     const int64_t *os, float scale, int threads) {
    Job j;
    memset(&j, 0, sizeof j);
    j.q = q, j.k = k, j.v = v, j.o = o, j.f32 = f32;
    j.B = B, j.H = H, j.N = N, j.M = M, j.D = D, j.DV = DV, j.scale = scale;
    memcpy(j.qs, qs, sizeof j.qs);
    memcpy(j.ks, ks, sizeof j.ks);
    memcpy(j.vs, vs, sizeof j.vs);
    memcpy(j.os, os, sizeof j.os);
    j.Mp = (M + 15) / 16 * 16;
    j.NV = (DV + 15) / 16;
    j.kp_size = j.Mp * D;
    j.vp_size = j.Mp * j.NV * 16;
    j.qblocks = (N + ROWS - 1) / ROWS;
    j.tasks = B * H * j.qblocks;
    void *kp = NULL, *vp = NULL;
    if (posix_memalign(&kp, 64, esize(&j) * B * H * j.kp_size) ||
        posix_memalign(&vp, 64, esize(&j) * B * H * j.vp_size)) {
        free(kp);
        return 1;
    }
    j.kp = (char *)kp;
    j.vp = (char *)vp;
    if (B * H * N * j.Mp * (D + DV) < SMALL_WORK) threads = 1; /* starting threads would cost more than they save */
    run_threads(&j, worker_pack, threads);
    run_threads(&j, worker, threads);
    free(j.kp);
    free(j.vp);
    return j.failed;
}

/* 0: done; 1: out of memory (o may be partly written: the caller discards it). */
int osd_attention_bf16(const void *q, const void *k, const void *v, void *o, int64_t B, int64_t H, int64_t N,
                       int64_t M, int64_t D, int64_t DV, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                       const int64_t *os, float scale, int threads) {
    return attention(0, q, k, v, o, B, H, N, M, D, DV, qs, ks, vs, os, scale, threads);
}

int osd_attention_f32(const void *q, const void *k, const void *v, void *o, int64_t B, int64_t H, int64_t N,
                      int64_t M, int64_t D, int64_t DV, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                      const int64_t *os, float scale, int threads) {
    return attention(1, q, k, v, o, B, H, N, M, D, DV, qs, ks, vs, os, scale, threads);
}
