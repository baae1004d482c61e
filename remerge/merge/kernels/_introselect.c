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

#define DEFINE_SELECT(NAME, KEY_T, WIDTH_T)                                                    \
typedef struct { KEY_T *key; int32_t *idx; int desc; int64_t lo, hi; } NAME##_ctx;            \
                                                                                               \
static inline int NAME##_lt(const NAME##_ctx *c, KEY_T a, KEY_T b) {                          \
    return c->desc ? a > b : a < b;                                                            \
}                                                                                              \
static inline void NAME##_swap(NAME##_ctx *c, int64_t i, int64_t j) {                         \
    KEY_T k = c->key[i]; c->key[i] = c->key[j]; c->key[j] = k;                                 \
    int32_t x = c->idx[i]; c->idx[i] = c->idx[j]; c->idx[j] = x;                               \
}                                                                                              \
static inline int NAME##_has_cut(const NAME##_ctx *c, int64_t first, int64_t last) {          \
    return (first < c->lo && c->lo < last) || (first < c->hi && c->hi < last);                 \
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
static int64_t NAME##_partition(NAME##_ctx *c, int64_t first, int64_t last, int64_t pivot) {  \
    KEY_T *k = c->key;                                                                         \
    for (;;) {                                                                                 \
        while (NAME##_lt(c, k[first], k[pivot])) ++first;                                      \
        --last;                                                                                \
        while (NAME##_lt(c, k[pivot], k[last])) --last;                                        \
        if (!(first < last)) return first;                                                     \
        NAME##_swap(c, first, last);                                                           \
        ++first;                                                                               \
    }                                                                                          \
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
int NAME(WIDTH_T *delta, int64_t n, int desc, int64_t lo, int64_t hi, KEY_T *key,             \
         int32_t *idx, KEY_T inf, KEY_T nan_key) {                                             \
    if (n <= 0 || n > INT32_MAX) return -1;                                                    \
    KEY_T mask = (KEY_T)(nan_key);                                                             \
    for (int64_t i = 0; i < n; ++i) {                                                          \
        KEY_T m = (KEY_T)(delta[i] & mask);                                                    \
        key[i] = m > inf ? nan_key : m;                                                        \
        idx[i] = (int32_t)i;                                                                   \
    }                                                                                          \
    NAME##_ctx c = {key, idx, desc, lo, hi};                                                   \
    if (n > 1) {                                                                               \
        int64_t lg = 63 - __builtin_clzll((unsigned long long)n);                              \
        NAME##_loop(&c, 0, n, 2 * lg);                                                         \
    }                                                                                          \
    for (int64_t p = 0; p < lo; ++p) delta[idx[p]] = 0;                                        \
    for (int64_t p = hi; p < n; ++p) delta[idx[p]] = 0;                                        \
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
