/* genrec's native CPU kernels, built and loaded by genrec/ops/native.py:
 *   genrec_tile_pass                          fused elementwise passes of the blocked HSTU attention (below)
 *   genrec_time_buckets_tiles                 time-bucket ids of the attention tiles
 *   genrec_dropout                            dropout with a counter-based random stream (genrec/ops/dropout.py)
 *   genrec_attn_forward / genrec_attn_backward the whole fp32 tile loop of the blocked attention (end of file)
 *
 * Every kernel takes one pointer to an argument struct (declared just below). native.py mirrors each struct as a
 * ctypes.Structure and, when it loads the library, compares genrec_abi_version() and every struct's size, field
 * names and field offsets (genrec_struct_layout) with its own: a library that does not match is not used.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------------------------------------------------------
 * Argument structs. Each is written once as a list of (type, name) fields, from which both the struct and its
 * layout description (genrec_struct_layout) are generated; native.py declares the same fields in the same order.
 * A field changed here must change there too (the load-time check refuses the library otherwise); bump
 * GENREC_ABI_VERSION when a kernel's meaning changes without its fields changing.
 * ---------------------------------------------------------------------------------------------------------------- */
#define GENREC_ABI_VERSION 2

/* genrec_tile_pass: the elementwise passes of one chunk of tiles (shapes: see the next section). */
#define GENREC_TILE_ARGS(X)                                                                                          \
    X(void *, s)              /* [C, H, B, B] scores q·kᵀ (no bias), fp32 or bf16 (dtype 0 / 1); becomes w */      \
    X(void *, dw)             /* [C, H, B, B] dL/dw, becomes ds; NULL: forward */                                  \
    X(const float *, pos)     /* [B, B] position bias of the chunk's block distance, or NULL */                     \
    X(const void *, bucket)   /* [C, B, B] time-bucket ids (int64 or uint8: bucket_dtype 0 / 1), or NULL */         \
    X(const float *, ts)      /* [nts] time-bias weights by bucket id (the last entry is 0: rows without time) */   \
    X(float *, dpos)          /* [B, B] += position-bias gradient (backward), or NULL */                            \
    X(float *, dts)           /* [nts] += time-bias gradient (backward), or NULL */                                 \
    X(int64_t, C)             /* tiles in the chunk */                                                              \
    X(int, dtype)                                                                                                   \
    X(int, H)                                                                                                       \
    X(int, B)                                                                                                       \
    X(int, bucket_dtype)                                                                                            \
    X(int, nts)                                                                                                     \
    X(int, diag) /* 1: diagonal tiles (query block == key block), key column c > query row r is masked */

/* genrec_time_buckets_tiles: the time-bucket ids of n tiles. */
#define GENREC_BUCKET_ARGS(X)                                                                                        \
    X(const int64_t *, slot_qt) /* [nblk, B] query time of every slot */                                            \
    X(const int64_t *, slot_t)  /* [nblk, B] timestamp of every slot */                                             \
    X(const uint8_t *, timed)   /* [nblk] whether the block's row has timestamps */                                 \
    X(const int64_t *, qi)      /* [n] query block of each tile */                                                  \
    X(const int64_t *, ki)      /* [n] key block of each tile */                                                    \
    X(void *, out)              /* [n, B, B] ids, int64 or uint8 (out_dtype 0 / 1) */                               \
    X(int64_t, n)                                                                                                   \
    X(int, B)                                                                                                       \
    X(int, nb) /* number of time buckets: ids 0 .. nb, and nb + 1 for rows without time */                          \
    X(int, out_dtype)

/* genrec_dropout: y = x · mask / (1 - p) over n elements (x and y do not overlap). */
#define GENREC_DROPOUT_ARGS(X)                                                                                       \
    X(const void *, x)                                                                                              \
    X(void *, y)                                                                                                    \
    X(int64_t, n)                                                                                                   \
    X(uint64_t, seed)                                                                                               \
    X(float, p)                                                                                                     \
    X(int, dtype) /* 0: fp32, 1: bf16 */

/* genrec_attn_forward / genrec_attn_backward: the whole fp32 tile loop (layout: see the last section). */
#define GENREC_ATTN_ARGS(X)                                                                                          \
    X(const float *, q)                                                                                             \
    X(const float *, k)                                                                                             \
    X(const float *, v)                                                                                             \
    X(const float *, go)     /* dL/d(out) (backward) */                                                            \
    X(const float *, norm)   /* [nblk] each block's normaliser */                                                  \
    X(const float *, pos)    /* [P] position weights, or NULL */                                                   \
    X(const float *, ts)     /* [nts] time weights (last entry 0), or NULL */                                      \
    X(float *, out)          /* forward: += Σ w·v / norm */                                                        \
    X(float *, dq)           /* backward: the gradients, added into */                                             \
    X(float *, dk)                                                                                                  \
    X(float *, dv)                                                                                                  \
    X(float *, dpos)         /* [P] or NULL */                                                                     \
    X(float *, dts)          /* [nts] or NULL */                                                                   \
    X(const int64_t *, qi)   /* [tiles] query block, sorted by key block */                                        \
    X(const int64_t *, ki)   /* [tiles] key block */                                                               \
    X(const int64_t *, delta) /* [tiles] block distance */                                                         \
    X(const int64_t *, bucket) /* [tiles] address of each tile's [B, B] bucket ids, or NULL */                     \
    X(const int64_t *, gstart) /* [ngroups + 1] first tile of each key-block group */                              \
    X(const int64_t *, qbase) /* [nblk] first element of block b in q, k, dq, dk */                                \
    X(const int64_t *, vbase) /* [nblk] first element of block b in v, go, out, dv */                              \
    X(int64_t, qhs)                                                                                                 \
    X(int64_t, qrs)                                                                                                 \
    X(int64_t, vhs)                                                                                                 \
    X(int64_t, vrs)                                                                                                 \
    X(int64_t, qnumel)                                                                                              \
    X(int64_t, vnumel)                                                                                              \
    X(int64_t, ngroups)                                                                                             \
    X(int, H)                                                                                                       \
    X(int, B)                                                                                                       \
    X(int, dim_qk)                                                                                                  \
    X(int, dim_v)                                                                                                   \
    X(int, P)                                                                                                       \
    X(int, nts)                                                                                                     \
    X(int, bucket_dtype)                                                                                            \
    X(int, panel)

#define GENREC_FIELD(type, name) type name;
typedef struct { GENREC_TILE_ARGS(GENREC_FIELD) } genrec_tile_args;
typedef struct { GENREC_BUCKET_ARGS(GENREC_FIELD) } genrec_bucket_args;
typedef struct { GENREC_DROPOUT_ARGS(GENREC_FIELD) } genrec_dropout_args;
typedef struct { GENREC_ATTN_ARGS(GENREC_FIELD) } genrec_attn_args;

int genrec_abi_version(void) { return GENREC_ABI_VERSION; }

/* Layout of argument struct `which` (0 tile, 1 bucket, 2 dropout, 3 attn): out[0] = its size, out[1 + f] = the
 * offset of field f (up to n entries in all); *names = the field names, space-separated. Returns the number of
 * fields, or -1 for an unknown struct. */
#define GENREC_NAME(type, name) #name " "
#define GENREC_OFFSET(type, name)                                                                                   \
    if (++f < n) out[f] = (int64_t)offsetof(S, name);
int genrec_struct_layout(int which, int64_t *out, int n, const char **names) {
    int f = 0;
    switch (which) {
    case 0: {
        typedef genrec_tile_args S;
        *names = GENREC_TILE_ARGS(GENREC_NAME);
        if (n > 0) out[0] = (int64_t)sizeof(S);
        GENREC_TILE_ARGS(GENREC_OFFSET)
        break;
    }
    case 1: {
        typedef genrec_bucket_args S;
        *names = GENREC_BUCKET_ARGS(GENREC_NAME);
        if (n > 0) out[0] = (int64_t)sizeof(S);
        GENREC_BUCKET_ARGS(GENREC_OFFSET)
        break;
    }
    case 2: {
        typedef genrec_dropout_args S;
        *names = GENREC_DROPOUT_ARGS(GENREC_NAME);
        if (n > 0) out[0] = (int64_t)sizeof(S);
        GENREC_DROPOUT_ARGS(GENREC_OFFSET)
        break;
    }
    case 3: {
        typedef genrec_attn_args S;
        *names = GENREC_ATTN_ARGS(GENREC_NAME);
        if (n > 0) out[0] = (int64_t)sizeof(S);
        GENREC_ATTN_ARGS(GENREC_OFFSET)
        break;
    }
    default:
        return -1;
    }
    return f;
}

/* ------------------------------------------------------------------------------------------------------------------
 * Fused elementwise passes of genrec's blocked HSTU attention (genrec/ops/hstu_attention.py):
 *
 * The blocked engine computes each chunk of tiles with batched matmuls (ATen / MKL); between them sit elementwise
 * passes over every (tile, head, query row, key column) score. In PyTorch those are 5 passes forward (gather the
 * time bias, add the position tile, add the bias to every head, SiLU, causal mask) and about 10 backward. Here they
 * are one pass each, with the bias summed once per (row, column) and shared by the heads, SiLU evaluated in fp32,
 * and the bias gradients (position tile and time buckets) accumulated in the same pass.
 *
 * Shapes (all contiguous, row-major):
 *   s, dw    [C, H, B, B]  scores q·kᵀ (no bias) / dL/dw, fp32 or bf16 (dtype 0 / 1)
 *   pos      [B, B] fp32   position bias of this chunk's block distance, or NULL
 *   bucket   [C, B, B]     time-bucket ids (int64 or uint8: bucket_dtype 0 / 1), or NULL
 *   ts       [nts] fp32    time-bias weights indexed by bucket id (the last entry is 0: rows without time)
 *   diag     1 when the tiles are diagonal (query block == key block): key column c > query row r is masked
 *
 *   forward:  s  <- SiLU(s + rab) masked                                  (= w, the attention weights · norm)
 *   backward: s  <- SiLU(s + rab) masked;  dw <- dw · SiLU'(s + rab) masked   (= ds)
 *             dpos[r, c] += Σ_{tile, head} ds;  dts[bucket] += Σ_{head} ds      (either may be NULL)
 *
 * exp is a Cephes-style polynomial (relative error at most 8.3e-8 against double exp on [-87, 88], checked on
 * 2e7 points), written so that the compiler vectorises the loops with -fno-trapping-math and without -ffast-math
 * (which would change the process's floating-point state).
 */

typedef union {
    float f;
    uint32_t u;
    int32_t i;
} bits32;

static inline float bf16_to_f32(uint16_t h) {
    bits32 b;
    b.u = (uint32_t)h << 16;
    return b.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even (inputs here are finite) */
    bits32 b;
    b.f = f;
    return (uint16_t)((b.u + 0x7FFFu + ((b.u >> 16) & 1u)) >> 16);
}

static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    bits32 scale;
    scale.i = ((int32_t)n + 127) << 23;
    return y * scale.f;
}

/* bias[c] += ts[brow[c]] for c < n (brow: one row of time-bucket ids, int64 or uint8: bdt 0 / 1) */
static void add_time_bias(float *restrict bias, int n, const void *brow, int bdt, const float *restrict ts) {
    if (bdt == 0) {
        const int64_t *b = (const int64_t *)brow;
        for (int c = 0; c < n; ++c) bias[c] += ts[b[c]];
    } else {
        const uint8_t *b = (const uint8_t *)brow;
        for (int c = 0; c < n; ++c) bias[c] += ts[b[c]];
    }
}

/* bias[c] = pos[r, c] + ts[bucket[r, c]] for one query row (0 where a term is absent) */
static void bias_row(float *bias, int B, int r, const float *pos, const void *bucket, int bucket_dtype,
                     int64_t row_off, const float *ts) {
    for (int c = 0; c < B; ++c) bias[c] = pos ? pos[(int64_t)r * B + c] : 0.0f;
    if (bucket)
        add_time_bias(bias, B, bucket_dtype == 0 ? (const void *)((const int64_t *)bucket + row_off)
                                                 : (const void *)((const uint8_t *)bucket + row_off),
                      bucket_dtype, ts);
}

/* SiLU rows in SIMD registers: the same exp polynomial as exp_approx (with fused multiply-adds), and 1 / (1 + e)
 * as the CPU's reciprocal estimate refined by one Newton step, r · (2 - d · r), instead of a division: the
 * division unit takes several cycles per vector on every x86 core (and GCC, vectorising the scalar loop below for
 * AVX2, issues two divisions per vector, one for the clamped lanes). Relative error of sigmoid: ~2e-7 (AVX2's
 * 12-bit estimate) or ~1e-7 (AVX-512's 14-bit one) after the Newton step, against ~1e-7 for the scalar division.
 * SIMD_W is the vector width in floats (0: the scalar loops only). */
#if defined(__AVX512F__)
#define SIMD_W 16
typedef __m512 vf;
#define V_LOAD _mm512_loadu_ps
#define V_STORE _mm512_storeu_ps
#define V_SET1 _mm512_set1_ps
#define V_ADD _mm512_add_ps
#define V_SUB _mm512_sub_ps
#define V_MUL _mm512_mul_ps
#define V_MIN _mm512_min_ps
#define V_MAX _mm512_max_ps
#define V_FMA _mm512_fmadd_ps   /* a · b + c */
#define V_FNMA _mm512_fnmadd_ps /* c - a · b */
#define V_FLOOR(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
#define V_RCP _mm512_rcp14_ps
#define V_POW2I(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), \
                                                                            _mm512_set1_epi32(127)), 23))
#elif defined(__AVX2__) && defined(__FMA__)
#define SIMD_W 8
typedef __m256 vf;
#define V_LOAD _mm256_loadu_ps
#define V_STORE _mm256_storeu_ps
#define V_SET1 _mm256_set1_ps
#define V_ADD _mm256_add_ps
#define V_SUB _mm256_sub_ps
#define V_MUL _mm256_mul_ps
#define V_MIN _mm256_min_ps
#define V_MAX _mm256_max_ps
#define V_FMA _mm256_fmadd_ps
#define V_FNMA _mm256_fnmadd_ps
#define V_FLOOR _mm256_floor_ps
#define V_RCP _mm256_rcp_ps
#define V_POW2I(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), \
                                                                            _mm256_set1_epi32(127)), 23))
#else
#define SIMD_W 0
#endif

#if SIMD_W
static inline vf v_sigmoid(vf x) { /* 1 / (1 + exp(-x)), exp as exp_approx */
    vf t = V_MIN(V_MAX(V_SUB(V_SET1(0.0f), x), V_SET1(-87.0f)), V_SET1(88.0f)); /* -x, clamped */
    const vf n = V_FLOOR(V_FMA(t, V_SET1(1.44269504088896341f), V_SET1(0.5f)));
    vf r = V_FNMA(n, V_SET1(0.693359375f), t);
    r = V_FMA(n, V_SET1(2.12194440e-4f), r);
    vf p = V_SET1(1.9875691500e-4f);
    p = V_FMA(p, r, V_SET1(1.3981999507e-3f));
    p = V_FMA(p, r, V_SET1(8.3334519073e-3f));
    p = V_FMA(p, r, V_SET1(4.1665795894e-2f));
    p = V_FMA(p, r, V_SET1(1.6666665459e-1f));
    p = V_FMA(p, r, V_SET1(5.0000001201e-1f));
    const vf y = V_ADD(V_FMA(V_MUL(p, r), r, r), V_SET1(1.0f)); /* exp(r) */
    const vf d = V_FMA(y, V_POW2I(n), V_SET1(1.0f));            /* 1 + exp(-x) */
    const vf e = V_RCP(d);
    return V_MUL(e, V_FNMA(d, e, V_SET1(2.0f))); /* one Newton step */
}
#endif

/* One row of one head, columns [0, live): x = s + bias; s <- SiLU(x); backward also dw <- dw · SiLU'(x) and
 * drab += that. Columns [live, B) are masked to 0. */
static inline void fwd_f32(float *restrict s, const float *restrict bias, int B, int live) {
    int c = 0;
#if SIMD_W
    for (; c + SIMD_W <= live; c += SIMD_W) {
        const vf x = V_ADD(V_LOAD(s + c), V_LOAD(bias + c));
        V_STORE(s + c, V_MUL(x, v_sigmoid(x)));
    }
#endif
    for (; c < live; ++c) {
        float x = s[c] + bias[c];
        s[c] = x / (1.0f + exp_approx(-x));
    }
    for (c = live; c < B; ++c) s[c] = 0.0f;
}

static inline void bwd_f32(float *restrict s, float *restrict dw, const float *restrict bias, float *restrict drab,
                           int B, int live) {
    int c = 0;
#if SIMD_W
    for (; c + SIMD_W <= live; c += SIMD_W) {
        const vf x = V_ADD(V_LOAD(s + c), V_LOAD(bias + c));
        const vf sig = v_sigmoid(x);
        const vf one = V_SET1(1.0f);
        const vf ds = V_MUL(V_MUL(V_LOAD(dw + c), sig), V_FMA(x, V_SUB(one, sig), one));
        V_STORE(s + c, V_MUL(x, sig));
        V_STORE(dw + c, ds);
        V_STORE(drab + c, V_ADD(V_LOAD(drab + c), ds));
    }
#endif
    for (; c < live; ++c) {
        float x = s[c] + bias[c];
        float sig = 1.0f / (1.0f + exp_approx(-x));
        float ds = dw[c] * sig * (1.0f + x * (1.0f - sig));
        s[c] = x * sig;
        dw[c] = ds;
        drab[c] += ds;
    }
    for (c = live; c < B; ++c) s[c] = dw[c] = 0.0f;
}

static inline void fwd_bf16(uint16_t *restrict s, const float *restrict bias, int B, int live) {
    for (int c = 0; c < live; ++c) {
        float x = bf16_to_f32(s[c]) + bias[c];
        s[c] = f32_to_bf16(x / (1.0f + exp_approx(-x)));
    }
    for (int c = live; c < B; ++c) s[c] = 0;
}

static inline void bwd_bf16(uint16_t *restrict s, uint16_t *restrict dw, const float *restrict bias,
                            float *restrict drab, int B, int live) {
    for (int c = 0; c < live; ++c) {
        float x = bf16_to_f32(s[c]) + bias[c];
        float sig = 1.0f / (1.0f + exp_approx(-x));
        float ds = bf16_to_f32(dw[c]) * sig * (1.0f + x * (1.0f - sig));
        s[c] = f32_to_bf16(x * sig);
        dw[c] = f32_to_bf16(ds);
        drab[c] += ds;
    }
    for (int c = live; c < B; ++c) s[c] = dw[c] = 0;
}

/* dts[b[c]] += v[c] for c < n. Along a row the bucket ids come in runs (timestamps are sorted, and the buckets are
 * logarithmic), and adding into dts[b[c]] element by element makes every add wait for the previous one to the same
 * bin. Instead each run is found (16 uint8 ids per compare on x86), summed in registers 8 columns at a time,
 * and added to its bin once. Any order of ids gives the same sums (up to fp32 rounding order). */
static inline int run_i64(const int64_t *b, int c0, int n) { /* length of the run of b[c0] from c0 */
    int c = c0 + 1;
    while (c < n && b[c] == b[c0]) ++c;
    return c - c0;
}

static inline int run_u8(const uint8_t *b, int c0, int n) { /* the same, 16 ids per compare on x86 */
    const uint8_t id = b[c0];
    int c = c0 + 1;
#if defined(__SSE2__)
    const __m128i v = _mm_set1_epi8((char)id);
    for (; c + 16 <= n; c += 16) {
        const unsigned m = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(b + c)), v));
        if (m != 0xFFFFu) return c + __builtin_ctz(~m) - c0;
    }
#endif
    while (c < n && b[c] == id) ++c;
    return c - c0;
}

static inline float run_sum(const float *restrict v, int c, int e) { /* v[c] + ... + v[e - 1], 8 lanes */
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (; c + 8 <= e; c += 8)
        for (int j = 0; j < 8; ++j) acc[j] += v[c + j];
    float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; c < e; ++c) sum += v[c];
    return sum;
}

static void bucket_sums_i64(float *restrict dts, const int64_t *restrict b, const float *restrict v, int n) {
    for (int c = 0, e; c < n; c = e) {
        e = c + run_i64(b, c, n);
        dts[b[c]] += run_sum(v, c, e);
    }
}

static void bucket_sums_u8(float *restrict dts, const uint8_t *restrict b, const float *restrict v, int n) {
    for (int c = 0, e; c < n; c = e) {
        e = c + run_u8(b, c, n);
        dts[b[c]] += run_sum(v, c, e);
    }
}

/* One tile t of the chunk; bias and drab are B floats of scratch each. */
static void tile_rows(void *s, void *dw, int dtype, int64_t t, int H, int B, const float *pos, const void *bucket,
                      int bucket_dtype, const float *ts, int diag, float *dpos, float *dts, float *bias, float *drab) {
    const int64_t tile = (int64_t)B * B;
    for (int r = 0; r < B; ++r) {
        const int live = diag ? r + 1 : B;
        const int64_t row_off = t * tile + (int64_t)r * B;
        bias_row(bias, B, r, pos, bucket, bucket_dtype, row_off, ts);
        if (dw) memset(drab, 0, sizeof(float) * B);
        for (int h = 0; h < H; ++h) {
            const int64_t off = (t * H + h) * tile + (int64_t)r * B;
            if (!dw && dtype == 0)
                fwd_f32((float *)s + off, bias, B, live);
            else if (!dw)
                fwd_bf16((uint16_t *)s + off, bias, B, live);
            else if (dtype == 0)
                bwd_f32((float *)s + off, (float *)dw + off, bias, drab, B, live);
            else
                bwd_bf16((uint16_t *)s + off, (uint16_t *)dw + off, bias, drab, B, live);
        }
        if (!dw) continue;
        if (dpos) {
            float *dp = dpos + (int64_t)r * B;
            for (int c = 0; c < live; ++c) dp[c] += drab[c];
        }
        if (dts && bucket) {
            if (bucket_dtype == 0)
                bucket_sums_i64(dts, (const int64_t *)bucket + row_off, drab, live);
            else
                bucket_sums_u8(dts, (const uint8_t *)bucket + row_off, drab, live);
        }
    }
}

/* Shared body of forward (dw == NULL) and backward. Built with -fopenmp, the tiles are split across the OpenMP
 * threads of the process (torch's own pool: torch ships libgomp.so.1, so this library binds to the copy already
 * loaded), each thread summing the bias gradients privately; without OpenMP the pragmas are ignored. */
static void tiles(void *s, void *dw, int dtype, int64_t C, int H, int B, const float *pos, const void *bucket,
                  int bucket_dtype, const float *ts, int nts, int diag, float *dpos, float *dts) {
    const int parallel = (int64_t)C * H * B * B >= (1 << 15) && C > 1;
#pragma omp parallel if (parallel)
    {
        int nth = 1;
#ifdef _OPENMP
        nth = omp_get_num_threads();
#endif
        float *scratch = (float *)malloc(sizeof(float) * 2 * (size_t)B);
        const int private_sums = dw != NULL && nth > 1;
        float *my_dpos = dpos, *my_dts = dts;
        if (private_sums) {
            my_dpos = dpos ? (float *)calloc((size_t)B * B, sizeof(float)) : NULL;
            my_dts = dts ? (float *)calloc((size_t)nts, sizeof(float)) : NULL;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < C; ++t)
            tile_rows(s, dw, dtype, t, H, B, pos, bucket, bucket_dtype, ts, diag, my_dpos, my_dts, scratch,
                      scratch + B);
        if (private_sums) {
#pragma omp critical
            {
                if (dpos)
                    for (int64_t i = 0; i < (int64_t)B * B; ++i) dpos[i] += my_dpos[i];
                if (dts)
                    for (int i = 0; i < nts; ++i) dts[i] += my_dts[i];
            }
            free(my_dpos);
            free(my_dts);
        }
        free(scratch);
    }
}

/* Forward (a->dw == NULL) or backward of one chunk of tiles. */
void genrec_tile_pass(const genrec_tile_args *a) {
    tiles(a->s, a->dw, a->dtype, a->C, a->H, a->B, a->pos, a->bucket, a->bucket_dtype, a->ts, a->nts, a->diag,
          a->dw ? a->dpos : NULL, a->dw ? a->dts : NULL);
}

/* ------------------------------------------------------------------------------------------------------------------
 * Dropout with a counter-based random stream (genrec/ops/dropout.py).
 *
 *   out[i] = x[i] · keep(i) / (1 - p),   keep(i) = [u(seed, i) >= p],   u = top 24 bits of splitmix64(seed, i) / 2^24
 *
 * u(seed, i) depends only on the seed and the index, like the Philox streams of GPU dropout, so the backward pass
 * regenerates the same mask from the seed instead of storing it, every element is independent of the thread that
 * computes it (the result does not depend on the thread count), and the loop vectorises. torch's CPU bernoulli_
 * draws every element serially from one Mersenne Twister. genrec/ops/dropout.py computes the same bits with PyTorch
 * tensor operations where this kernel is not available: keep the two in step.
 * p is resolved to 2^-24.
 * ---------------------------------------------------------------------------------------------------------------- */

static inline uint32_t uniform24(uint64_t seed, uint64_t i) { /* splitmix64 of the i-th counter value */
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (uint32_t)(z >> 40);
}

/* x and y [n] do not overlap. dtype 0: fp32, 1: bf16. */
void genrec_dropout(const genrec_dropout_args *a) {
    const void *x = a->x;
    void *y = a->y;
    const int64_t n = a->n;
    const float p = a->p;
    const uint64_t seed = a->seed;
    const uint32_t threshold = (uint32_t)(p * 16777216.0f + 0.5f);
    const float scale = 1.0f / (1.0f - p);
    if (a->dtype == 0) {
        const float *restrict xf = (const float *)x;
        float *restrict yf = (float *)y;
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
        for (int64_t i = 0; i < n; ++i) yf[i] = xf[i] * (uniform24(seed, (uint64_t)i) >= threshold ? scale : 0.0f);
    } else if (a->dtype == 1) {
        const uint16_t *restrict xb = (const uint16_t *)x;
        uint16_t *restrict yb = (uint16_t *)y;
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
        for (int64_t i = 0; i < n; ++i)
            yb[i] = f32_to_bf16(bf16_to_f32(xb[i]) * (uniform24(seed, (uint64_t)i) >= threshold ? scale : 0.0f));
    }
}

/* ------------------------------------------------------------------------------------------------------------------
 * Time-bucket ids of the attention tiles (genrec/ops/hstu_attention.py, TileBuckets), in one call:
 *
 *   out[i, r, k] = clamp(floor(log(max(|qt[r] - t[k]|, 1)) / 0.301), 0, nb)    (nb + 1 where the row has no time)
 *
 * for tile i = (query block qi[i], key block ki[i]): qt = slot_qt[qi[i]], t = slot_t[ki[i]] ([B] int64 each: query
 * time of each query slot, timestamp of each key slot); out [n, B, B] int64 or uint8 (out_dtype 0 / 1). The gap is
 * rounded to fp32 and log evaluated in fp32 with a Cephes polynomial (within an ulp or so of libm), as
 * genrec.ops.hstu_math.time_buckets does with torch's fp32 log: the ids agree except for gaps whose log / 0.301 lies
 * within an ulp of an integer, where even torch's vectorised and scalar logs can disagree. Most rows take the
 * equivalent threshold count of bucket_row instead of a log per pair (a few integer compares per pair).
 * ---------------------------------------------------------------------------------------------------------------- */

static inline float log_approx(float x) { /* x >= 1, finite */
    bits32 b;
    b.f = x;
    int e = (int)((b.u >> 23) & 0xFFu) - 127;
    b.u = (b.u & 0x007FFFFFu) | 0x3F800000u; /* mantissa in [1, 2) */
    float m = b.f;
    const int big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    e += big;
    const float z = m - 1.0f, zz = z * z;
    float y = 7.0376836292e-2f;
    y = y * z - 1.1514610310e-1f;
    y = y * z + 1.1676998740e-1f;
    y = y * z - 1.2420140846e-1f;
    y = y * z + 1.4249322787e-1f;
    y = y * z - 1.6668057665e-1f;
    y = y * z + 2.0000714765e-1f;
    y = y * z - 2.4999993993e-1f;
    y = y * z + 3.3333331174e-1f;
    y = y * z * zz;
    const float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * zz;
    return z + y + 0.693359375f * fe;
}

/* f(g) = floor(log(g) / 0.301) in fp32 as below, unclamped, for a gap g >= 1. */
static inline int bucket_of(int64_t g) { return (int)__builtin_floorf(log_approx((float)g) / 0.301f); }

/* thr[b] = the smallest gap g >= 1 with bucket_of(g) >= b, b = 0 .. nb (INT64_MAX when no gap reaches b). bucket_of
 * is non-decreasing in g (int64 -> fp32 rounding is monotone, and log_approx was checked to be non-decreasing over
 * every fp32 value from 1 to 9.2e18), so bucket_of(g) = #{b >= 1 : g >= thr[b]} exactly. */
static void bucket_thresholds(int64_t *thr, int nb) {
    thr[0] = 1;
    for (int b = 1; b <= nb; ++b) {
        int64_t lo = thr[b - 1], hi = (int64_t)1 << 62;
        if (bucket_of(hi) < b) {
            for (; b <= nb; ++b) thr[b] = INT64_MAX;
            return;
        }
        while (lo < hi) { /* smallest g in [lo, hi] with bucket_of(g) >= b */
            const int64_t mid = lo + (hi - lo) / 2;
            if (bucket_of(mid) >= b)
                hi = mid;
            else
                lo = mid + 1;
        }
        thr[b] = lo;
    }
}

/* The ids of one tile row: ids[k] for the B keys tk against query time q (timed) or nb + 1 (not timed). The gaps
 * of one row usually span a few buckets (a tile's keys are close to each other, far from most queries): then each
 * id is the lowest bucket plus the count of the thresholds above it that the gap reaches, a few integer compares
 * instead of a log per pair; rows spanning more than 16 buckets take the log. gap[B] is scratch. */
static inline void bucket_row(int32_t *restrict ids, int64_t *restrict gap, int64_t q, const int64_t *restrict tk,
                              int B, int nb, int timed, const int64_t *restrict thr) {
    if (!timed) {
        for (int k = 0; k < B; ++k) ids[k] = nb + 1;
        return;
    }
    int64_t gmin = INT64_MAX, gmax = 1;
    for (int k = 0; k < B; ++k) {
        int64_t g = q - tk[k];
        g = g < 0 ? -g : g;
        g = g < 1 ? 1 : g;
        gap[k] = g;
        gmin = g < gmin ? g : gmin;
        gmax = g > gmax ? g : gmax;
    }
    int lo = bucket_of(gmin), hi = bucket_of(gmax);
    lo = lo < 0 ? 0 : (lo > nb ? nb : lo);
    hi = hi < 0 ? 0 : (hi > nb ? nb : hi);
    if (hi - lo <= 16) {
        for (int k = 0; k < B; ++k) ids[k] = lo;
        for (int b = lo + 1; b <= hi; ++b) {
            const int64_t t = thr[b];
            for (int k = 0; k < B; ++k) ids[k] += gap[k] >= t;
        }
        return;
    }
    for (int k = 0; k < B; ++k) {
        float y = __builtin_floorf(log_approx((float)gap[k]) / 0.301f);
        y = y < 0.0f ? 0.0f : (y > (float)nb ? (float)nb : y);
        ids[k] = (int32_t)y;
    }
}

static inline void store_ids(void *out, int out_dtype, int64_t off, const int32_t *ids, int B) {
    if (out_dtype == 0) {
        int64_t *o = (int64_t *)out + off;
        for (int k = 0; k < B; ++k) o[k] = ids[k];
    } else {
        uint8_t *o = (uint8_t *)out + off;
        for (int k = 0; k < B; ++k) o[k] = (uint8_t)ids[k];
    }
}

/* Tile i pairs query block qi[i] (query times slot_qt[qi[i]], timed[qi[i]]) with key block ki[i] (timestamps
 * slot_t[ki[i]]); out [n, B, B]. One call for a whole layout; returns 1 when scratch could not be allocated. */
int genrec_time_buckets_tiles(const genrec_bucket_args *a) {
    const int64_t *slot_qt = a->slot_qt, *slot_t = a->slot_t, *qi = a->qi, *ki = a->ki;
    const uint8_t *timed = a->timed;
    const int64_t n = a->n;
    const int B = a->B, nb = a->nb, out_dtype = a->out_dtype;
    void *out = a->out;
    const int64_t tile = (int64_t)B * B;
    int64_t *thr = (int64_t *)malloc(sizeof(int64_t) * ((size_t)nb + 1));
    if (!thr) return 1;
    bucket_thresholds(thr, nb);
    int failed = 0;
#pragma omp parallel if (n * tile >= (1 << 16))
    {
        int32_t *ids = (int32_t *)malloc(sizeof(int32_t) * (size_t)B);
        int64_t *gap = (int64_t *)malloc(sizeof(int64_t) * (size_t)B);
        if (!ids || !gap) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i)
            for (int r = 0; r < B && ids && gap; ++r) {
                bucket_row(ids, gap, slot_qt[qi[i] * B + r], slot_t + ki[i] * B, B, nb, timed[qi[i]], thr);
                store_ids(out, out_dtype, i * tile + (int64_t)r * B, ids, B);
            }
        free(ids);
        free(gap);
    }
    free(thr);
    return failed;
}

/* ------------------------------------------------------------------------------------------------------------------
 * The whole fp32 blocked attention, forward and backward, tile loop included (genrec/ops/hstu_attention.py,
 * ``_BlockedAttention`` with ``_Tiles.loop``).
 *
 * The Python engine runs each chunk of tiles as ~10 ATen calls (batched matmuls, the elementwise kernel above, row
 * slices and accumulations). Here the same tiles run in one C call per pass, with the matrix products done by the
 * BLAS sgemm that PyTorch itself uses (its address is handed over by genrec/ops/native.py; MKL in the x86 wheels).
 * What that allows beyond dropping the per-call overhead:
 *   - diagonal tiles run in row panels of ``panel`` rows, each against the key columns up to its last row only, so
 *     the masked upper half of a diagonal tile is (mostly) not computed: at one 4096 sequence in blocks of 256 that
 *     half is 6% of all tile products;
 *   - the position bias is read from the weight vector itself (pos_w[δ·B + r - c], clamped to [0, P - 1] like the
 *     Python engine's offsets), and its gradient added straight into a [P] vector: no [nδ, B, B] tiles;
 *   - one head at a time per tile (its scores stay in L2 between the products), the bias rows built once per tile;
 *   - the normaliser is the products' alpha: no divided copy of the output gradient;
 *   - tiles run grouped by key block, K / V / dK / dV of the group stay in cache. The OpenMP threads split the heads
 *     when they divide evenly, else the groups (the query-side sums out / dQ are then kept per thread); the bias
 *     gradients are kept per thread and added at the end.
 *
 * Layout: block b's head h, row r starts at element qbase[b] + h·qhs + r·qrs of q, k, dq, dk and vbase[b] + h·vhs
 * + r·vrs of v, go, out, dv (fp32): the engine's [nblk, H, B, d] blocks, or a padded [batch, H, N, d] batch read in
 * place. norm [nblk]: each block's normaliser (out = Σ w·v / norm; go is dL/d(out)). Tile t is (query block qi[t],
 * key block ki[t]), δ = block distance; tiles of key block group g are gstart[g] .. gstart[g+1]-1.
 * bucket[t]: address of tile t's [B, B] time-bucket ids (bucket_dtype 0: int64, 1: uint8) or 0 (no time term);
 * pos: pos_w [P] or NULL; ts [nts] (last entry 0: rows without time).
 * ---------------------------------------------------------------------------------------------------------------- */

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
static sgemm_fn g_sgemm = NULL;

/* Set the sgemm to use, after checking it on one small product (column-major C[2x2] = A[2x3] B[3x2]); returns
 * whether it is set. */
int genrec_set_sgemm(void *fn) {
    g_sgemm = NULL;
    if (!fn) return 0;
    const sgemm_fn f = (sgemm_fn)fn;
    /* A = [[1 3 5] [2 4 6]], B = [[1 2] [0 1] [-1 0]] stored by columns; A B = [[-4 5] [-4 8]] */
    const float A[6] = {1, 2, 3, 4, 5, 6}, B[6] = {1, 0, -1, 2, 1, 0};
    float C[4] = {0, 0, 0, 0};
    const int m = 2, n = 2, k = 3;
    const float one = 1.0f, zero = 0.0f;
    f("N", "N", &m, &n, &k, &one, A, &m, B, &k, &zero, C, &m);
    if (C[0] != -4.0f || C[1] != -4.0f || C[2] != 5.0f || C[3] != 8.0f) return 0;
    g_sgemm = f;
    return 1;
}

/* Row-major C[M, N] = alpha · op(A) op(B) + beta · C (op = transpose when ta / tb): the column-major sgemm computes
 * Cᵀ = op(B)ᵀ op(A)ᵀ on the same memory. */
static void mm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
               float beta, float *C, int ldc) {
    const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N';
    g_sgemm(&a, &b, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

typedef genrec_attn_args attn_args;

/* bias[c] = pos[clamp(base - c)] + ts[bucket row[c]] for c < n */
static void bias_row2(float *restrict bias, int n, int64_t base, const float *pos, int P, const void *brow, int bdt,
                      const float *ts) {
    if (pos && base < P && base - (n - 1) >= 0) {
        const float *p = pos + base;
        for (int c = 0; c < n; ++c) bias[c] = p[-c];
    } else {
        for (int c = 0; c < n; ++c) {
            int64_t o = base - c;
            o = o < 0 ? 0 : (o >= P ? P - 1 : o);
            bias[c] = pos ? pos[o] : 0.0f;
        }
    }
    if (!brow) return;
    if (bdt == 1) { /* uint8 ids come in runs along a row: one weight per run, added without a gather */
        const uint8_t *b = (const uint8_t *)brow;
        for (int c = 0, e; c < n; c = e) {
            e = c + run_u8(b, c, n);
            const float w = ts[b[c]];
            for (int k = c; k < e; ++k) bias[k] += w;
        }
    } else {
        add_time_bias(bias, n, brow, bdt, ts);
    }
}

static void dpos_row(float *restrict dpos, int n, int64_t base, int P, const float *restrict drab) {
    if (base < P && base - (n - 1) >= 0) {
        float *p = dpos + base;
        for (int c = 0; c < n; ++c) p[-c] += drab[c];
    } else {
        for (int c = 0; c < n; ++c) {
            int64_t o = base - c;
            o = o < 0 ? 0 : (o >= P ? P - 1 : o);
            dpos[o] += drab[c];
        }
    }
}

/* One pass over all tiles. Forward (dq == NULL): out[qi] += w · v. Backward: dv[ki] += wᵀ go, dq[qi] += ds k,
 * dk[ki] += dsᵀ q, and the bias gradients. */
static int attn_pass(const attn_args *a, float *out, float *dq, float *dk, float *dv, float *dpos, float *dts) {
    const int H = a->H, B = a->B, dkd = a->dim_qk, dvd = a->dim_v;
    const int64_t qsz = a->qnumel, osz = a->vnumel, qhs = a->qhs, vhs = a->vhs;
    const int qrs = (int)a->qrs, vrs = (int)a->vrs;
    const int bwd = dq != NULL;
    int failed = 0; /* a thread could not allocate its buffers: the caller raises MemoryError */
    int64_t next_group = 0;
    int nmax = 1;
#ifdef _OPENMP
    nmax = omp_get_max_threads();
#endif
    float **qbufs = (float **)calloc((size_t)nmax, sizeof(float *)); /* each thread's private out / dq sums */
    if (!qbufs) return 1;
#pragma omp parallel if (a->ngroups > 1 || H > 1)
    {
        int nth = 1, tid = 0;
#ifdef _OPENMP
        nth = omp_get_num_threads();
        tid = omp_get_thread_num();
#endif
        /* Threads split the heads when every thread gets the same number of them (each thread then owns its heads'
         * rows of out / dq / dk / dv and runs every tile), else the key-block groups (each thread then sums its
         * out / dq privately; at the end every thread adds one slice of all of them). The bias gradients are per
         * thread either way. */
        const int by_heads = nth > 1 && H % nth == 0;
        const int h0 = by_heads ? tid : 0, hstep = by_heads ? nth : 1;
        const int priv_q = nth > 1 && !by_heads, priv = nth > 1;
        float *my_q = bwd ? dq : out; /* query-side sum: out (forward) or dq (backward) */
        float *my_dpos = dpos, *my_dts = dts;
        if (priv_q) {
            my_q = (float *)calloc((size_t)(bwd ? qsz : osz), sizeof(float));
            qbufs[tid] = my_q;
        }
        if (priv) {
            my_dpos = dpos ? (float *)calloc((size_t)a->P, sizeof(float)) : NULL;
            my_dts = dts ? (float *)calloc((size_t)a->nts, sizeof(float)) : NULL;
        }
        /* one head's scores and dL/dw (S, DW), and the tile's bias and bias gradient (BT, DR), B x B each */
        float *S = (float *)malloc(sizeof(float) * 4 * (size_t)B * B);
        float *DW = S + (size_t)B * B, *BT = DW + (size_t)B * B, *DR = BT + (size_t)B * B;
        const int ok = S && my_q && (my_dpos || !dpos) && (my_dts || !dts);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t mine = 0;; ++mine) {
            int64_t g = mine; /* by heads: every group in turn; by groups: the next one nobody took */
            if (!by_heads) {
#pragma omp atomic capture
                g = next_group++;
            }
            if (g >= a->ngroups || !ok) break;
            for (int64_t t = a->gstart[g]; t < a->gstart[g + 1]; ++t) {
                const int64_t qb = a->qi[t], kb = a->ki[t], delta = a->delta[t];
                const int diag = delta == 0;
                const int step = diag ? a->panel : B;
                const float inv_norm = 1.0f / a->norm[qb]; /* the tile's sequence's normaliser */
                const void *btile = a->bucket ? (const void *)(intptr_t)a->bucket[t] : NULL;
                for (int r0 = 0; r0 < B; r0 += step) {
                    const int r1 = r0 + step < B ? r0 + step : B, nr = r1 - r0;
                    const int c1 = diag ? r1 : B; /* key columns this panel needs */
                    for (int r = r0; r < r1; ++r) { /* the bias rows, shared by the heads */
                        const int live = diag ? r + 1 : c1;
                        const void *brow = NULL;
                        if (btile)
                            brow = a->bucket_dtype == 0 ? (const void *)((const int64_t *)btile + (int64_t)r * B)
                                                        : (const void *)((const uint8_t *)btile + (int64_t)r * B);
                        bias_row2(BT + (int64_t)r * B, live, delta * B + r, a->pos, a->P, brow, a->bucket_dtype,
                                  a->ts);
                        if (bwd) memset(DR + (int64_t)r * B, 0, sizeof(float) * (size_t)live);
                    }
                    for (int h = h0; h < H; h += hstep) {
                        /* one head at a time: its [panel, B] scores stay in L2 between the products */
                        const int64_t qo = a->qbase[qb] + h * qhs + (int64_t)r0 * qrs, ko = a->qbase[kb] + h * qhs;
                        const int64_t go_ = a->vbase[qb] + h * vhs + (int64_t)r0 * vrs, vo = a->vbase[kb] + h * vhs;
                        const float *Q = a->q + qo, *K = a->k + ko, *V = a->v + vo;
                        float *Sh = S + (int64_t)r0 * B, *DS = DW + (int64_t)r0 * B;
                        mm(0, 1, nr, c1, dkd, 1.0f, Q, qrs, K, qrs, 0.0f, Sh, B);
                        if (!bwd) {
                            for (int r = r0; r < r1; ++r)
                                fwd_f32(S + (int64_t)r * B, BT + (int64_t)r * B, c1, diag ? r + 1 : c1);
                            mm(0, 0, nr, dvd, c1, inv_norm, Sh, B, V, vrs, 1.0f, my_q + go_, vrs);
                            continue;
                        }
                        const float *G = a->go + go_;
                        mm(0, 1, nr, c1, dvd, inv_norm, G, vrs, V, vrs, 0.0f, DS, B);
                        for (int r = r0; r < r1; ++r) {
                            const int64_t o = (int64_t)r * B;
                            bwd_f32(S + o, DW + o, BT + o, DR + o, c1, diag ? r + 1 : c1);
                        }
                        mm(1, 0, c1, dvd, nr, inv_norm, Sh, B, G, vrs, 1.0f, dv + vo, vrs);
                        mm(0, 0, nr, dkd, c1, 1.0f, DS, B, K, qrs, 1.0f, my_q + qo, qrs);
                        mm(1, 0, c1, dkd, nr, 1.0f, DS, B, Q, qrs, 1.0f, dk + ko, qrs);
                    }
                    if (!bwd) continue;
                    for (int r = r0; r < r1; ++r) { /* the bias gradients of the panel's rows */
                        const int live = diag ? r + 1 : c1;
                        const float *drab = DR + (int64_t)r * B;
                        if (my_dpos) dpos_row(my_dpos, live, delta * B + r, a->P, drab);
                        if (my_dts && btile) {
                            if (a->bucket_dtype == 0)
                                bucket_sums_i64(my_dts, (const int64_t *)btile + (int64_t)r * B, drab, live);
                            else
                                bucket_sums_u8(my_dts, (const uint8_t *)btile + (int64_t)r * B, drab, live);
                        }
                    }
                }
            }
        }
#pragma omp barrier
        int any_failed;
#pragma omp atomic read
        any_failed = failed;
        if (priv_q && !any_failed) { /* this thread's slice of out / dq, summed over every thread's buffer */
            float *dst = bwd ? dq : out;
            const int64_t n = bwd ? qsz : osz, lo = n * tid / nth, hi = n * (tid + 1) / nth;
            for (int t = 0; t < nth; ++t) {
                const float *src = qbufs[t];
                for (int64_t i = lo; i < hi; ++i) dst[i] += src[i];
            }
        }
        if (priv && ok) {
#pragma omp critical
            {
                if (dpos)
                    for (int i = 0; i < a->P; ++i) dpos[i] += my_dpos[i];
                if (dts)
                    for (int i = 0; i < a->nts; ++i) dts[i] += my_dts[i];
            }
        }
#pragma omp barrier /* no buffer is freed while another thread still reads it */
        if (priv_q) free(my_q);
        if (priv) {
            free(my_dpos);
            free(my_dts);
        }
        free(S);
    }
    free(qbufs);
    return failed;
}

/* Both return 0, or 1 when a thread could not allocate its buffers (the results are then incomplete). Forward
 * reads q, k, v, norm and adds into out; backward reads q, k, v, norm, go and adds into dq, dk, dv, dpos, dts. */
int genrec_attn_forward(const genrec_attn_args *a) { return attn_pass(a, a->out, NULL, NULL, NULL, NULL, NULL); }

int genrec_attn_backward(const genrec_attn_args *a) {
    return attn_pass(a, NULL, a->dq, a->dk, a->dv, a->dpos, a->dts);
}
