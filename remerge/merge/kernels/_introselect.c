/* Which entries of a task vector survive TIES / breadcrumbs sparsification, exactly as
 * mergekit decides it, in linear time.
 *
 * mergekit ranks |delta| with torch's CPU sort, which is libstdc++'s std::sort (introsort:
 * median-of-three pivot moved to the front, unguarded Hoare partition, right side recursed,
 * heap sort below the depth limit, insertion sort of the final <= 16-element runs) over
 * (key, index) pairs with torch's comparator. The sort is not stable, so which of several
 * equal magnitudes land before the cut depends on every partition step.
 *
 * A partition step only moves elements inside its own range, and after the loop no element
 * crosses a run boundary. So the set of elements before a cut position is decided by the
 * steps on the ranges that contain the cut: this file replays exactly those steps (the same
 * comparisons, swaps and depth counting as std::sort) and skips every range that lies on one
 * side of all cuts. Ranges that are replayed see the very same elements in the very same
 * order as in the full sort, so the result is the same set, bit for bit.
 *
 * Keys are the magnitude bit patterns (sign bit cleared): for bf16, fp16 and fp32 these
 * integers are in the order of the values; NaNs all map to the largest key, as torch's
 * comparator treats NaNs as equal and larger than any number.
 *
 * tests/test_tensor_ops.py checks the result against torch.sort itself.
 */
#include <stdint.h>

#define THRESHOLD 16
#define BLOCK 64 /* elements per block of the partition's scans (offsets fit a byte) */

#define DEFINE_SELECT(NAME, KEY_T, WIDTH_T)                                                    \
typedef struct { KEY_T *key; int32_t *idx; int64_t lo, hi; int full; } NAME##_ctx;            \
                                                                                               \
static inline int NAME##_lt(const NAME##_ctx *c, KEY_T a, KEY_T b) {                          \
    (void)c; return a < b; /* descending: on complemented keys, the same comparisons */         \
}                                                                                              \
static inline void NAME##_swap(NAME##_ctx *c, int64_t i, int64_t j) {                         \
    KEY_T k = c->key[i]; c->key[i] = c->key[j]; c->key[j] = k;                                 \
    int32_t x = c->idx[i]; c->idx[i] = c->idx[j]; c->idx[j] = x;                               \
}                                                                                              \
static inline int NAME##_has_cut(const NAME##_ctx *c, int64_t first, int64_t last) {          \
    return c->full || (first < c->lo && c->lo < last) || (first < c->hi && c->hi < last);     \
}                                                                                              \
static void NAME##_move_median_to_first(NAME##_ctx *c, int64_t r, int64_t a, int64_t b,       \
                                        int64_t m) {                                           \
    KEY_T *k = c->key;                                                                         \
    if (NAME##_lt(c, k[a], k[b])) {                                                            \
        if (NAME##_lt(c, k[b], k[m])) NAME##_swap(c, r, b);                                    \
        else if (NAME##_lt(c, k[a], k[m])) NAME##_swap(c, r, m);                               \
        else NAME##_swap(c, r, a);                                                             \
    } else if (NAME##_lt(c, k[a], k[m])) NAME##_swap(c, r, a);                                 \
    else if (NAME##_lt(c, k[b], k[m])) NAME##_swap(c, r, m);                                   \
    else NAME##_swap(c, r, b);                                                                 \
}                                                                                              \
/* libstdc++ __unguarded_partition from `first`: the j-th element from the left that is not   \
   less than the pivot swaps with the j-th from the right that the pivot is not less than,    \
   until the two scans cross. */                                                               \
static int64_t NAME##_hoare(NAME##_ctx *c, int64_t first, int64_t last, KEY_T p) {            \
    KEY_T *k = c->key;                                                                         \
    for (;;) {                                                                                 \
        while (NAME##_lt(c, k[first], p)) ++first;                                             \
        --last;                                                                                \
        while (NAME##_lt(c, p, k[last])) --last;                                               \
        if (!(first < last)) return first;                                                     \
        NAME##_swap(c, first, last);                                                           \
        ++first;                                                                               \
    }                                                                                          \
}                                                                                              \
/* The same partition, the same swaps, without a branch per comparison (block partitioning,   \
   Edelkamp & Weiss): the positions where each scan would stop are found BLOCK elements at a  \
   time and swapped pairwise in scan order, so the j-th left stop still meets the j-th right  \
   stop. While the unscanned middle holds a whole block no pair can cross; the last stretch   \
   is left to `hoare`, from the state it would have reached after the same swaps. */          \
static int64_t NAME##_partition(NAME##_ctx *c, int64_t first, int64_t last, int64_t pivot) {  \
    KEY_T *k = c->key;                                                                         \
    const KEY_T p = k[pivot];                                                                  \
    uint8_t offl[BLOCK], offr[BLOCK];                                                          \
    int64_t lp = first, rp = last, lbase = first, rbase = last;                                \
    int nl = 0, nr = 0, sl = 0, sr = 0;                                                        \
    for (;;) {                                                                                 \
        if (sl == nl) {                                                                        \
            if (rp - lp < BLOCK) break;                                                        \
            sl = nl = 0; lbase = lp;                                                           \
            for (int i = 0; i < BLOCK; ++i) { /* left stops: not less than the pivot */        \
                KEY_T v = k[lp + i];                                                           \
                offl[nl] = (uint8_t)i;                                                         \
                nl += v >= p;                                                                  \
            }                                                                                  \
            lp += BLOCK;                                                                       \
        }                                                                                      \
        if (sr == nr) {                                                                        \
            if (rp - lp < BLOCK) break;                                                        \
            sr = nr = 0; rbase = rp - 1;                                                       \
            for (int i = 0; i < BLOCK; ++i) { /* right stops: the pivot not less */            \
                KEY_T v = k[rbase - i];                                                        \
                offr[nr] = (uint8_t)i;                                                         \
                nr += v <= p;                                                                  \
            }                                                                                  \
            rp -= BLOCK;                                                                       \
        }                                                                                      \
        int m = nl - sl < nr - sr ? nl - sl : nr - sr;                                         \
        for (int t = 0; t < m; ++t) {                                                          \
            int64_t i = lbase + offl[sl + t], j = rbase - offr[sr + t];                        \
            NAME##_swap(c, i, j);                                                              \
            first = i + 1; last = j; /* where hoare stands after this swap */                  \
        }                                                                                      \
        sl += m; sr += m;                                                                      \
    }                                                                                          \
    return NAME##_hoare(c, first, last, p);                                                    \
}                                                                                              \
/* libstdc++ __adjust_heap + __push_heap, on the range starting at `first` */                  \
static void NAME##_adjust_heap(NAME##_ctx *c, int64_t first, int64_t hole, int64_t len,        \
                               KEY_T vk, int32_t vi) {                                         \
    KEY_T *k = c->key; int32_t *x = c->idx;                                                    \
    const int64_t top = hole;                                                                  \
    int64_t second = hole;                                                                     \
    while (second < (len - 1) / 2) {                                                           \
        second = 2 * (second + 1);                                                             \
        if (NAME##_lt(c, k[first + second], k[first + second - 1])) second--;                  \
        k[first + hole] = k[first + second]; x[first + hole] = x[first + second];              \
        hole = second;                                                                         \
    }                                                                                          \
    if ((len & 1) == 0 && second == (len - 2) / 2) {                                           \
        second = 2 * (second + 1);                                                             \
        k[first + hole] = k[first + second - 1]; x[first + hole] = x[first + second - 1];      \
        hole = second - 1;                                                                     \
    }                                                                                          \
    int64_t parent = (hole - 1) / 2;                                                           \
    while (hole > top && NAME##_lt(c, k[first + parent], vk)) {                                \
        k[first + hole] = k[first + parent]; x[first + hole] = x[first + parent];              \
        hole = parent;                                                                         \
        parent = (hole - 1) / 2;                                                               \
    }                                                                                          \
    k[first + hole] = vk; x[first + hole] = vi;                                                \
}                                                                                              \
/* libstdc++ __partial_sort(first, last, last): __make_heap then __sort_heap */                \
static void NAME##_heap_sort(NAME##_ctx *c, int64_t first, int64_t last) {                    \
    KEY_T *k = c->key; int32_t *x = c->idx;                                                    \
    int64_t len = last - first;                                                                \
    if (len >= 2) {                                                                            \
        int64_t parent = (len - 2) / 2;                                                        \
        for (;;) {                                                                             \
            NAME##_adjust_heap(c, first, parent, len, k[first + parent], x[first + parent]);   \
            if (parent == 0) break;                                                            \
            parent--;                                                                          \
        }                                                                                      \
    }                                                                                          \
    while (last - first > 1) {                                                                 \
        --last;                                                                                \
        KEY_T vk = k[last]; int32_t vi = x[last];                                              \
        k[last] = k[first]; x[last] = x[first];                                                \
        NAME##_adjust_heap(c, first, 0, last - first, vk, vi);                                 \
    }                                                                                          \
}                                                                                              \
/* the final insertion sort restricted to one run (no element crosses a run boundary) */      \
static void NAME##_insertion_sort(NAME##_ctx *c, int64_t first, int64_t last) {               \
    KEY_T *k = c->key; int32_t *x = c->idx;                                                    \
    for (int64_t i = first + 1; i < last; ++i) {                                               \
        KEY_T vk = k[i]; int32_t vi = x[i];                                                    \
        int64_t j = i;                                                                         \
        while (j > first && NAME##_lt(c, vk, k[j - 1])) {                                      \
            k[j] = k[j - 1]; x[j] = x[j - 1]; --j;                                             \
        }                                                                                      \
        k[j] = vk; x[j] = vi;                                                                  \
    }                                                                                          \
}                                                                                              \
static void NAME##_loop(NAME##_ctx *c, int64_t first, int64_t last, int64_t depth) {          \
    while (last - first > THRESHOLD) {                                                         \
        if (!NAME##_has_cut(c, first, last)) return; /* one side of every cut */               \
        if (depth == 0) { NAME##_heap_sort(c, first, last); return; }                          \
        --depth;                                                                               \
        int64_t mid = first + (last - first) / 2;                                              \
        NAME##_move_median_to_first(c, first, first + 1, mid, last - 1);                       \
        int64_t cut = NAME##_partition(c, first + 1, last, first);                             \
        NAME##_loop(c, cut, last, depth);                                                      \
        last = cut;                                                                            \
    }                                                                                          \
    if (NAME##_has_cut(c, first, last)) NAME##_insertion_sort(c, first, last);                 \
}                                                                                              \
/* Zero (bits) every entry of `delta` whose sorted position is outside [lo, hi).              \
   key: scratch of n keys; idx: scratch of n int32. inf: the bit pattern of +inf. */           \
static void NAME##_sort(NAME##_ctx *c, const WIDTH_T *delta, int64_t n, int desc, KEY_T inf,   \
                        KEY_T nan_key) {                                                       \
    const KEY_T mask = (KEY_T)(nan_key); /* the magnitude bits: sign cleared */                \
    const KEY_T flip = desc ? (KEY_T)~(KEY_T)0 : 0; /* a > b exactly when ~a < ~b */           \
    for (int64_t i = 0; i < n; ++i) {                                                          \
        KEY_T m = (KEY_T)(delta[i] & mask);                                                    \
        c->key[i] = (KEY_T)((m > inf ? nan_key : m) ^ flip);                                   \
        c->idx[i] = (int32_t)i;                                                                \
    }                                                                                          \
    if (n > 1) {                                                                               \
        int64_t lg = 63 - __builtin_clzll((unsigned long long)n);                              \
        NAME##_loop(c, 0, n, 2 * lg);                                                          \
    }                                                                                          \
}                                                                                              \
int NAME(WIDTH_T *delta, int64_t n, int desc, int64_t lo, int64_t hi, KEY_T *key,             \
         int32_t *idx, KEY_T inf, KEY_T nan_key) {                                             \
    if (n <= 0 || n > INT32_MAX) return -1;                                                    \
    NAME##_ctx c = {key, idx, lo, hi, 0};                                                      \
    NAME##_sort(&c, delta, n, desc, inf, nan_key);                                                   \
    for (int64_t p = 0; p < lo; ++p) delta[idx[p]] = 0;                                        \
    for (int64_t p = hi; p < n; ++p) delta[idx[p]] = 0;                                        \
    return 0;                                                                                  \
}                                                                                              \
/* Each entry's position in torch's sort of |row| (DELLA's ranks: argsort().argsort()), for  \
   `rows` rows of n: the whole sort replayed (every range holds a cut), then its inverse.     \
   ranks: rows * n int32; key, idx: scratch of n. */                                          \
int NAME##_rank(const WIDTH_T *delta, int64_t rows, int64_t n, int desc, int32_t *ranks,      \
                KEY_T *key, int32_t *idx, KEY_T inf, KEY_T nan_key) {                          \
    if (n <= 0 || n > INT32_MAX) return -1;                                                    \
    for (int64_t r = 0; r < rows; ++r) {                                                       \
        NAME##_ctx c = {key, idx, 0, 0, 1};                                                    \
        NAME##_sort(&c, delta + r * n, n, desc, inf, nan_key);                                       \
        for (int64_t p = 0; p < n; ++p) ranks[r * n + idx[p]] = (int32_t)p;                    \
    }                                                                                          \
    return 0;                                                                                  \
}

DEFINE_SELECT(remerge_select16, uint16_t, uint16_t)
DEFINE_SELECT(remerge_select32, uint32_t, uint32_t)

/* ---------------------------------------------------------------------------------------
 * base + (x - base) in bfloat16, as torch computes it: each op in float32, rounded once to
 * bfloat16 (round to nearest even). One pass instead of torch's subtract, check and add.
 * Returns 1 (and leaves `out` unspecified) if a difference is not finite: the caller then
 * takes the step-by-step path. Branch-free, so that the compiler vectorizes the loop (3x
 * faster; 5x with AVX2). native.py checks this against torch before first use.
 */
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + (((u >> 16) & 1) + 0x7FFF)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : rounded;
}

/* On x86-64 Linux an AVX2 copy too, picked at load time where the CPU has it (ifunc): the
 * same IEEE float32 operations, twice the lanes of the baseline SSE2 build. */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define REMERGE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define REMERGE_CLONES
#endif

REMERGE_CLONES
int remerge_plain_difference_bf16(const uint16_t *restrict x, const uint16_t *restrict base,
                                  uint16_t *restrict out, int64_t n) {
    uint16_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
        float b = bf16_to_f32(base[i]);
        uint16_t d = f32_to_bf16(bf16_to_f32(x[i]) - b);
        bad |= (uint16_t)((d & 0x7F80) == 0x7F80); /* inf or NaN */
        out[i] = f32_to_bf16(b + bf16_to_f32(d));
    }
    return bad != 0;
}

/* ---------------------------------------------------------------------------------------
 * The TIES-family combination in bfloat16, fused: for each element j of the n (sparsified)
 * task vectors d_i (rows of `deltas`, `stride` elements apart) and the base, as torch
 * computes it step by step in remerge.merge.methods.task_arithmetic.combine:
 *
 *     D_i   = bf16(d_i * w_i)                      (exact for w_i = 1: torch skips it then)
 *     sign election (`consensus`): majority = bf16(sum_i D_i) >= 0, kept_i = sign(D_i) == it
 *     mixed = bf16(sum over kept i of D_i)         (every i without `consensus`)
 *     div   = bf16(sum over kept i of w_i), 1 where 0    (`fixed_div` without `consensus`)
 *     mixed = bf16(mixed / div)                    (`normalize`)
 *     mixed = bf16(mixed * lam)                    (`scaled`)
 *     out   = bf16(base + mixed)
 *
 * Sums accumulate in float32 from +0 over the models in order, as torch's sum over dim 0
 * does; a dropped entry adds D_i * 0 (a zero), as torch's masked sum does. Elements go in
 * tiles of TILE so that every inner loop runs over elements, branch-free, and vectorizes
 * (the model loop is outside). Returns 1, leaving `out` unspecified, where an input is inf
 * or NaN or a float32 sum overflows: then no NaN can arise below, so rounding needs no NaN
 * case, and the caller takes torch's path for such a tensor. n <= 64. native.py checks the
 * kernel against torch's own steps before first use.
 */
#define TILE 256

static inline float bf16_round_finite(float f) { /* round to nearest even, f not NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u = (u + (((u >> 16) & 1) + 0x7FFF)) & 0xFFFF0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_bits(float f) { /* f already a bf16 value */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

REMERGE_CLONES
int remerge_combine_bf16(const uint16_t *restrict deltas, int64_t stride, int n,
                         const float *restrict w, int consensus, int normalize, float fixed_div,
                         int scaled, float lam, const uint16_t *restrict base,
                         uint16_t *restrict out, int64_t count) {
    if (n < 1 || n > 64) return 2;
    const float big = 3.4028234663852886e38f; /* FLT_MAX: |sum| above it is inf (or NaN) */
    int bad = 0;
    for (int64_t t0 = 0; t0 < count; t0 += TILE) {
        const int len = count - t0 < TILE ? (int)(count - t0) : TILE;
        float s[TILE], mixed[TILE], div[TILE], m[TILE];
        int positive[TILE];
        for (int j = 0; j < len; ++j) { s[j] = 0.0f; mixed[j] = 0.0f; div[j] = 0.0f; }
        for (int i = 0; i < n; ++i) { /* pass 1: the plain sum */
            const uint16_t *row = deltas + i * stride + t0;
            const float wi = w[i];
            for (int j = 0; j < len; ++j) {
                bad |= (row[j] & 0x7F80) == 0x7F80;
                s[j] += bf16_round_finite(bf16_to_f32(row[j]) * wi);
            }
        }
        for (int j = 0; j < len; ++j) bad |= (s[j] <= big) + (s[j] >= -big) != 2; /* not finite */
        if (consensus) {
            for (int j = 0; j < len; ++j) positive[j] = bf16_round_finite(s[j]) >= 0.0f;
            for (int i = 0; i < n; ++i) { /* pass 2: the kept entries and their weights */
                const uint16_t *row = deltas + i * stride + t0;
                const float wi = w[i];
                for (int j = 0; j < len; ++j) {
                    float d = bf16_round_finite(bf16_to_f32(row[j]) * wi);
                    int kept = (positive[j] & (d > 0.0f)) | ((1 - positive[j]) & (d < 0.0f));
                    mixed[j] += d * (float)kept;
                    div[j] += wi * (float)kept;
                }
            }
            for (int j = 0; j < len; ++j) {
                bad |= (mixed[j] <= big) + (mixed[j] >= -big) != 2;
                m[j] = bf16_round_finite(mixed[j]);
            }
            if (normalize)
                for (int j = 0; j < len; ++j) {
                    float dv = bf16_round_finite(div[j]);
                    m[j] = bf16_round_finite(m[j] / (dv + (float)(dv == 0.0f))); /* 1 where 0 */
                }
        } else {
            for (int j = 0; j < len; ++j) m[j] = bf16_round_finite(s[j]);
            if (normalize)
                for (int j = 0; j < len; ++j) m[j] = bf16_round_finite(m[j] / fixed_div);
        }
        if (scaled)
            for (int j = 0; j < len; ++j) m[j] = bf16_round_finite(m[j] * lam);
        for (int j = 0; j < len; ++j) {
            bad |= (base[t0 + j] & 0x7F80) == 0x7F80;
            out[t0 + j] = bf16_bits(bf16_round_finite(bf16_to_f32(base[t0 + j]) + m[j]));
        }
    }
    return bad != 0;
}

/* ---------------------------------------------------------------------------------------
 * DARE's random drop in bfloat16, in place, as torch computes
 *     mask = torch.bernoulli(full(shape, p), generator=Generator().manual_seed(seed))
 *            (DELLA: torch.bernoulli(probs, ...), each entry's own bf16 probability)
 *     delta = delta * mask            (rule 0)   or   (delta * mask) / density   (rule 1)
 * torch's CPU generator is MT19937 seeded with the seed's low 32 bits (the reference
 * initialization), and its bernoulli draws each element in order, serially: keep when
 * (next 32-bit output & 0xFFFFFF) * 2^-24 < p (p as float32). Each op rounds once to bf16.
 * Returns 1, changing nothing, where an entry is inf or NaN. native.py checks the kernel
 * against torch before first use.
 */
#define MT_N 624
#define MT_M 397

typedef struct { uint32_t s[MT_N]; } mt19937;

static void mt_seed(mt19937 *g, uint32_t seed) {
    g->s[0] = seed;
    for (int j = 1; j < MT_N; ++j) g->s[j] = 1812433253u * (g->s[j - 1] ^ (g->s[j - 1] >> 30)) + (uint32_t)j;
}

static inline uint32_t mt_mix(uint32_t a, uint32_t b, uint32_t c) { /* one word of the twist */
    uint32_t y = (a & 0x80000000u) | (b & 0x7FFFFFFFu);
    return c ^ (y >> 1) ^ ((y & 1u) * 0x9908B0DFu);
}

/* The next MT_N outputs, tempered, into `out` (the state advances by one twist). */
static void mt_block(mt19937 *g, uint32_t *restrict out) {
    uint32_t *s = g->s;
    int k = 0;
    for (; k < MT_N - MT_M; ++k) s[k] = mt_mix(s[k], s[k + 1], s[k + MT_M]);
    for (; k < MT_N - 1; ++k) s[k] = mt_mix(s[k], s[k + 1], s[k + MT_M - MT_N]);
    s[MT_N - 1] = mt_mix(s[MT_N - 1], s[0], s[MT_M - 1]);
    for (int j = 0; j < MT_N; ++j) {
        uint32_t y = s[j];
        y ^= y >> 11;
        y ^= (y << 7) & 0x9D2C5680u;
        y ^= (y << 15) & 0xEFC60000u;
        out[j] = y ^ (y >> 18);
    }
}

REMERGE_CLONES
int remerge_dare_bf16(uint16_t *restrict delta, int64_t n, uint64_t seed, float p,
                      const uint16_t *restrict probs, int rule, float density) {
    uint16_t bad = 0; /* inf or NaN anywhere: left to torch (NaN bits), nothing changed */
    for (int64_t i = 0; i < n; ++i) bad |= (uint16_t)((delta[i] & 0x7F80) == 0x7F80);
    if (bad) return 1;
    mt19937 g;
    uint32_t draws[MT_N];
    float keep_below[MT_N]; /* each entry's keep probability: p, or its own (DELLA) */
    mt_seed(&g, (uint32_t)seed);
    const float unit = 1.0f / 16777216.0f; /* 2^-24 */
    const float scale = rule ? density : 1.0f; /* x / 1 is exact */
    for (int64_t start = 0; start < n; start += MT_N) {
        mt_block(&g, draws);
        const int len = n - start < MT_N ? (int)(n - start) : MT_N;
        uint16_t *d = delta + start;
        if (probs)
            for (int j = 0; j < len; ++j) keep_below[j] = bf16_to_f32(probs[start + j]);
        else
            for (int j = 0; j < len; ++j) keep_below[j] = p;
        for (int j = 0; j < len; ++j) {
            const float u = (float)(int32_t)(draws[j] & 0xFFFFFFu) * unit;
            const int keep = u < keep_below[j];
            const float kept = bf16_to_f32(d[j]) * (float)keep; /* d or a signed zero: exact */
            d[j] = bf16_bits(bf16_round_finite(kept / scale));
        }
    }
    return 0;
}
