/* The C twin of qes_edge/kernels (noise.py, codes.py, perturb.py, update.py).
 *
 * Every function here gives bit-for-bit the result of its Numba twin for the
 * same arguments, on any thread count: the structs mirror the named tuples the
 * Python package builds (Layout, TensorTable, NoiseTable, Update), their
 * arrays passed as pointers to their C-contiguous data.  tests/test_native.py keeps
 * the two sets identical.
 */
#ifndef QES_KERNELS_H
#define QES_KERNELS_H

#include <stdint.h>

#if defined(_WIN32)
#define QES_API __declspec(dllexport)
#else
#define QES_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature or struct below changes; the loader refuses a stale library. */
#define QES_ABI_VERSION 4

/* The determinism contract shared with noise.py and update.py. */
#define QES_CHUNK 8192
#define QES_GUIDE_BITS 12
#define QES_FRACTION_BITS 15

/* codes.Layout: four int64 [n_formats][width] element tables and int64 [n_formats][7] params. */
typedef struct {
    const int64_t *low_byte;
    const int64_t *low_shift;
    const int64_t *high_byte;
    const int64_t *high_shift;
    const int64_t *params;
    int64_t width;
} qes_layout;

/* space.TensorTable: keys uint64 [tensors]; info int64 [tensors][3] (byte offset, format, first code);
 * chunks int64 [n_chunks][3] (tensor, first element, end element). */
typedef struct {
    const uint64_t *keys;
    const int64_t *info;
    const int64_t *chunks;
    int64_t n_chunks;
} qes_tensors;

/* noise.NoiseTable for one sigma: gap_tail (uint64), guide (int64 [1 << QES_GUIDE_BITS]), magnitude_tail (uint64). */
typedef struct {
    const uint64_t *gap_tail;
    int64_t gap_len;
    const int64_t *guide;
    const uint64_t *magnitude_tail;
    int64_t magnitude_len;
} qes_noise;

/* update.Update: seeds/weights int64 [rows][pairs], the last row this iteration; supports int64 [rows]. */
typedef struct {
    const int64_t *seeds;
    const int64_t *supports;
    const int64_t *weights;
    int64_t rows;
    int64_t pairs;
    int64_t gamma_fx;
    int feedback;
    int stored_residual;
} qes_update;

/* ABI version, QES_CHUNK, QES_GUIDE_BITS, QES_FRACTION_BITS. */
QES_API void qes_constants(int64_t out[4]);

/* noise.sample_tensor: writes up to `capacity` (element, delta) pairs, returns how many there are. */
QES_API int64_t qes_sample_tensor(int64_t seed, int64_t support, uint64_t key, int64_t n_elements,
                                  const qes_noise *noise, int64_t *positions, int8_t *deltas, int64_t capacity);

/* perturb.perturb_codes: take the perturbation of seed `undo` off and put that of seed `apply` on (0: none), both
 * on the support of `support`, in one walk; returns the codes `apply` changed (with no `apply`, the codes
 * restored), or -1 (nothing touched) when scratch memory cannot be allocated.  threads <= 0: OpenMP's default. */
QES_API int64_t qes_perturb_codes(uint8_t *buf, const qes_layout *layout, const qes_tensors *tensors,
                                  const qes_noise *noise, int64_t undo, int64_t apply, int64_t support,
                                  uint8_t *gated, int threads);

/* update.es_update: residual holds one int16 per code when update->stored_residual, else it is not touched.
 * counts = (stepped, blocked).  Returns 0, or -1 (nothing touched) when scratch memory cannot be allocated. */
QES_API int qes_es_update(uint8_t *buf, const qes_layout *layout, const qes_tensors *tensors, const qes_noise *noise,
                          const qes_update *update, int16_t *residual, int64_t counts[2], int threads);

#ifdef __cplusplus
}
#endif

#endif
