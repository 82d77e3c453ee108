/* The SI MLP of SPEC §3, trained on the sphere, one model at a time with everything in cache.
 *
 * Compiled at first use by native.py, once per precision (-DREAL=float or double), for the
 * machine it runs on (-march=native). Python threads call it on disjoint ranges of models.
 *
 * Why C: a grid step is thousands of 16x32x32 matrix products; as batched library calls
 * each one streams its model's weights through memory and pays a call's overhead. Here a
 * model runs a whole segment of steps while its weights (8 KB), gradients and activations
 * stay in L1, and every product is a register-blocked loop the compiler vectorizes.
 *
 * Layout: activations are feature-major, one vector of LANES (16, 8 or 4) samples per feature
 * (a[f][v], v = sample vector), so LayerNorm statistics, the loss and the element-wise
 * work are vertical vector ops. Weight gradients contract over samples, so they use a
 * sample-major copy of each layer input (x rows as stored; hidden activations transposed).
 * Weights are [out][in] row-major, as torch stores them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <tgmath.h> /* sqrt, exp, ... in the precision of REAL */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
/* Flush denormals to zero while the kernel runs. A converged model's gradients are ~1e-26 and
 * their squares underflow: denormal arithmetic is ~100x slower on x86, and values below
 * 1e-38 are far beneath what a unit-norm float32 weight can register anyway. */
#define FAST_FLOATS_BEGIN const unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define FAST_FLOATS_END _mm_setcsr(saved_csr);
#else
#define FAST_FLOATS_BEGIN
#define FAST_FLOATS_END
#endif

#ifndef REAL
#define REAL float
#endif
/* A vec is one hardware register of samples: 64 bytes with AVX-512, else 32 (AVX2; two NEON
 * registers). GCC lowers arrays of wider vectors through the stack: 4-5x slower on AVX2. */
#ifndef VECTOR_BYTES /* -DVECTOR_BYTES=64 on AVX2 tests the AVX-512 layout (slowly) */
#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#else
#define VECTOR_BYTES 32
#endif
#endif
#define BYTES_float 4
#define BYTES_double 8
#define CAT(a, b) a##b
#define XCAT(a, b) CAT(a, b)
#define LANES (VECTOR_BYTES / XCAT(BYTES_, REAL)) /* a preprocessor constant: 16, 8 or 4 */
typedef REAL vec __attribute__((vector_size(LANES * sizeof(REAL))));
typedef __typeof__((vec){0} < (vec){0}) mask; /* lane-wise comparison results */
#define ALIGN 128

typedef struct {
    int64_t depth, in_dim, width, nv; /* nv: sample vectors per pass */
} Shape;

static int64_t num_weights(const Shape *s) { return s->width * s->in_dim + (s->depth - 1) * s->width * s->width; }

static int64_t layer_offset(const Shape *s, int64_t layer) {
    return layer == 0 ? 0 : s->width * s->in_dim + (layer - 1) * s->width * s->width;
}

/* Register blocking, fitted to the register file: a block of RB output rows by VB sample
 * vectors keeps RB * VB independent FMA chains in registers, enough to hide the FMA latency;
 * 32 registers (AVX-512) hold 8 x 2 accumulators, 16 (AVX2) hold 4 x 2 plus the inputs. */
#if VECTOR_BYTES == 64
#define RB 8
#else
#define RB 4
#endif
#define VB 2

/* out[o][v] = sum_i w[o][i] in[i][v], RB output rows by VB sample vectors at a time:
 * each weight loaded once for VB vectors, each input vector once for RB rows. */
static void layer_forward(const REAL *restrict w, int64_t rows, int64_t cols, const vec *restrict in,
                          vec *restrict out, int64_t nv) {
    int64_t v = 0;
    for (; v + VB <= nv; v += VB)
        for (int64_t o = 0; o < rows; o += RB) { /* rows: a multiple of LANES */
            vec acc[VB][RB] = {{{0}}};
            for (int64_t i = 0; i < cols; i++) {
                vec x[VB];
#pragma GCC unroll 2
                for (int b = 0; b < VB; b++) x[b] = in[i * nv + v + b];
#pragma GCC unroll 8
                for (int r = 0; r < RB; r++) {
                    const REAL weight = w[(o + r) * cols + i];
#pragma GCC unroll 2
                    for (int b = 0; b < VB; b++) acc[b][r] += weight * x[b];
                }
            }
#pragma GCC unroll 8
            for (int r = 0; r < RB; r++)
#pragma GCC unroll 2
                for (int b = 0; b < VB; b++) out[(o + r) * nv + v + b] = acc[b][r];
        }
    for (; v < nv; v++)
        for (int64_t o = 0; o < rows; o += RB) {
            vec acc[RB] = {0};
            for (int64_t i = 0; i < cols; i++) {
                const vec x = in[i * nv + v];
#pragma GCC unroll 8
                for (int r = 0; r < RB; r++) acc[r] += w[(o + r) * cols + i] * x;
            }
#pragma GCC unroll 8
            for (int r = 0; r < RB; r++) out[(o + r) * nv + v] = acc[r];
        }
}

/* din[i][v] = sum_o w[o][i] d[o][v] (the gradient w.r.t. the layer input), RB inputs by
 * VB sample vectors at a time (cols: a multiple of LANES, so of RB). */
static void layer_input_grad(const REAL *restrict w, int64_t rows, int64_t cols, const vec *restrict d,
                             vec *restrict din, int64_t nv) {
    int64_t v = 0;
    for (; v + VB <= nv; v += VB)
        for (int64_t i = 0; i < cols; i += RB) {
            vec acc[VB][RB] = {{{0}}};
            for (int64_t o = 0; o < rows; o++) {
                vec g[VB];
#pragma GCC unroll 2
                for (int b = 0; b < VB; b++) g[b] = d[o * nv + v + b];
#pragma GCC unroll 8
                for (int r = 0; r < RB; r++) {
                    const REAL weight = w[o * cols + i + r];
#pragma GCC unroll 2
                    for (int b = 0; b < VB; b++) acc[b][r] += weight * g[b];
                }
            }
#pragma GCC unroll 8
            for (int r = 0; r < RB; r++)
#pragma GCC unroll 2
                for (int b = 0; b < VB; b++) din[(i + r) * nv + v + b] = acc[b][r];
        }
    for (; v < nv; v++)
        for (int64_t i = 0; i < cols; i += RB) {
            vec acc[RB] = {0};
            for (int64_t o = 0; o < rows; o++) {
                const vec g = d[o * nv + v];
#pragma GCC unroll 8
                for (int r = 0; r < RB; r++) acc[r] += w[o * cols + i + r] * g;
            }
#pragma GCC unroll 8
            for (int r = 0; r < RB; r++) din[(i + r) * nv + v] = acc[r];
        }
}

/* g[o][:] = sum_n d[o][n] in_rows[n][:] (rows a multiple of RB, cols of LANES); d is
 * feature-major, i.e. a [rows][samples] matrix. Blocks of RB rows by VB vectors of columns
 * (RB * VB FMA chains: a sum over only 16 samples is too short to hide the FMA latency with
 * fewer). Returns the lanes of sum(g^2), so the gradient norm needs no second pass. */
static vec layer_weight_grad(const vec *restrict d, const REAL *const *restrict in_rows, int64_t rows,
                             int64_t cols, int64_t samples, REAL *restrict g) {
    const REAL *ds = (const REAL *)d;
    vec squares = {0};
    for (int64_t o = 0; o < rows; o += RB) {
        int64_t c = 0;
        for (; c + VB * LANES <= cols; c += VB * LANES) {
            vec acc[RB][VB] = {{{0}}};
            for (int64_t n = 0; n < samples; n++) {
                vec x[VB]; /* rows need not be vector-aligned */
#pragma GCC unroll 2
                for (int b = 0; b < VB; b++) memcpy(&x[b], in_rows[n] + c + b * LANES, sizeof x[b]);
#pragma GCC unroll 8
                for (int r = 0; r < RB; r++) {
                    const REAL scale = ds[(o + r) * samples + n];
#pragma GCC unroll 2
                    for (int b = 0; b < VB; b++) acc[r][b] += scale * x[b];
                }
            }
#pragma GCC unroll 8
            for (int r = 0; r < RB; r++)
#pragma GCC unroll 2
                for (int b = 0; b < VB; b++) {
                    memcpy(g + (o + r) * cols + c + b * LANES, &acc[r][b], sizeof(vec));
                    squares += acc[r][b] * acc[r][b];
                }
        }
        for (; c < cols; c += LANES) {
            vec acc[RB] = {0};
            for (int64_t n = 0; n < samples; n++) {
                vec x;
                memcpy(&x, in_rows[n] + c, sizeof x);
#pragma GCC unroll 8
                for (int r = 0; r < RB; r++) acc[r] += ds[(o + r) * samples + n] * x;
            }
#pragma GCC unroll 8
            for (int r = 0; r < RB; r++) {
                memcpy(g + (o + r) * cols + c, &acc[r], sizeof acc[r]);
                squares += acc[r] * acc[r];
            }
        }
    }
    return squares;
}

/* sum_f a[f][v] (and sum_f a[f][v] b[f][v] when b is given), with four partial sums:
 * one running sum would wait on the adder's latency at every feature. */
static vec feature_sum(const vec *restrict a, const vec *restrict b, int64_t features, int64_t nv, int64_t v) {
    vec acc[4] = {0};
    int64_t f = 0;
    for (; f + 4 <= features; f += 4)
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) acc[r] += b ? a[(f + r) * nv + v] * b[(f + r) * nv + v] : a[(f + r) * nv + v];
    for (; f < features; f++) acc[0] += b ? a[f * nv + v] * b[f * nv + v] : a[f * nv + v];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* max(z, 0), lane-wise; NaN propagates (a diverged model stays diverged), as in torch.relu. */
static vec relu(vec z) { return (vec)((mask)z & ~(z < 0)); }

/* LayerNorm (no affine) over features, then ReLU; keeps the normalized values and 1/std. */
static void norm_relu(vec *restrict pre, int64_t features, REAL eps, vec *restrict normed,
                      vec *restrict act, vec *restrict rstd, int64_t nv) {
    const REAL inv = (REAL)1 / (REAL)features;
    for (int64_t v = 0; v < nv; v++) {
        const vec mean = feature_sum(pre, NULL, features, nv, v) * inv;
        for (int64_t f = 0; f < features; f++) pre[f * nv + v] -= mean;
        vec var = feature_sum(pre, pre, features, nv, v) * inv + eps;
        REAL lanes[LANES]; /* a plain array loop, so the compiler vectorizes sqrt and division */
        memcpy(lanes, &var, sizeof var);
        for (int k = 0; k < LANES; k++) lanes[k] = (REAL)1 / sqrt(lanes[k]);
        vec r;
        memcpy(&r, lanes, sizeof r);
        rstd[v] = r;
        for (int64_t f = 0; f < features; f++) {
            vec z = pre[f * nv + v] * r;
            normed[f * nv + v] = z;
            act[f * nv + v] = relu(z);
        }
    }
}

/* Through the ReLU (zero where its output is not positive) and the LayerNorm, in place. */
static void norm_relu_backward(vec *restrict d, const vec *restrict normed, const vec *restrict rstd,
                               int64_t features, int64_t nv) {
    const REAL inv = (REAL)1 / (REAL)features;
    for (int64_t v = 0; v < nv; v++) {
        for (int64_t f = 0; f < features; f++)
            d[f * nv + v] = (vec)((mask)d[f * nv + v] & (normed[f * nv + v] > 0));
        const vec mean_d = feature_sum(d, NULL, features, nv, v) * inv;
        const vec mean_dz = feature_sum(d, normed, features, nv, v) * inv;
        for (int64_t f = 0; f < features; f++)
            d[f * nv + v] = rstd[v] * (d[f * nv + v] - mean_d - normed[f * nv + v] * mean_dz);
    }
}

/* Two-source lane shuffles: GCC and clang spell them differently. */
#define SEQ(...) __VA_ARGS__ /* a comma-separated lane list passed as one macro argument */
#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef __typeof__(_Generic((REAL)0, float: (int32_t)0, default: (int64_t)0)) lane_index;
typedef lane_index lane_indices __attribute__((vector_size(LANES * sizeof(REAL))));
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (lane_indices){__VA_ARGS__})
#endif
#define SWAP_BLOCKS(size, LO, HI)                                  \
    for (int i = 0; i < LANES; i++)                                \
        if (!(i & size)) {                                         \
            const vec a = r[i], b = r[i + size];                   \
            r[i] = SHUFFLE(a, b, LO), r[i + size] = SHUFFLE(a, b, HI); \
        }

/* Transpose a LANES x LANES tile held in vectors: afterwards r[i][k] is the old r[k][i].
 * log2(LANES) rounds swap ever smaller off-diagonal blocks (LANES/2, ..., 1) between rows
 * i and i + size with two-source shuffles (index LANES + j is lane j of the second source). */
static void transpose_tile(vec r[LANES]) {
#if LANES == 16
    SWAP_BLOCKS(8, SEQ(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                SEQ(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
    SWAP_BLOCKS(4, SEQ(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                SEQ(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
    SWAP_BLOCKS(2, SEQ(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
                SEQ(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
    SWAP_BLOCKS(1, SEQ(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
                SEQ(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
#elif LANES == 8
    SWAP_BLOCKS(4, SEQ(0, 1, 2, 3, 8, 9, 10, 11), SEQ(4, 5, 6, 7, 12, 13, 14, 15))
    SWAP_BLOCKS(2, SEQ(0, 1, 8, 9, 4, 5, 12, 13), SEQ(2, 3, 10, 11, 6, 7, 14, 15))
    SWAP_BLOCKS(1, SEQ(0, 8, 2, 10, 4, 12, 6, 14), SEQ(1, 9, 3, 11, 5, 13, 7, 15))
#elif LANES == 4
    SWAP_BLOCKS(2, SEQ(0, 1, 4, 5), SEQ(2, 3, 6, 7))
    SWAP_BLOCKS(1, SEQ(0, 4, 2, 6), SEQ(1, 5, 3, 7))
#else
#error "LANES must be 4, 8 or 16"
#endif
}

/* Sample-major copy of a feature-major activation: rows[n][f] (features a multiple of LANES). */
static void to_rows(const vec *restrict act, int64_t features, REAL *restrict rows, int64_t nv) {
    vec tile[LANES];
    for (int64_t v = 0; v < nv; v++)
        for (int64_t f = 0; f < features; f += LANES) {
            for (int k = 0; k < LANES; k++) tile[k] = act[(f + k) * nv + v];
            transpose_tile(tile);
            for (int k = 0; k < LANES; k++) memcpy(rows + (v * LANES + k) * features + f, &tile[k], sizeof(vec));
        }
}

typedef struct {
    vec *input, *normed, *act, *rstd, *delta, *delta_in, *logit;
    REAL *rows, *grad, *zeros;
    const REAL **input_rows;
} Scratch;

static void *zalloc(size_t bytes) {
    size_t rounded = (bytes + ALIGN - 1) / ALIGN * ALIGN;
    void *p = aligned_alloc(ALIGN, rounded ? rounded : ALIGN);
    if (p) memset(p, 0, rounded);
    return p;
}

static int scratch_alloc(Scratch *s, const Shape *sh) {
    const int64_t nv = sh->nv, h = sh->width, l = sh->depth, samples = nv * LANES;
    const int64_t feats = sh->in_dim > h ? sh->in_dim : h;
    s->input = zalloc(sizeof(vec) * sh->in_dim * nv), s->logit = zalloc(sizeof(vec) * nv);
    s->normed = zalloc(sizeof(vec) * l * h * nv), s->act = zalloc(sizeof(vec) * l * h * nv);
    s->rstd = zalloc(sizeof(vec) * l * nv);
    s->delta = zalloc(sizeof(vec) * feats * nv), s->delta_in = zalloc(sizeof(vec) * feats * nv);
    s->rows = zalloc(sizeof(REAL) * (l > 1 ? l - 1 : 1) * samples * h);
    s->grad = zalloc(sizeof(REAL) * num_weights(sh));
    s->zeros = zalloc(sizeof(REAL) * sh->in_dim);
    s->input_rows = zalloc(sizeof(REAL *) * l * samples);
    return s->input && s->normed && s->act && s->rstd && s->delta && s->delta_in && s->logit && s->rows &&
           s->grad && s->zeros && s->input_rows;
}

static void scratch_free(Scratch *s) {
    free(s->input); free(s->normed); free(s->act); free(s->rstd); free(s->delta); free(s->delta_in);
    free(s->logit); free(s->rows); free(s->grad); free(s->zeros); free((void *)s->input_rows);
}

/* Hidden layers' inputs as rows, for their weight gradients (after the forward pass). */
static void hidden_rows(const Shape *sh, Scratch *s) {
    const int64_t nv = sh->nv, h = sh->width, samples = nv * LANES;
    for (int64_t l = 1; l < sh->depth; l++) {
        REAL *rows = s->rows + (l - 1) * samples * h;
        to_rows(s->act + (l - 1) * h * nv, h, rows, nv);
        for (int64_t n = 0; n < samples; n++) s->input_rows[l * samples + n] = rows + n * h;
    }
}

/* Forward pass of one model on feature-major inputs; logits into s->logit. */
static void forward(const Shape *sh, const REAL *theta, const REAL *head, REAL eps, const vec *in, Scratch *s) {
    const int64_t nv = sh->nv, h = sh->width;
    int64_t cols = sh->in_dim;
    for (int64_t l = 0; l < sh->depth; l++) {
        vec *pre = s->delta; /* free until the backward pass */
        layer_forward(theta + layer_offset(sh, l), h, cols, in, pre, nv);
        norm_relu(pre, h, eps, s->normed + l * h * nv, s->act + l * h * nv, s->rstd + l * nv, nv);
        in = s->act + l * h * nv;
        cols = h;
    }
    for (int64_t v = 0; v < nv; v++) {
        vec acc[4] = {0};
        for (int64_t f = 0; f < h; f += 4) /* h is a multiple of LANES */
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) acc[r] += head[f + r] * in[(f + r) * nv + v];
        s->logit[v] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
}

/* exp(x) for x <= 0, lane-wise: x = k ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series
 * (to below one ulp), times 2^k built in the exponent bits. NaN stays NaN; exp(x < lowest)
 * is taken at lowest (~1e-38 / 1e-308), far below anything the loss or gradient can resolve. */
static vec exp_nonpositive(vec x) {
    const int single = sizeof(REAL) == 4;
    const vec zero = {0}, lowest = zero + (single ? (REAL)-87 : (REAL)-708);
    const mask low = x < lowest;
    x = (vec)(((mask)x & ~low) | ((mask)lowest & low));
    const vec shifter = zero + (single ? (REAL)12582912.0 : (REAL)6755399441055744.0); /* 1.5 * 2^mantissa */
    const vec k = (x * (REAL)1.4426950408889634 + shifter) - shifter; /* round(x / ln2) */
    const REAL ln2_hi = single ? (REAL)0.693359375 : (REAL)6.93147180369123816490e-01;
    const REAL ln2_lo = single ? (REAL)-2.12194440e-4 : (REAL)1.90821492927058770002e-10;
    const vec r = (x - k * ln2_hi) - k * ln2_lo;
    const int terms = single ? 7 : 13;
    REAL factorial = 1;
    for (int n = 2; n <= terms; n++) factorial *= n;
    vec p = zero + 1 / factorial;
    for (int n = terms; n >= 1; n--) p = p * r + (factorial /= n, 1 / factorial); /* 1/(n-1)! */
    const mask exponent = __builtin_convertvector(k, mask) + (single ? 127 : 1023);
    return p * (vec)(exponent << (single ? 23 : 52));
}

/* log(1 + e) for 0 <= e <= 1, lane-wise: 2 atanh(s) with s = e / (2 + e) <= 1/3, by its series. */
static vec log1p_unit(vec e) {
    const int terms = sizeof(REAL) == 4 ? 8 : 17; /* truncation below (1/9)^terms / (2 terms + 1) */
    const vec s = e / (2 + e), s2 = s * s;
    vec p = (vec){0} + (REAL)1 / (2 * terms - 1);
    for (int k = terms - 2; k >= 0; k--) p = p * s2 + (REAL)1 / (2 * k + 1);
    return 2 * s * p;
}

/* Binary cross-entropy of logits z with labels y, lane-wise: max(z, 0) - z y + log(1 + e),
 * with e = exp(-|z|) returned through *e (the sigmoid needs it too). */
static vec bce(vec z, vec y, vec *e) {
    *e = exp_nonpositive((vec)((mask)z | (mask)(-(vec){0}))); /* -|z|: set the sign bit */
    return relu(z) - z * y + log1p_unit(*e);
}

/* Mean BCE loss of the batch; the gradient of every weight into s->grad, its norm into *grad_norm. */
static REAL loss_and_grad(const Shape *sh, const REAL *theta, const REAL *head, REAL eps, const REAL *labels,
                          int64_t batch, Scratch *s, REAL *grad_norm) {
    const int64_t nv = sh->nv, h = sh->width, samples = nv * LANES;
    forward(sh, theta, head, eps, s->input, s);
    hidden_rows(sh, s);
    const vec zero = {0};
    vec loss = {0}, dlogit[nv];
    for (int64_t v = 0; v < nv; v++) {
        vec y = {0}, valid = {0};
        for (int k = 0; k < LANES && v * LANES + k < batch; k++) {
            y[k] = labels[v * LANES + k];
            valid[k] = 1;
        }
        const vec z = s->logit[v];
        vec e;
        loss += valid * bce(z, y, &e);
        const mask nonnegative = z >= 0; /* sigmoid(z) = (z >= 0 ? 1 : e) / (1 + e) */
        const vec numerator = (vec)(((mask)(zero + 1) & nonnegative) | ((mask)e & ~nonnegative));
        dlogit[v] = valid * (numerator / (1 + e) - y) / (REAL)batch;
    }
    vec *delta = s->delta, squares = {0};
    for (int64_t f = 0; f < h; f++)
        for (int64_t v = 0; v < nv; v++) delta[f * nv + v] = head[f] * dlogit[v];
    for (int64_t l = sh->depth - 1; l >= 0; l--) {
        norm_relu_backward(delta, s->normed + l * h * nv, s->rstd + l * nv, h, nv);
        const int64_t cols = l == 0 ? sh->in_dim : h;
        const REAL *const *rows = s->input_rows + l * samples;
        squares += layer_weight_grad(delta, rows, h, cols, samples, s->grad + layer_offset(sh, l));
        if (l > 0) {
            layer_input_grad(theta + layer_offset(sh, l), h, cols, delta, s->delta_in, nv);
            vec *swap = s->delta;
            s->delta = s->delta_in;
            s->delta_in = swap;
            delta = s->delta;
        }
    }
    REAL total = 0, norm2 = 0;
    for (int k = 0; k < LANES; k++) {
        total += loss[k];
        norm2 += squares[k];
    }
    *grad_norm = sqrt(norm2);
    return total / (REAL)batch;
}

/* sum a^2 (four partial sums); with grad, a -= lr * grad first (the SGD step, in the same pass). */
static REAL step_and_sum_squares(REAL *restrict a, const REAL *restrict grad, REAL lr, int64_t n) {
    vec acc[4] = {0}; /* four independent sums: latency, not throughput, bounds one */
    REAL tail = 0;
    int64_t i = 0;
    for (; i + 4 * LANES <= n; i += 4 * LANES) {
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            vec x;
            memcpy(&x, a + i + r * LANES, sizeof x);
            if (grad) {
                vec g;
                memcpy(&g, grad + i + r * LANES, sizeof g);
                x -= lr * g;
                memcpy(a + i + r * LANES, &x, sizeof x);
            }
            acc[r] += x * x;
        }
    }
    for (; i < n; i++) {
        if (grad) a[i] -= lr * grad[i];
        tail += a[i] * a[i];
    }
    vec total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int k = 0; k < LANES; k++) tail += total[k];
    return tail;
}

/* One step on the sphere of radius rho (see sphere.py): rule 0 projected, 1 Riemannian. */
static void sphere_step(REAL *theta, const REAL *grad, int64_t n, REAL lr, REAL grad_norm, REAL rho, int64_t rule) {
    REAL norm2;
    if (rule == 0) {
        norm2 = step_and_sum_squares(theta, grad, lr, n);
    } else {
        const REAL theta_norm = sqrt(step_and_sum_squares(theta, NULL, 0, n));
        const REAL angle = lr * grad_norm / theta_norm;
        const REAL floor = sizeof(REAL) == 4 ? 1.17549435e-38f : 2.2250738585072014e-308;
        const REAL along = -sin(angle) * theta_norm / (grad_norm > floor ? grad_norm : floor);
        const REAL keep = cos(angle);
        for (int64_t i = 0; i < n; i++) theta[i] = theta[i] * keep + grad[i] * along;
        norm2 = step_and_sum_squares(theta, NULL, 0, n);
    }
    const REAL scale = rho / (REAL)sqrt(norm2);
    for (int64_t i = 0; i < n; i++) theta[i] *= scale;
}

/* Gather one minibatch: feature-major input vectors, and pointers to its rows for the gradient. */
static void load_batch(const Shape *sh, const REAL *x, const int64_t *index, int64_t batch, Scratch *s) {
    const int64_t nv = sh->nv, d = sh->in_dim;
    vec tile[LANES];
    for (int64_t v = 0; v < nv; v++) {
        for (int k = 0; k < LANES; k++) {
            const int64_t n = v * LANES + k;
            s->input_rows[n] = n < batch ? x + index[n] * d : s->zeros;
        }
        for (int64_t f = 0; f < d; f += LANES) {
            for (int k = 0; k < LANES; k++) memcpy(&tile[k], s->input_rows[v * LANES + k] + f, sizeof(vec));
            transpose_tile(tile);
            for (int k = 0; k < LANES; k++) s->input[(f + k) * nv + v] = tile[k];
        }
    }
}

/* Train models [0, num_models) for `steps` steps; mirrors GridTrainer.lockstep and its sums.
 * order: [streams][steps][batch] sample indices (row stride order_stride per stream).
 * Returns 0, or -1 when scratch memory could not be allocated. */
int lrf_train(int64_t num_models, int64_t depth, int64_t in_dim, int64_t width, int64_t batch, REAL eps,
              REAL *theta, const REAL *head, const REAL *lrs, REAL rho, int64_t rule, const REAL *x,
              const REAL *y, const int64_t *order, int64_t order_stride, int64_t steps,
              const int64_t *stream_of_model, uint8_t *active, REAL *grad_norm, REAL *grad_sum, REAL *loss_sum,
              REAL *count) {
    Shape sh = {depth, in_dim, width, (batch + LANES - 1) / LANES};
    Scratch s;
    if (!scratch_alloc(&s, &sh)) return scratch_free(&s), -1; /* frees what was allocated */
    const int64_t p = num_weights(&sh);
    REAL labels[sh.nv * LANES];
    FAST_FLOATS_BEGIN
    for (int64_t m = 0; m < num_models; m++) {
        REAL *w = theta + m * p;
        const REAL lr = lrs[m] * rho * rho;
        const int64_t *stream = order + stream_of_model[m] * order_stride;
        for (int64_t t = 0; t < steps; t++) {
            const int64_t *index = stream + t * batch;
            load_batch(&sh, x, index, batch, &s);
            for (int64_t n = 0; n < batch; n++) labels[n] = y[index[n]];
            REAL norm;
            const REAL loss = loss_and_grad(&sh, w, head + m * width, eps, labels, batch, &s, &norm);
            if (active[m]) grad_norm[m] = norm;
            active[m] = active[m] && isfinite(loss) && isfinite(grad_norm[m]);
            sphere_step(w, s.grad, p, lr, norm, rho, rule);
            if (active[m]) {
                grad_sum[m] += grad_norm[m];
                loss_sum[m] += loss;
                count[m] += 1;
            }
        }
    }
    FAST_FLOATS_END
    scratch_free(&s);
    return 0;
}

int64_t lrf_lanes(void) { return LANES; } /* samples per vector: lrf_evaluate's block layout */

/* Mean BCE loss and accuracy of models [0, num_models) on `sets` labelled sets in one pass per
 * model (its weights stay in L1 while every set's blocks stream past). Set k is blocks[k]
 * feature-major blocks of nv vectors, xt[b][in_dim][nv][LANES], with labels y (each set padded
 * to whole blocks, the sets back to back); n[k] of its samples are real. Results go to
 * mean_loss[k * out_stride + m] and accuracy[k * out_stride + m]. A NaN logit counts as class 0,
 * as in torch. Returns 0, or -1 on allocation failure. */
int lrf_evaluate(int64_t num_models, int64_t depth, int64_t in_dim, int64_t width, REAL eps, const REAL *theta,
                 const REAL *head, int64_t nv, const REAL *xt, const REAL *y, int64_t sets, const int64_t *blocks,
                 const int64_t *n, REAL *mean_loss, REAL *accuracy, int64_t out_stride) {
    Shape sh = {depth, in_dim, width, nv};
    Scratch s;
    if (!scratch_alloc(&s, &sh)) return scratch_free(&s), -1; /* frees what was allocated */
    const int64_t p = num_weights(&sh), block = nv * LANES;
    const vec zero = {0};
    FAST_FLOATS_BEGIN
    for (int64_t m = 0; m < num_models; m++) {
        int64_t first = 0; /* the set's first block */
        for (int64_t k = 0; k < sets; k++) {
            double loss_total = 0, correct_total = 0;
            for (int64_t b = 0; b < blocks[k]; b++) {
                const int64_t at = first + b;
                forward(&sh, theta + m * p, head + m * width, eps, (const vec *)(xt + at * in_dim * block), &s);
                vec loss = {0}, correct = {0};
                for (int64_t v = 0; v < nv; v++) {
                    vec labels, valid = {0};
                    memcpy(&labels, y + at * block + v * LANES, sizeof labels);
                    for (int j = 0; j < LANES; j++) valid[j] = b * block + v * LANES + j < n[k];
                    const vec z = s.logit[v];
                    vec e;
                    loss += valid * bce(z, labels, &e);
                    const mask right = (z > 0) == (labels > (REAL)0.5);
                    correct += valid * (vec)((mask)(zero + 1) & right);
                }
                for (int j = 0; j < LANES; j++) {
                    loss_total += loss[j];
                    correct_total += correct[j];
                }
            }
            mean_loss[k * out_stride + m] = (REAL)(loss_total / (double)n[k]);
            accuracy[k * out_stride + m] = (REAL)(correct_total / (double)n[k]);
            first += blocks[k];
        }
    }
    FAST_FLOATS_END
    scratch_free(&s);
    return 0;
}
