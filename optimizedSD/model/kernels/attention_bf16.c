/* softmax(q k^T * scale) v for bf16 q, k, v on an AVX512-BF16 CPU, the maths of torch's CPU flash kernel
 * (fp32 scores and softmax, the probabilities rounded to bf16 for the product with v, fp32 accumulation)
 * on the CPU's bf16 dot-product instruction (vdpbf16ps) for both products.
 *
 * Built on first use by optimizedSD/model/cpu_attention.py with the system C compiler and loaded with
 * ctypes; it links nothing but libc and pthreads. Layout: q (B, H, N, D), k (B, H, M, D), v (B, H, M, DV)
 * and the output (B, H, N, DV), each with its own strides (in elements) for b, h and the token; the last
 * dim contiguous. D must be even (pairs of it feed one dot-product lane).
 *
 * Per (b, h): k is packed once into 16-key tiles of d-pairs and v into key-pairs of 16-dim vectors (the
 * layouts vdpbf16ps reads). Then each task takes ROWS queries of one (b, h): their scores against every key
 * (ROWS x M fp32, in cache), an exact two-pass softmax per row (max, then exp and sum), the probabilities as
 * bf16, and their product with v, divided by the row's sum. Tasks are shared among `threads` threads.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 24 /* queries per task: a multiple of every row group below (4, 6, 8) */
#define QR 4    /* query rows per score tile (with 4 key tiles: 16 accumulators; 6 is no faster) */
#define INLINE static inline __attribute__((always_inline))

typedef struct {
    const uint16_t *q, *k, *v;
    uint16_t *o;
    int64_t B, H, N, M, D, DV;
    int64_t qs[3], ks[3], vs[3], os[3];
    float scale;
    int64_t Mp, NV;         /* keys rounded up to 16; 16-dim vectors of DV */
    uint16_t *kp, *vp;      /* packed k and v of every (b, h) */
    int64_t kp_size, vp_size; /* elements per (b, h) */
    int64_t tasks, qblocks;
    int64_t next;           /* the next task, taken atomically */
    int failed;
} Job;

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
/* k of one (b, h) -> [key tile of 16][d pair][16 keys][2]; keys past M are zeros. */
static void pack_k(const Job *j, int64_t b, int64_t h, uint16_t *dst) {
    const uint16_t *src = j->k + b * j->ks[0] + h * j->ks[1];
    int64_t pairs = j->D / 2;
    memset(dst, 0, sizeof(uint16_t) * j->kp_size);
    for (int64_t key = 0; key < j->M; key++) {
        const uint16_t *row = src + key * j->ks[2];
        uint16_t *tile = dst + (key / 16) * pairs * 32 + (key % 16) * 2;
        for (int64_t p = 0; p < pairs; p++) {
            tile[p * 32] = row[2 * p];
            tile[p * 32 + 1] = row[2 * p + 1];
        }
    }
}

/* v of one (b, h) -> [key pair][16-dim vector][16 dims][2]; keys past M and dims past DV are zeros. */
static void pack_v(const Job *j, int64_t b, int64_t h, uint16_t *dst) {
    const uint16_t *src = j->v + b * j->vs[0] + h * j->vs[1];
    memset(dst, 0, sizeof(uint16_t) * j->vp_size);
    for (int64_t key = 0; key < j->M; key++) {
        const uint16_t *row = src + key * j->vs[2];
        uint16_t *at = dst + (key / 2) * j->NV * 32 + (key % 2);
        for (int64_t d = 0; d < j->DV; d++) at[(d / 16) * 32 + (d % 16) * 2] = row[d];
    }
}

/* ---- scores: QR query rows x NK 16-key tiles ----------------------------------------------------------- */
INLINE void scores_tile(const Job *j, const uint16_t *const *qrow, const uint16_t *kp, float *s, int64_t key0,
                        int NK) {
    int64_t pairs = j->D / 2;
    __m512 acc[QR][4];
    for (int r = 0; r < QR; r++)
        for (int c = 0; c < NK; c++) acc[r][c] = _mm512_setzero_ps();
    const uint16_t *tile = kp + (key0 / 16) * pairs * 32;
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh kv[4];
        for (int c = 0; c < NK; c++) kv[c] = (__m512bh)_mm512_loadu_si512(tile + (c * pairs + p) * 32);
        for (int r = 0; r < QR; r++) {
            __m512bh qv = pair(qrow[r] + 2 * p);
            for (int c = 0; c < NK; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qv, kv[c]);
        }
    }
    __m512 scale = _mm512_set1_ps(j->scale);
    for (int r = 0; r < QR; r++)
        for (int c = 0; c < NK; c++) _mm512_storeu_ps(s + r * j->Mp + key0 + 16 * c, _mm512_mul_ps(acc[r][c], scale));
}

/* ---- probabilities: row r of s -> bf16 row of p (zeros past M); returns 1 / the row's sum ------------- */
static float softmax_row(const Job *j, const float *s, uint16_t *p) {
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
        _mm256_storeu_si256((__m256i *)(p + c), (__m256i)_mm512_cvtneps_pbh(e));
    }
    if (full < j->Mp) {
        __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + full), m)));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256((__m256i *)(p + full), (__m256i)_mm512_cvtneps_pbh(e));
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* ---- output: RG rows x NV 16-dim vectors from vector v0, over every key pair ----------------------------
 * HALF: the last of them holds 8 dims or fewer (DV = 40: 16 + 16 + 8) and runs on 256-bit registers. */
INLINE void output_tile(const Job *j, const uint16_t *p, const float *inv, const uint16_t *vp, uint16_t *const *orow,
                        int rows_left, int64_t v0, int RG, int NV, int HALF) {
    __m512 acc[8][6];
    __m256 half[8];
    for (int r = 0; r < RG; r++) {
        for (int c = 0; c < NV - HALF; c++) acc[r][c] = _mm512_setzero_ps();
        if (HALF) half[r] = _mm256_setzero_ps();
    }
    int64_t pairs = j->Mp / 2;
    for (int64_t kp = 0; kp < pairs; kp++) {
        __m512bh vv[6];
        __m256bh vh;
        const uint16_t *at = vp + (kp * j->NV + v0) * 32;
        for (int c = 0; c < NV - HALF; c++) vv[c] = (__m512bh)_mm512_loadu_si512(at + c * 32);
        if (HALF) vh = (__m256bh)_mm256_loadu_si256((const __m256i *)(at + (NV - 1) * 32));
        for (int r = 0; r < RG; r++) {
            __m512bh pv = pair(p + r * j->Mp + 2 * kp);
            for (int c = 0; c < NV - HALF; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pv, vv[c]);
            if (HALF) half[r] = _mm256_dpbf16_ps(half[r], (__m256bh)_mm512_castsi512_si256((__m512i)pv), vh);
        }
    }
    for (int r = 0; r < RG && r < rows_left; r++) {
        __m512 scale = _mm512_set1_ps(inv[r]);
        for (int c = 0; c < NV - HALF; c++) {
            int64_t d0 = (v0 + c) * 16, left = j->DV - d0;
            __mmask16 keep = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], scale));
            _mm256_mask_storeu_epi16(orow[r] + d0, keep, out);
        }
        if (HALF) {
            int64_t d0 = (v0 + NV - 1) * 16;
            __m128i out = (__m128i)_mm256_cvtneps_pbh(_mm256_mul_ps(half[r], _mm512_castps512_ps256(scale)));
            _mm_mask_storeu_epi16(orow[r] + d0, (__mmask8)((1u << (j->DV - d0)) - 1), out);
        }
    }
}

static void output_rows(const Job *j, const uint16_t *p, const float *inv, const uint16_t *vp, uint16_t *const *orow,
                        int rows, int64_t v0, int NV) {
    int half = v0 + NV == j->NV && j->DV % 16 && j->DV % 16 <= 8;
#define TILES(RG_, NV_)                                                                                         \
    for (int r = 0; r < ROWS; r += RG_)                                                                         \
        if (half) output_tile(j, p + r * j->Mp, inv + r, vp, orow + r, rows - r, v0, RG_, NV_, 1);             \
        else output_tile(j, p + r * j->Mp, inv + r, vp, orow + r, rows - r, v0, RG_, NV_, 0);
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
static void run_task(const Job *j, int64_t task, float *s, uint16_t *p, float *inv) {
    int64_t bh = task / j->qblocks, q0 = (task % j->qblocks) * ROWS;
    int64_t b = bh / j->H, h = bh % j->H;
    int rows = (int)(j->N - q0 < ROWS ? j->N - q0 : ROWS);
    const uint16_t *kp = j->kp + bh * j->kp_size, *vp = j->vp + bh * j->vp_size;
    const uint16_t *qrow[ROWS];
    uint16_t *orow[ROWS];
    for (int r = 0; r < ROWS; r++) { /* rows past N repeat the last query; their results are not stored */
        int64_t n = q0 + (r < rows ? r : rows - 1);
        qrow[r] = j->q + b * j->qs[0] + h * j->qs[1] + n * j->qs[2];
        orow[r] = j->o + b * j->os[0] + h * j->os[1] + n * j->os[2];
    }
    for (int r = 0; r < ROWS; r += QR) {
        int64_t key = 0;
        for (; key + 64 <= j->Mp; key += 64) scores_tile(j, qrow + r, kp, s + r * j->Mp, key, 4);
        for (; key < j->Mp; key += 16) scores_tile(j, qrow + r, kp, s + r * j->Mp, key, 1);
    }
    for (int r = 0; r < ROWS; r++) inv[r] = softmax_row(j, s + r * j->Mp, p + r * j->Mp);
    int64_t chunks = (j->NV + 5) / 6, per = (j->NV + chunks - 1) / chunks;
    for (int64_t v0 = 0; v0 < j->NV; v0 += per)
        output_rows(j, p, inv, vp, orow, rows, v0, (int)(j->NV - v0 < per ? j->NV - v0 : per));
}

static void *worker_pack(void *arg) {
    Job *j = (Job *)arg;
    for (;;) {
        int64_t bh = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (bh >= j->B * j->H) return NULL;
        pack_k(j, bh / j->H, bh % j->H, j->kp + bh * j->kp_size);
        pack_v(j, bh / j->H, bh % j->H, j->vp + bh * j->vp_size);
    }
}

static void *worker(void *arg) {
    Job *j = (Job *)arg;
    void *s = NULL, *p = NULL;
    float inv[ROWS];
    if (posix_memalign(&s, 64, sizeof(float) * ROWS * j->Mp) || posix_memalign(&p, 64, sizeof(uint16_t) * ROWS * j->Mp)) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
    } else {
        for (;;) {
            int64_t task = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
            if (task >= j->tasks) break;
            run_task(j, task, (float *)s, (uint16_t *)p, inv);
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

/* 0: done; 1: out of memory (o may be partly written: the caller discards it). */
int osd_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o, int64_t B, int64_t H,
                       int64_t N, int64_t M, int64_t D, int64_t DV, const int64_t *qs, const int64_t *ks,
                       const int64_t *vs, const int64_t *os, float scale, int threads) {
    Job j = {q, k, v, o, B, H, N, M, D, DV, {0}, {0}, {0}, {0}, scale};
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
    if (posix_memalign(&kp, 64, sizeof(uint16_t) * B * H * j.kp_size) ||
        posix_memalign(&vp, 64, sizeof(uint16_t) * B * H * j.vp_size)) {
        free(kp);
        return 1;
    }
    j.kp = (uint16_t *)kp;
    j.vp = (uint16_t *)vp;
    run_threads(&j, worker_pack, threads);
    run_threads(&j, worker, threads);
    free(j.kp);
    free(j.vp);
    return j.failed;
}
