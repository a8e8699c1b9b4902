/* qes_check_driver: runs the kernels on tables and operations a Python script wrote, and writes what they did.
 *
 *   qes_check_driver CASE_FILE OUT_FILE
 *
 * scripts/check_aarch64.sh builds it with the library for this machine and for aarch64, runs both on the
 * same cases and compares their outputs (scripts/check_aarch64.py writes the cases from the package's own
 * CodeSpace tables and says what the library gives on them).  Only the tables come from the case file:
 * a new kernel argument is a new named array there and one more line here.
 *
 * Both files are a run of named arrays: char name[16] (NUL-padded), int64 item size, int64 count, then
 * count items, little-endian.  CASE_FILE holds the arrays read below by name; "ops" is int64 [n][6]:
 *   (0, undo seed, apply seed, support, -, -)       qes_perturb_codes
 *   (1, first row, end row, feedback, stored, gamma_fx)   qes_es_update on those rows of seeds/supports/weights
 *   (2, -, -, -, -, -)                              back to the case's buf and residual, gating bits cleared
 * After each operation OUT_FILE gets "result" (int64 [2]: codes changed and 0, or stepped and blocked,
 * or 0 0), "buf", "gated" and "residual".
 */
#include "qes_kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ARRAYS 64

typedef struct {
    char name[17];
    int64_t size;
    int64_t count;
    void *data;
} array;

static array arrays[MAX_ARRAYS];
static int n_arrays;

static void die(const char *what, const char *detail) {
    fprintf(stderr, "qes_check_driver: %s%s\n", what, detail);
    exit(1);
}

static void read_arrays(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open ", path);
    array a;
    while (n_arrays < MAX_ARRAYS && fread(a.name, 16, 1, f) == 1) {
        a.name[16] = 0;
        if (fread(&a.size, 8, 1, f) != 1 || fread(&a.count, 8, 1, f) != 1 || a.size <= 0 || a.count < 0)
            die("truncated array header: ", a.name);
        a.data = malloc((size_t)(a.size * a.count) + 1);
        if (!a.data) die("out of memory for ", a.name);
        if ((int64_t)fread(a.data, (size_t)a.size, (size_t)a.count, f) != a.count) die("truncated array: ", a.name);
        arrays[n_arrays++] = a;
    }
    fclose(f);
}

/* The array called `name`, whose items must be `size` bytes; its item count in *count when count is not NULL. */
static void *get(const char *name, int64_t size, int64_t *count) {
    for (int i = 0; i < n_arrays; i++) {
        if (strcmp(arrays[i].name, name) == 0) {
            if (arrays[i].size != size) die("wrong item size for ", name);
            if (count) *count = arrays[i].count;
            return arrays[i].data;
        }
    }
    die("the case has no array ", name);
    return NULL;
}

static int64_t scalar(const char *name) { return *(const int64_t *)get(name, 8, NULL); }

static void put(FILE *out, const char *name, int64_t size, int64_t count, const void *data) {
    char padded[16] = {0};
    memcpy(padded, name, strnlen(name, sizeof padded));
    if (fwrite(padded, 16, 1, out) != 1 || fwrite(&size, 8, 1, out) != 1 || fwrite(&count, 8, 1, out) != 1 ||
        (int64_t)fwrite(data, (size_t)size, (size_t)count, out) != count)
        die("cannot write ", name);
}

int main(int argc, char **argv) {
    if (argc != 3) die("usage: qes_check_driver CASE_FILE OUT_FILE", "");
    read_arrays(argv[1]);

    int64_t constants[4], n;
    qes_constants(constants);
    const int64_t *want = get("constants", 8, &n);
    if (n != 4 || memcmp(constants, want, sizeof constants) != 0)
        die("the library's ABI or constants differ from the package's: rebuild one of them", "");

    int64_t width = scalar("width"), n_chunks, n_buf, n_gated, n_residual, n_gap, n_magnitude, n_ops;
    qes_layout layout = {get("low_byte", 8, NULL), get("low_shift", 8, NULL), get("high_byte", 8, NULL),
                         get("high_shift", 8, NULL), get("params", 8, NULL), width};
    const int64_t *chunks = get("chunks", 8, &n_chunks);
    qes_tensors tensors = {get("keys", 8, NULL), get("info", 8, NULL), chunks, n_chunks / 3};
    const uint64_t *gap_tail = get("gap_tail", 8, &n_gap);
    const uint64_t *magnitude_tail = get("magnitude_tail", 8, &n_magnitude);
    qes_noise noise = {gap_tail, n_gap, get("guide", 8, NULL), magnitude_tail, n_magnitude};
    const int64_t *seeds = get("seeds", 8, NULL), *weights = get("weights", 8, NULL), *ops = get("ops", 8, &n_ops);
    const int64_t *supports = get("supports", 8, NULL);
    int64_t pairs = scalar("pairs");
    int threads = (int)scalar("threads");

    const uint8_t *start_buf = get("buf", 1, &n_buf);
    const int16_t *start_residual = get("residual", 2, &n_residual);
    uint8_t *buf = malloc((size_t)n_buf), *gated = get("gated", 1, &n_gated);
    int16_t *residual = malloc((size_t)n_residual * 2);
    if (!buf || !residual) die("out of memory", "");
    memcpy(buf, start_buf, (size_t)n_buf);
    memcpy(residual, start_residual, (size_t)n_residual * 2);

    FILE *out = fopen(argv[2], "wb");
    if (!out) die("cannot create ", argv[2]);
    for (const int64_t *op = ops; op < ops + n_ops; op += 6) {
        int64_t result[2] = {0, 0};
        if (op[0] == 0) {
            result[0] = qes_perturb_codes(buf, &layout, &tensors, &noise, op[1], op[2], op[3], gated, threads);
        } else if (op[0] == 1) {
            qes_update update = {seeds + op[1] * pairs, supports + op[1], weights + op[1] * pairs, op[2] - op[1],
                                 pairs, op[5], (int)op[3], (int)op[4]};
            if (qes_es_update(buf, &layout, &tensors, &noise, &update, residual, result, threads) != 0)
                die("qes_es_update failed", "");
        } else {
            memcpy(buf, start_buf, (size_t)n_buf);
            memcpy(residual, start_residual, (size_t)n_residual * 2);
            memset(gated, 0, (size_t)n_gated);
        }
        put(out, "result", 8, 2, result);
        put(out, "buf", 1, n_buf, buf);
        put(out, "gated", 1, n_gated, gated);
        put(out, "residual", 2, n_residual, residual);
    }
    if (fclose(out) != 0) die("cannot write ", argv[2]);
    return 0;
}
