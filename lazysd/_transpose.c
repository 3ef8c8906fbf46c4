/* lazysd._transpose: a cache-blocked, SIMD, multi-threaded transposed copy.
 *
 * Native expert layouts are the HF layouts with the last two dims swapped, so every expert
 * byte of a load goes through one transposed copy. torch's strided copy_ moves 0.3-1.3 GB/s
 * there (it walks one side with a large stride); this kernel moves 8x8 blocks of 16-bit
 * elements through SSE2 registers inside tiles that fit in L2, on a few threads, with the
 * GIL released so reads go on meanwhile.
 *
 * Two entry points, driven by lazysd/transpose.py, which checks shapes, dtypes and strides:
 *
 *   copy(dst, src, batch, rows, cols, dst_b, dst_r, src_b, src_c, itemsize, threads)
 *
 * writes dst[b*dst_b + r*dst_r + c] = src[b*src_b + r + c*src_c] for b < batch, r < rows,
 * c < cols, where dst and src are addresses and strides count elements of itemsize bytes.
 * The destination's rows are contiguous; the source's columns are.
 *
 *   read(fd, offset, dst, batch, rows, cols, dst_b, dst_r, itemsize)
 *
 * does the same from a dense [batch, cols, rows] array in a file, read block by block
 * (see read_transposed below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

typedef struct {
    char *dst;
    const char *src;
    Py_ssize_t batch, rows, cols, dst_b, dst_r, src_b, src_c, itemsize;
    Py_ssize_t first, last; /* work units [first, last): (batch, tile of rows) pairs */
} Task;

/* Tile side, in elements. Measured on the 2-core build machine (bf16, 1280 x 4096 blocks,
 * 2 threads): 32 -> 3.5 GB/s, 64 -> 4.5-5.4, 128 -> 4.9-6.4, 256 -> 5.6-7.7, 512 -> 5.8-7.7,
 * 1024 -> 4.1-7.2. 256 x 256 x 2 bytes is 128 KiB a side: within L2, long contiguous runs on
 * both sides. -DTILE=... overrides it for such sweeps. */
#ifndef TILE
#define TILE 256
#endif

#ifdef __SSE2__
/* nt: non-temporal stores (d and ds 16-byte aligned); a constant at every call, so the
 * compiler makes two functions of this one. */
#define STORE16(p, v) (nt ? _mm_stream_si128((p), (v)) : _mm_storeu_si128((p), (v)))
static inline void t8x8_16_store(const uint16_t *s, Py_ssize_t ss, uint16_t *d, Py_ssize_t ds, const int nt) {
    __m128i r0 = _mm_loadu_si128((const __m128i *)(s + 0 * ss));
    __m128i r1 = _mm_loadu_si128((const __m128i *)(s + 1 * ss));
    __m128i r2 = _mm_loadu_si128((const __m128i *)(s + 2 * ss));
    __m128i r3 = _mm_loadu_si128((const __m128i *)(s + 3 * ss));
    __m128i r4 = _mm_loadu_si128((const __m128i *)(s + 4 * ss));
    __m128i r5 = _mm_loadu_si128((const __m128i *)(s + 5 * ss));
    __m128i r6 = _mm_loadu_si128((const __m128i *)(s + 6 * ss));
    __m128i r7 = _mm_loadu_si128((const __m128i *)(s + 7 * ss));
    __m128i a0 = _mm_unpacklo_epi16(r0, r1), a1 = _mm_unpackhi_epi16(r0, r1);
    __m128i a2 = _mm_unpacklo_epi16(r2, r3), a3 = _mm_unpackhi_epi16(r2, r3);
    __m128i a4 = _mm_unpacklo_epi16(r4, r5), a5 = _mm_unpackhi_epi16(r4, r5);
    __m128i a6 = _mm_unpacklo_epi16(r6, r7), a7 = _mm_unpackhi_epi16(r6, r7);
    __m128i b0 = _mm_unpacklo_epi32(a0, a2), b1 = _mm_unpackhi_epi32(a0, a2);
    __m128i b2 = _mm_unpacklo_epi32(a1, a3), b3 = _mm_unpackhi_epi32(a1, a3);
    __m128i b4 = _mm_unpacklo_epi32(a4, a6), b5 = _mm_unpackhi_epi32(a4, a6);
    __m128i b6 = _mm_unpacklo_epi32(a5, a7), b7 = _mm_unpackhi_epi32(a5, a7);
    STORE16((__m128i *)(d + 0 * ds), _mm_unpacklo_epi64(b0, b4));
    STORE16((__m128i *)(d + 1 * ds), _mm_unpackhi_epi64(b0, b4));
    STORE16((__m128i *)(d + 2 * ds), _mm_unpacklo_epi64(b1, b5));
    STORE16((__m128i *)(d + 3 * ds), _mm_unpackhi_epi64(b1, b5));
    STORE16((__m128i *)(d + 4 * ds), _mm_unpacklo_epi64(b2, b6));
    STORE16((__m128i *)(d + 5 * ds), _mm_unpackhi_epi64(b2, b6));
    STORE16((__m128i *)(d + 6 * ds), _mm_unpacklo_epi64(b3, b7));
    STORE16((__m128i *)(d + 7 * ds), _mm_unpackhi_epi64(b3, b7));
}
#undef STORE16
static inline void t8x8_16(const uint16_t *s, Py_ssize_t ss, uint16_t *d, Py_ssize_t ds) { t8x8_16_store(s, ss, d, ds, 0); }
static inline void t8x8_16nt(const uint16_t *s, Py_ssize_t ss, uint16_t *d, Py_ssize_t ds) { t8x8_16_store(s, ss, d, ds, 1); }

static inline void t4x4_32(const uint32_t *s, Py_ssize_t ss, uint32_t *d, Py_ssize_t ds) {
    __m128i r0 = _mm_loadu_si128((const __m128i *)(s + 0 * ss));
    __m128i r1 = _mm_loadu_si128((const __m128i *)(s + 1 * ss));
    __m128i r2 = _mm_loadu_si128((const __m128i *)(s + 2 * ss));
    __m128i r3 = _mm_loadu_si128((const __m128i *)(s + 3 * ss));
    __m128i a0 = _mm_unpacklo_epi32(r0, r1), a1 = _mm_unpackhi_epi32(r0, r1);
    __m128i a2 = _mm_unpacklo_epi32(r2, r3), a3 = _mm_unpackhi_epi32(r2, r3);
    _mm_storeu_si128((__m128i *)(d + 0 * ds), _mm_unpacklo_epi64(a0, a2));
    _mm_storeu_si128((__m128i *)(d + 1 * ds), _mm_unpackhi_epi64(a0, a2));
    _mm_storeu_si128((__m128i *)(d + 2 * ds), _mm_unpacklo_epi64(a1, a3));
    _mm_storeu_si128((__m128i *)(d + 3 * ds), _mm_unpackhi_epi64(a1, a3));
}
#endif

/* One tile, element type T: d[r*dr + c] = s[r + c*sc] for r < nr, c < nc. BLOCK x BLOCK
 * sub-blocks go through SIMD when BLOCK > 1; ragged edges element by element. */
#define TILE_FN(NAME, T, BLOCK, SIMD)                                                         \
    static void NAME(T *d, Py_ssize_t dr, const T *s, Py_ssize_t sc, Py_ssize_t nr,          \
                     Py_ssize_t nc) {                                                         \
        Py_ssize_t r = 0;                                                                     \
        if (BLOCK > 1) {                                                                      \
            for (; r + BLOCK <= nr; r += BLOCK) {                                             \
                Py_ssize_t c = 0;                                                             \
                for (; c + BLOCK <= nc; c += BLOCK) SIMD(s + r + c * sc, sc, d + r * dr + c, dr); \
                for (; c < nc; c++)                                                           \
                    for (Py_ssize_t k = 0; k < BLOCK; k++) d[(r + k) * dr + c] = s[r + k + c * sc]; \
            }                                                                                 \
        }                                                                                     \
        for (; r < nr; r++)                                                                   \
            for (Py_ssize_t c = 0; c < nc; c++) d[r * dr + c] = s[r + c * sc];                \
    }

#define NO_SIMD(s, ss, d, ds) ((void)0)
#ifdef __SSE2__
TILE_FN(tile16, uint16_t, 8, t8x8_16)
TILE_FN(tile16nt, uint16_t, 8, t8x8_16nt)
TILE_FN(tile32, uint32_t, 4, t4x4_32)
#else
TILE_FN(tile16, uint16_t, 1, NO_SIMD)
TILE_FN(tile32, uint32_t, 1, NO_SIMD)
#endif
TILE_FN(tile8, uint8_t, 1, NO_SIMD)
TILE_FN(tile64, uint64_t, 1, NO_SIMD)

static void tile(char *d, Py_ssize_t dr, const char *s, Py_ssize_t sc, Py_ssize_t nr, Py_ssize_t nc,
                 Py_ssize_t z) {
    switch (z) {
    case 1: tile8((uint8_t *)d, dr, (const uint8_t *)s, sc, nr, nc); break;
    case 2:
#ifdef __SSE2__
        /* Destination rows 16-byte aligned: non-temporal stores. A load's destination is
         * written once and not read back soon; plain stores would first read every line
         * they fill (read-for-ownership), a third memory pass next to the source read and
         * the write. Warm native loads of the 0.9 GiB benchmark checkpoint, 5 interleaved
         * pairs of fresh processes on the 2-core VM: 2.87-3.12 GiB/s against 2.48-2.81. */
        if (((uintptr_t)d & 15) == 0 && (dr & 7) == 0) {
            tile16nt((uint16_t *)d, dr, (const uint16_t *)s, sc, nr, nc);
            _mm_sfence(); /* ordered before whatever the caller does next with them */
            break;
        }
#endif
        tile16((uint16_t *)d, dr, (const uint16_t *)s, sc, nr, nc); break;
    case 4: tile32((uint32_t *)d, dr, (const uint32_t *)s, sc, nr, nc); break;
    default: tile64((uint64_t *)d, dr, (const uint64_t *)s, sc, nr, nc); break;
    }
}

static void *run(void *arg) {
    const Task *t = (const Task *)arg;
    const Py_ssize_t row_tiles = (t->rows + TILE - 1) / TILE, z = t->itemsize;
    for (Py_ssize_t u = t->first; u < t->last; u++) {
        const Py_ssize_t b = u / row_tiles, r0 = (u % row_tiles) * TILE;
        const Py_ssize_t nr = t->rows - r0 < TILE ? t->rows - r0 : TILE;
        for (Py_ssize_t c0 = 0; c0 < t->cols; c0 += TILE) {
            const Py_ssize_t nc = t->cols - c0 < TILE ? t->cols - c0 : TILE;
            tile(t->dst + z * (b * t->dst_b + r0 * t->dst_r + c0), t->dst_r,
                 t->src + z * (b * t->src_b + r0 + c0 * t->src_c), t->src_c, nr, nc, z);
        }
    }
    return NULL;
}

static int valid_itemsize(Py_ssize_t z) {
    if (z == 1 || z == 2 || z == 4 || z == 8) return 1;
    PyErr_Format(PyExc_ValueError, "itemsize %zd is not 1, 2, 4 or 8", z);
    return 0;
}

enum { MAX_THREADS = 64 };

static PyObject *copy(PyObject *self, PyObject *args) {
    unsigned long long dst, src;
    Task t;
    int threads;
    if (!PyArg_ParseTuple(args, "KKnnnnnnnni", &dst, &src, &t.batch, &t.rows, &t.cols, &t.dst_b,
                          &t.dst_r, &t.src_b, &t.src_c, &t.itemsize, &threads))
        return NULL;
    if (!valid_itemsize(t.itemsize)) return NULL;
    if (t.batch <= 0 || t.rows <= 0 || t.cols <= 0) Py_RETURN_NONE;
    t.dst = (char *)(uintptr_t)dst;
    t.src = (const char *)(uintptr_t)src;
    const Py_ssize_t units = t.batch * ((t.rows + TILE - 1) / TILE);
    int n = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (n > units) n = (int)units;
    Task tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < n; i++) {
        tasks[i] = t;
        tasks[i].first = units * i / n;
        tasks[i].last = units * (i + 1) / n;
        /* Thread 0 is this one; a thread that cannot start leaves its share to this one. */
        started[i] = i > 0 && pthread_create(&ids[i], NULL, run, &tasks[i]) == 0;
    }
    for (int i = 0; i < n; i++)
        if (!started[i]) run(&tasks[i]);
    for (int i = 1; i < n; i++)
        if (started[i]) pthread_join(ids[i], NULL);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Source rows read per block: about this many bytes, so a block is still in L2 when it is
 * transposed out of it, and a multiple of 8 rows for the SIMD blocks. */
enum { BLOCK_BYTES = 256 * 1024 };

/* read(fd, offset, dst, batch, rows, cols, dst_b, dst_r, itemsize) -> bytes read
 *
 * The file holds a dense [batch, cols, rows] array at offset; writes its transpose to
 * dst[b*dst_b + r*dst_r + c]. Reads a block of source rows into a small buffer and
 * transposes it out while it is still in cache: the bytes cross memory once on the way in
 * and once on the way out, instead of twice through a staging buffer. Returns fewer bytes
 * than the array's size only where the file ended; raises OSError for a failed read. */
static PyObject *read_transposed(PyObject *self, PyObject *args) {
    int fd;
    long long offset;
    unsigned long long dst_addr;
    Py_ssize_t batch, rows, cols, dst_b, dst_r, z;
    if (!PyArg_ParseTuple(args, "iLKnnnnnn", &fd, &offset, &dst_addr, &batch, &rows, &cols, &dst_b, &dst_r, &z))
        return NULL;
    if (!valid_itemsize(z)) return NULL;
    if (batch <= 0 || rows <= 0 || cols <= 0) return PyLong_FromLong(0);
    const Py_ssize_t row_bytes = rows * z;
    Py_ssize_t per = BLOCK_BYTES / row_bytes;
    per = per < 8 ? 8 : per - per % 8;
    if (per > cols) per = cols;
    char *buf = malloc((size_t)(per * row_bytes));
    if (buf == NULL) return PyErr_NoMemory();
    char *dst = (char *)(uintptr_t)dst_addr;
    long long done = 0;
    int err = 0, ended = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < batch && !err && !ended; b++) {
        for (Py_ssize_t c0 = 0; c0 < cols && !err && !ended; c0 += per) {
            const Py_ssize_t nc = cols - c0 < per ? cols - c0 : per, want = nc * row_bytes;
            Py_ssize_t got = 0;
            while (got < want) {
                ssize_t n = pread(fd, buf + got, (size_t)(want - got), (off_t)(offset + done + got));
                if (n < 0 && errno == EINTR) continue;
                if (n < 0) { err = errno; break; }
                if (n == 0) { ended = 1; break; }
                got += n;
            }
            if (err || ended) { done += got; break; }
            for (Py_ssize_t r0 = 0; r0 < rows; r0 += TILE) {
                const Py_ssize_t nr = rows - r0 < TILE ? rows - r0 : TILE;
                tile(dst + z * (b * dst_b + r0 * dst_r + c0), dst_r, buf + z * r0, rows, nr, nc, z);
            }
            done += want;
        }
    }
    Py_END_ALLOW_THREADS
    free(buf);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(done);
}

static PyMethodDef methods[] = {
    {"copy", copy, METH_VARARGS,
     "copy(dst, src, batch, rows, cols, dst_b, dst_r, src_b, src_c, itemsize, threads): "
     "dst[b, r, c] = src[b, c, r] over raw addresses; see lazysd/transpose.py."},
    {"read", read_transposed, METH_VARARGS,
     "read(fd, offset, dst, batch, rows, cols, dst_b, dst_r, itemsize) -> bytes read: "
     "pread a dense [batch, cols, rows] array and write its transpose; see lazysd/transpose.py."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_transpose", NULL, -1, methods};

PyMODINIT_FUNC PyInit__transpose(void) { return PyModule_Create(&module); }
