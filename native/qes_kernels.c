/* The C twin of the Numba kernels in qes_edge/kernels: read it beside them.
 *
 * Bit-identical results need the Numba semantics spelled out where C differs:
 * int64 arithmetic that may overflow goes through uint64 (wrap-around, as in
 * Numba), and right shifts of negative numbers use floor_shift (in C they are
 * implementation-defined; Numba's are arithmetic, i.e. floor).  Chunks are
 * independent (they cover disjoint bytes, gating bits and residuals), so the
 * OpenMP loop over them gives the same bytes on any thread count, and the
 * counts are integer sums.
 */
#include "qes_kernels.h"

#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* A hint to fetch the cache line at p for writing; it changes no result. */
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH_FOR_WRITE(p) __builtin_prefetch((p), 1)
#else
#define PREFETCH_FOR_WRITE(p) ((void)(p))
#endif

/* Columns of layout_tables()' params (codes.py). */
enum { LOW_BITS, HIGH_BITS, SIGNED, BLOCK_SHIFT, BLOCK_BYTES, CODE_LO, CODE_HI, N_PARAMS };

#define GOLDEN UINT64_C(0x9E3779B97F4A7C15)
#define M1 UINT64_C(0xBF58476D1CE4E5B9)
#define M2 UINT64_C(0x94D049BB133111EB)
#define SIGN_SALT UINT64_C(0x5349474E53414C54)
#define ONE (INT64_C(1) << QES_FRACTION_BITS)
#define HALF (ONE >> 1)

/* ---- int64 as Numba computes it ------------------------------------------------------------- */

static inline int64_t wrap_add(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }
static inline int64_t wrap_sub(int64_t a, int64_t b) { return (int64_t)((uint64_t)a - (uint64_t)b); }
static inline int64_t wrap_mul(int64_t a, int64_t b) { return (int64_t)((uint64_t)a * (uint64_t)b); }

/* x >> s rounding toward minus infinity, defined for negative x. */
static inline int64_t floor_shift(int64_t x, int s) { return x >= 0 ? x >> s : ~(~x >> s); }

/* ---- noise.py ------------------------------------------------------------------------------- */

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * M1;
    z = (z ^ (z >> 27)) * M2;
    return z ^ (z >> 31);
}

static inline uint64_t stream_start(uint64_t seed_abs, uint64_t key, int64_t chunk) {
    uint64_t z = mix64(seed_abs + GOLDEN);
    z = mix64(z ^ key);
    return mix64(z ^ ((uint64_t)chunk + GOLDEN));
}

static inline uint64_t next_u64(uint64_t *state) {
    *state += GOLDEN;
    return mix64(*state);
}

/* |seed| as Numba's np.uint64(seed if seed > 0 else -seed) gives it, and the sign of its deltas. */
static inline uint64_t seed_abs_of(int64_t seed) { return seed > 0 ? (uint64_t)seed : (uint64_t)0 - (uint64_t)seed; }
static inline int64_t sign_of(int64_t seed) { return seed > 0 ? 1 : -1; }

static inline int64_t draw_gap(uint64_t *state, const qes_noise *noise) {
    const uint64_t *gap_tail = noise->gap_tail;
    const int64_t last = noise->gap_len - 1;
    int64_t gap = 0;
    for (;;) {
        uint64_t u = next_u64(state);
        if (u < gap_tail[last]) {
            gap += last;  /* past the table: memoryless, draw again */
            continue;
        }
        int64_t k = noise->guide[u >> (64 - QES_GUIDE_BITS)];
        while (k < last && gap_tail[k + 1] > u)
            k++;
        return gap + k;
    }
}

static inline int64_t draw_magnitude(uint64_t *state, const qes_noise *noise) {
    const uint64_t u = next_u64(state);
    int64_t magnitude = 1;
    while (magnitude < noise->magnitude_len && u < noise->magnitude_tail[magnitude])
        magnitude++;
    return magnitude;
}

/* noise.support_stream, sign_stream, chunk_streams, next_support, signed_delta and next_delta: the support and
 * sign streams of one chunk. */
static inline uint64_t support_stream(int64_t support, uint64_t key, int64_t start) {
    return stream_start((uint64_t)support, key, start / QES_CHUNK);
}

static inline uint64_t sign_stream(int64_t seed, uint64_t key, int64_t start) {
    return stream_start(seed_abs_of(seed), key ^ SIGN_SALT, start / QES_CHUNK);
}

typedef struct {
    uint64_t support_state, sign_state;
    int64_t sign;
} delta_stream;

static inline delta_stream chunk_streams(int64_t support, int64_t seed, uint64_t key, int64_t start) {
    delta_stream d = {support_stream(support, key, start), sign_stream(seed, key, start), sign_of(seed)};
    return d;
}

/* Advances *element to the next support code (>= end: the chunk is done) and returns its |delta|. */
static inline int64_t next_support(uint64_t *support_state, int64_t *element, int64_t end, const qes_noise *noise) {
    *element += draw_gap(support_state, noise);
    if (*element >= end)
        return 0;
    return draw_magnitude(support_state, noise);
}

/* A seed's delta at its next support code: one fair sign from its stream. */
static inline int64_t signed_delta(uint64_t *sign_state, int64_t sign, int64_t magnitude) {
    return (next_u64(sign_state) >> 63) ? -sign * magnitude : sign * magnitude;
}

/* Advances *element to the next support code (>= end: the chunk is done) and returns this seed's delta there. */
static inline int64_t next_delta(delta_stream *d, int64_t *element, int64_t end, const qes_noise *noise) {
    const int64_t magnitude = next_support(&d->support_state, element, end, noise);
    if (*element >= end)
        return 0;
    return signed_delta(&d->sign_state, d->sign, magnitude);
}

QES_API void qes_constants(int64_t out[4]) {
    out[0] = QES_ABI_VERSION;
    out[1] = QES_CHUNK;
    out[2] = QES_GUIDE_BITS;
    out[3] = QES_FRACTION_BITS;
}

QES_API int64_t qes_sample_tensor(int64_t seed, int64_t support, uint64_t key, int64_t n_elements,
                                  const qes_noise *noise, int64_t *positions, int8_t *deltas, int64_t capacity) {
    int64_t count = 0;
    const int64_t n_chunks = (n_elements + QES_CHUNK - 1) / QES_CHUNK;
    for (int64_t chunk = 0; chunk < n_chunks; chunk++) {
        int64_t element = chunk * QES_CHUNK;
        const int64_t end = element + QES_CHUNK < n_elements ? element + QES_CHUNK : n_elements;
        delta_stream d = chunk_streams(support, seed, key, element);
        for (;;) {
            const int64_t delta = next_delta(&d, &element, end, noise);
            if (element >= end)
                break;
            if (count < capacity) {
                positions[count] = element;
                deltas[count] = (int8_t)delta;
            }
            count++;
            element++;
        }
    }
    return count;
}

/* ---- codes.py ------------------------------------------------------------------------------- */

static inline const int64_t *params_of(const qes_layout *layout, int64_t f) { return layout->params + f * N_PARAMS; }

/* Byte offset of the element's block; *j becomes the element's index in its block. */
static inline int64_t code_address(int64_t element, const int64_t *params, int64_t offset, int64_t *j) {
    const int64_t shift = params[BLOCK_SHIFT];
    const int64_t block = element >> shift;
    *j = element - (block << shift);
    return offset + block * params[BLOCK_BYTES];
}

static inline int64_t read_code(const uint8_t *buf, int64_t base, int64_t j, int64_t f, const qes_layout *layout) {
    const int64_t *params = params_of(layout, f);
    const int64_t at = f * layout->width + j;
    const int64_t low_bits = params[LOW_BITS], high_bits = params[HIGH_BITS];
    int64_t code = (buf[base + layout->low_byte[at]] >> layout->low_shift[at]) & ((INT64_C(1) << low_bits) - 1);
    if (high_bits) {
        const int64_t high =
            (buf[base + layout->high_byte[at]] >> layout->high_shift[at]) & ((INT64_C(1) << high_bits) - 1);
        code |= high << low_bits;
    }
    if (params[SIGNED] && code >= (INT64_C(1) << (low_bits + high_bits - 1)))
        code -= INT64_C(1) << (low_bits + high_bits);
    return code;
}

static inline void put_bits(uint8_t *buf, int64_t at, int64_t shift, int64_t bits, int64_t value) {
    const int64_t mask = ((INT64_C(1) << bits) - 1) << shift;
    const int64_t old = buf[at];
    buf[at] = (uint8_t)((old & ~mask) | ((value << shift) & mask));
}

static inline void write_code(uint8_t *buf, int64_t base, int64_t j, int64_t f, const qes_layout *layout,
                              int64_t code) {
    const int64_t *params = params_of(layout, f);
    const int64_t at = f * layout->width + j;
    const int64_t low_bits = params[LOW_BITS], high_bits = params[HIGH_BITS];
    const int64_t unsigned_code = code & ((INT64_C(1) << (low_bits + high_bits)) - 1);
    put_bits(buf, base + layout->low_byte[at], layout->low_shift[at], low_bits, unsigned_code);
    if (high_bits)
        put_bits(buf, base + layout->high_byte[at], layout->high_shift[at], high_bits, unsigned_code >> low_bits);
}

/* ---- scratch: one slice per thread, allocated before any byte is touched ----------------------- */

static int team_size(int threads) {
#ifdef _OPENMP
    return threads > 0 ? threads : omp_get_max_threads();
#else
    (void)threads;
    return 1;
#endif
}

static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int64_t longest_chunk(const qes_tensors *tensors) {
    const int64_t *chunks = tensors->chunks;
    int64_t longest = 1;
    for (int64_t c = 0; c < tensors->n_chunks; c++)
        if (chunks[3 * c + 2] - chunks[3 * c + 1] > longest)
            longest = chunks[3 * c + 2] - chunks[3 * c + 1];
    return longest;
}

/* ---- perturb.py ----------------------------------------------------------------------------- */

static int64_t perturb_chunk(uint8_t *buf, const qes_layout *layout, const qes_tensors *tensors,
                             const int64_t *chunk, const qes_noise *noise, int64_t undo, int64_t apply,
                             int64_t support, uint8_t *gated, int64_t *elements, int64_t *taken, int64_t *given) {
    const int64_t t = chunk[0], start = chunk[1], end = chunk[2];
    const int64_t *info = tensors->info + 3 * t;
    const int64_t offset = info[0], f = info[1], code_base = info[2];
    const int64_t *params = params_of(layout, f);
    const int64_t lo = params[CODE_LO], hi = params[CODE_HI];
    const uint64_t key = tensors->keys[t];
    /* Draw the chunk's deltas first, then touch memory: independent loads overlap. */
    int64_t count = 0;
    uint64_t support_state = support_stream(support, key, start);
    uint64_t undo_state = sign_stream(undo, key, start), apply_state = sign_stream(apply, key, start);
    const int64_t undo_sign = sign_of(undo), apply_sign = sign_of(apply);
    int64_t element = start;
    for (;;) {
        const int64_t magnitude = next_support(&support_state, &element, end, noise);
        if (element >= end)
            break;
        elements[count] = element;
        taken[count] = undo != 0 ? signed_delta(&undo_state, undo_sign, magnitude) : 0;
        given[count] = apply != 0 ? signed_delta(&apply_state, apply_sign, magnitude) : 0;
        /* The codes are scattered over the model: start fetching each one now, so that the misses overlap. */
        int64_t j;
        PREFETCH_FOR_WRITE(buf + code_address(element, params, offset, &j));
        if (undo != 0)
            PREFETCH_FOR_WRITE(gated + ((code_base + element) >> 3));
        count++;
        element++;
    }
    int64_t restored = 0, applied = 0;
    for (int64_t k = 0; k < count; k++) {
        int64_t j;
        const int64_t base = code_address(elements[k], params, offset, &j);
        const int64_t index = code_base + elements[k];
        const uint8_t bit = (uint8_t)(1u << (index & 7));
        const int64_t code = read_code(buf, base, j, f, layout);
        int64_t moved = code;
        if (undo != 0) {
            if (gated[index >> 3] & bit) {
                gated[index >> 3] &= (uint8_t)~bit;
            } else {
                moved = wrap_sub(moved, taken[k]);
                restored++;
            }
        }
        if (apply != 0) {
            const int64_t candidate = wrap_add(moved, given[k]);
            if (lo <= candidate && candidate <= hi) {
                moved = candidate;
                applied++;
            } else {
                gated[index >> 3] |= bit;
            }
        }
        if (moved != code)
            write_code(buf, base, j, f, layout, moved);
    }
    return apply != 0 ? applied : restored;
}

QES_API int64_t qes_perturb_codes(uint8_t *buf, const qes_layout *layout, const qes_tensors *tensors,
                                  const qes_noise *noise, int64_t undo, int64_t apply, int64_t support,
                                  uint8_t *gated, int threads) {
    const int team = team_size(threads);
    const int64_t n_chunks = tensors->n_chunks;
    const int64_t stride = longest_chunk(tensors);
    int64_t *scratch = malloc(sizeof(int64_t) * 3 * (size_t)stride * (size_t)team);
    if (scratch == NULL)
        return -1;
    int64_t changed = 0;
#pragma omp parallel num_threads(team) reduction(+ : changed)
    {
        int64_t *elements = scratch + 3 * stride * thread_id();
        int64_t *taken = elements + stride, *given = taken + stride;
#pragma omp for schedule(dynamic)
        for (int64_t c = 0; c < n_chunks; c++)
            changed += perturb_chunk(buf, layout, tensors, tensors->chunks + 3 * c, noise, undo, apply, support,
                                     gated, elements, taken, given);
    }
    free(scratch);
    return changed;
}

/* ---- update.py ------------------------------------------------------------------------------ */

/* The chunk's support codes under `support` (elements, ascending) and their |delta|; returns how many. */
static int64_t chunk_support(int64_t *positions, int64_t *magnitudes, int64_t support, uint64_t key, int64_t start,
                             int64_t end, const qes_noise *noise) {
    uint64_t state = support_stream(support, key, start);
    int64_t element = start, count = 0;
    for (;;) {
        const int64_t magnitude = next_support(&state, &element, end, noise);
        if (element >= end)
            return count;
        positions[count] = element;
        magnitudes[count] = magnitude;
        count++;
        element++;
    }
}

/* One iteration's g = sum_p w_p * delta_p on the chunk's support (drawn once, shared by the pairs):
 * fills positions, magnitudes and gradient, one entry per support code; returns how many. */
static int64_t row_gradient(int64_t *gradient, int64_t *positions, int64_t *magnitudes, uint64_t key, int64_t start,
                            int64_t end, int64_t support, const int64_t *seeds_row, const int64_t *weights_row,
                            int64_t pairs, const qes_noise *noise) {
    const int64_t count = chunk_support(positions, magnitudes, support, key, start, end, noise);
    for (int64_t k = 0; k < count; k++)
        gradient[k] = 0;
    for (int64_t p = 0; p < pairs; p++) {
        const int64_t weight = weights_row[p];
        if (weight == 0)
            continue;
        uint64_t sign_state = sign_stream(seeds_row[p], key, start);
        const int64_t sign = sign_of(seeds_row[p]);
        for (int64_t k = 0; k < count; k++)
            gradient[k] = wrap_add(gradient[k], wrap_mul(weight, signed_delta(&sign_state, sign, magnitudes[k])));
    }
    return count;
}

/* u + round(gamma * e), then the whole step; *error becomes the new residual. */
static inline int64_t feedback_step(int64_t u, int64_t *error, int64_t gamma_fx) {
    u = wrap_add(u, floor_shift(wrap_add(wrap_mul(gamma_fx, *error), HALF), QES_FRACTION_BITS));
    const int64_t step = floor_shift(wrap_add(u, HALF), QES_FRACTION_BITS);
    *error = wrap_sub(u, wrap_mul(step, ONE));
    return step;
}

typedef struct {
    int64_t *positions, *magnitudes, *gradient, *elements, *g, *error, *past_positions, *past_magnitudes, *past;
} update_scratch;

enum { UPDATE_ARRAYS = 9 };

static void update_chunk(uint8_t *buf, const qes_layout *layout, const qes_tensors *tensors, const int64_t *chunk,
                         const qes_noise *noise, const qes_update *update, int16_t *residual,
                         const update_scratch *s, int64_t counts[2]) {
    const int64_t t = chunk[0], start = chunk[1], end = chunk[2];
    const int64_t *info = tensors->info + 3 * t;
    const int64_t offset = info[0], f = info[1], code_base = info[2];
    const int64_t *params = params_of(layout, f);
    const int64_t lo = params[CODE_LO], hi = params[CODE_HI];
    const uint64_t key = tensors->keys[t];
    const int64_t *seeds = update->seeds, *weights = update->weights, *supports = update->supports;
    const int64_t pairs = update->pairs, gamma_fx = update->gamma_fx;
    const int feedback = update->feedback, stored = update->stored_residual;
    const int64_t last = update->rows - 1;
    const int64_t count = row_gradient(s->gradient, s->positions, s->magnitudes, key, start, end, supports[last],
                                       seeds + last * pairs, weights + last * pairs, pairs, noise);
    int64_t *elements = s->elements, *g = s->g, *error = s->error;
    int64_t n_elements = 0;
    if (stored && gamma_fx != ONE) {
        /* Every stored residual decays, so every code is read and written. */
        for (int64_t element = start; element < end; element++) {
            elements[n_elements] = element;
            g[n_elements++] = 0;
        }
        for (int64_t k = 0; k < count; k++)
            g[s->positions[k] - start] = s->gradient[k];
    } else {
        /* A code without gradient now keeps its residual (gamma = 1) or has none to keep (replay
         * starts from zero, and with gamma <= 1 and |e| <= 1/2 such a code cannot step). */
        for (int64_t k = 0; k < count; k++)
            if (s->gradient[k] != 0) {
                elements[n_elements] = s->positions[k];
                g[n_elements++] = s->gradient[k];
            }
    }
    for (int64_t k = 0; k < n_elements; k++)
        error[k] = stored ? residual[code_base + elements[k]] : 0;
    if (!stored && feedback && last > 0) {
        /* Replay rebuilds the residual only where this iteration's gradient is non-zero: each past
         * row's sparse gradient is merged into these codes (both lists are in element order). */
        for (int64_t h = 0; h < last; h++) {
            const int64_t past_count = row_gradient(s->past, s->past_positions, s->past_magnitudes, key, start, end,
                                                    supports[h], seeds + h * pairs, weights + h * pairs, pairs,
                                                    noise);
            int64_t q = 0;
            for (int64_t k = 0; k < n_elements; k++) {
                while (q < past_count && s->past_positions[q] < elements[k])
                    q++;
                const int64_t past_g = q < past_count && s->past_positions[q] == elements[k] ? s->past[q] : 0;
                (void)feedback_step(past_g, &error[k], gamma_fx);
            }
        }
    }
    for (int64_t k = 0; k < n_elements; k++) {
        int64_t step;
        if (feedback)
            step = feedback_step(g[k], &error[k], gamma_fx);
        else
            step = floor_shift(wrap_add(g[k], HALF), QES_FRACTION_BITS);
        if (step != 0) {
            int64_t j;
            const int64_t base = code_address(elements[k], params, offset, &j);
            const int64_t moved = wrap_add(read_code(buf, base, j, f, layout), step);
            if (lo <= moved && moved <= hi) {
                write_code(buf, base, j, f, layout, moved);
                counts[0]++;
            } else {
                counts[1]++;
            }
        }
    }
    if (stored)
        for (int64_t k = 0; k < n_elements; k++)
            residual[code_base + elements[k]] = (int16_t)error[k];  /* |e| <= 1/2 step = 2**14 */
}

QES_API int qes_es_update(uint8_t *buf, const qes_layout *layout, const qes_tensors *tensors, const qes_noise *noise,
                          const qes_update *update, int16_t *residual, int64_t counts[2], int threads) {
    const int team = team_size(threads);
    const int64_t n_chunks = tensors->n_chunks;
    const int64_t stride = longest_chunk(tensors);
    int64_t *scratch = malloc(sizeof(int64_t) * UPDATE_ARRAYS * (size_t)stride * (size_t)team);
    if (scratch == NULL)
        return -1;
    int64_t stepped = 0, blocked = 0;
#pragma omp parallel num_threads(team) reduction(+ : stepped, blocked)
    {
        int64_t *mine = scratch + UPDATE_ARRAYS * stride * thread_id();
        const update_scratch s = {mine,
                                  mine + stride,
                                  mine + 2 * stride,
                                  mine + 3 * stride,
                                  mine + 4 * stride,
                                  mine + 5 * stride,
                                  mine + 6 * stride,
                                  mine + 7 * stride,
                                  mine + 8 * stride};
#pragma omp for schedule(dynamic)
        for (int64_t c = 0; c < n_chunks; c++) {
            int64_t chunk_counts[2] = {0, 0};
            update_chunk(buf, layout, tensors, tensors->chunks + 3 * c, noise, update, residual, &s, chunk_counts);
            stepped += chunk_counts[0];
            blocked += chunk_counts[1];
        }
    }
    free(scratch);
    counts[0] = stepped;
    counts[1] = blocked;
    return 0;
}
