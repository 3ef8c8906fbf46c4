/* lazysd._transpose: a cache-blocked, SIMD, multi-threaded transposed copy.
 *
 * Native expert layouts are the HF layouts with the last two dims swapped, so every expert
 * byte of a load goes through one transposed copy. torch's strided copy_ moves 0.3-1.3 GB/s
 * there (it walks one side with a large stride); this kernel transposes square blocks in SIMD
 * registers inside tiles that fit in L2, on a few threads, with the GIL released so reads go
 * on meanwhile.
 *
 * Three entry points, driven by lazysd/transpose.py, which checks shapes, dtypes and strides:
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
 *
 *   reads(jobs, threads, probe)
 *
 * runs many plain and transposing reads of cached file bytes at once on a few threads kept
 * for the next call (see reads below): a load's warm path.
 *
 * Instruction sets. The build uses the compiler's baseline flags only (the wheel must run on
 * any x86-64, and the file must build on other machines), so the AVX2 and AVX-512 kernels are
 * compiled per function (target attributes) and the widest the CPU supports is chosen once at
 * import (__builtin_cpu_supports, which also checks that the OS saves the wide registers).
 * isa() names the one in use, isas() those available, set_isa(name) forces one (the tests run
 * every one against torch). Elsewhere: SSE2 on any x86-64, plain C on other machines.
 *
 * Measured on the 2-core AMD EPYC build VM (AVX-512; shared, so medians of 5 fresh processes,
 * each the best of 7), the benchmark checkpoint's 3-D experts: 2 x [40, 512, 1024] and
 * 2 x [40, 1024, 512] bf16, 0.156 GiB, warm, into dense [B, R, C] destinations and into
 * column halves of [B, R, 2C] ones; GiB/s, the 8x8 SSE2 kernel before this one -> AVX-512
 * (AVX2, SSE2 of this file):
 *
 *                      dense                        half of a wider tensor
 *   read, 1 thread     3.93 -> 6.00 (5.42, 4.10)    3.95 -> 5.33 (5.03, 4.06)
 *   read, 2 threads    3.85 -> 5.95 (5.17, 3.97)    3.33 -> 5.77 (5.16, 3.24)
 *   copy, 1 thread     5.70 -> 10.49 (9.58, 5.92)   5.66 -> 8.87 (8.27, 5.52)
 *   copy, 2 threads    5.61 -> 10.21 (9.46, 6.16)   5.61 -> 8.96 (8.79, 4.97)
 *
 * against a plain pread of the same bytes into the dense destinations at 6.20 GiB/s (1 thread)
 * and 6.89 (2), a memcpy at 8.23 (1; 2 threads were too noisy to quote here: 4.9-11.8): `read`
 * on one thread went from 0.63x to 0.97x of that pread. (2 threads of `read`: one call per
 * thread, two tensors each; of `copy`: its threads argument.) Other item sizes, copy of
 * 80 MiB from [B, 512, 2 KiB rows], one thread, one run: 1-byte 0.40 -> 5.56 GiB/s (it had no
 * SIMD path), 4-byte 5.21 -> 12.50, 8-byte 3.01 -> 13.01 (no SIMD path either).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#if defined(__SSE2__) && (defined(__x86_64__) || defined(__i386__))
#define X86_SSE2 1
#include <immintrin.h>
#if defined(__GNUC__) || defined(__clang__)
#define X86_WIDE 1 /* AVX2 / AVX-512 functions through target attributes */
#endif
#endif

/* A tile function: d[r*dr + c] = s[r + c*sc] for r < nr, c < nc; d, s in bytes, dr, sc in
 * elements of the function's item size. */
typedef void (*tile_fn)(char *d, Py_ssize_t dr, const char *s, Py_ssize_t sc, Py_ssize_t nr, Py_ssize_t nc);

/* Tile side, in elements. Measured on the 2-core build machine (bf16, 1280 x 4096 blocks,
 * 2 threads, SSE2 kernel): 32 -> 3.5 GB/s, 64 -> 4.5-5.4, 128 -> 4.9-6.4, 256 -> 5.6-7.7,
 * 512 -> 5.8-7.7, 1024 -> 4.1-7.2. 256 x 256 x 2 bytes is 128 KiB a side: within L2, long
 * contiguous runs on both sides. With the AVX2 / AVX-512 blocks the shape mattered less (copy
 * of the benchmark checkpoint's [40, 512, 1024] and [40, 1024, 512] bf16 experts, one thread,
 * rows x columns of a tile: 256 x 256 8.4 / 6.1 GiB/s (AVX2 / AVX-512 before prefetching),
 * 512 x 128 9.0 / 5.9, 1024 x 64 6.7 / 6.0, 128 x 512 9.2 / 6.6, 1024 x 256 9.3 / 6.4, all
 * within this shared machine's noise but 1024 x 64). -DTILE=... overrides it for such sweeps. */
#ifndef TILE
#define TILE 256
#endif

/* ---- scalar: the portable path, and every kernel's ragged edges ---- */

#define SCALAR_TILE(NAME, T)                                                                  \
    static void NAME(char *d_, Py_ssize_t dr, const char *s_, Py_ssize_t sc, Py_ssize_t nr, \
                     Py_ssize_t nc) {                                                         \
        T *d = (T *)d_;                                                                       \
        const T *s = (const T *)s_;                                                           \
        for (Py_ssize_t r = 0; r < nr; r++)                                                   \
            for (Py_ssize_t c = 0; c < nc; c++) d[r * dr + c] = s[r + c * sc];                \
    }
SCALAR_TILE(scalar1, uint8_t)
SCALAR_TILE(scalar2, uint16_t)
SCALAR_TILE(scalar4, uint32_t)
SCALAR_TILE(scalar8, uint64_t)

#ifdef X86_SSE2
/* ---- SIMD blocks ----
 *
 * A 128-bit register holds E = 16 / itemsize elements. An E x E block is transposed in
 * log2(E) rounds of E unpacks of single elements, pairing register i with i + E/2 (a perfect
 * shuffle: after the rounds, register j holds column j). The same instructions on a register
 * of L 128-bit lanes transpose L blocks side by side: lane l of input register k is source row
 * c + k + E*l, so output register j is E*L consecutive elements of destination row r + j, one
 * store of 16*L bytes (a whole 64-byte cache line with AVX-512).
 *
 * nt: non-temporal stores (every destination row aligned to the register). A load's
 * destination is written once and not read back soon; plain stores would first read every
 * line they fill (read-for-ownership), a third memory pass next to the source read and the
 * write. Warm native loads of the 0.9 GiB benchmark checkpoint, 5 interleaved pairs of fresh
 * processes on the 2-core VM (SSE2 kernel): 2.87-3.12 GiB/s against 2.48-2.81. nt is a
 * constant at every call, so each block function is compiled twice. */
#define UNROLL _Pragma("GCC unroll 16")
/* Stores the H x R registers out[h][i] as rows i of a block, H registers side by side. */
#define STORE_ROWS(V, H, R, STOREU, STREAM)                                                    \
    UNROLL for (int i = 0; i < R; i++) UNROLL for (int h = 0; h < H; h++) {                   \
        if (nt) STREAM((V *)(d + i * ds) + h, out[h][i]);                                      \
        else STOREU((V *)(d + i * ds) + h, out[h][i]);                                         \
    }
#define BLOCK_FN(NAME, ATTR, V, E, H, LOAD, LO, HI, STOREU, STREAM)                            \
    ATTR static inline __attribute__((always_inline)) void NAME(const char *s, Py_ssize_t ss, char *d, \
                                                                Py_ssize_t ds, const int nt) { \
        V out[H][E];                                                                          \
        UNROLL for (int h = 0; h < H; h++) {                                                  \
            const Py_ssize_t lanes = sizeof(V) / 16;                                          \
            const char *sh = s + h * E * lanes * ss;                                          \
            V x[E], y[E];                                                                     \
            UNROLL for (int k = 0; k < E; k++) x[k] = LOAD(sh + k * ss, E * ss);              \
            UNROLL for (int n = 1; n < E; n *= 2) {                                           \
                UNROLL for (int i = 0; i < E / 2; i++) {                                      \
                    y[2 * i] = LO(x[i], x[i + E / 2]);                                        \
                    y[2 * i + 1] = HI(x[i], x[i + E / 2]);                                    \
                }                                                                             \
                UNROLL for (int i = 0; i < E; i++) x[i] = y[i];                               \
            }                                                                                 \
            UNROLL for (int i = 0; i < E; i++) out[h][i] = x[i];                              \
        }                                                                                     \
        STORE_ROWS(V, H, E, STOREU, STREAM)                                                   \
    }

/* A whole-line block: V = E*L rows by V columns. Input register k is V elements of source
 * row c + k (a whole 64-byte line with AVX-512, used at once, so it need not stay in L1 for a
 * later pass). Each group of E registers is transposed lane by lane as above; then output
 * row E*l + j gathers lane l of register j of every group (LANES, an L x L transpose of
 * 128-bit lanes). Where a tile's source rows are a power of two apart they fall into a few
 * L1 sets; a kernel that reads 16 bytes of each row per pass found them evicted before the
 * next pass and read everything from L2 four times (AVX-512, lane-parallel blocks of
 * 8 x 32, transposing a [128, 1024] bf16 block out of L2 into memory: 5.6 GiB/s; with rows
 * 2 KiB + 64 bytes apart 14 GiB/s; this block 14-16 GiB/s at 2 KiB).
 *
 * Each load also asks for the row's next line into L2 (prefetcht1): the next block down the
 * same rows needs it, a tile's width of blocks later. Without it the AVX-512 block read
 * memory slower than the AVX2 one, whose half-line loads leave the second half to an L2 hit
 * (copy of the benchmark checkpoint's [40, 512, 1024] and [40, 1024, 512] bf16 experts, one
 * thread: AVX-512 6.5 GiB/s, AVX2 9.2; prefetching the next line into L2: 10.4 and 9.0; into
 * L1: 8.4; two lines ahead: 10.2). The `read` path, whose source is already in L2, measured
 * the same either way. Walking a tile's blocks column by column instead (each source row
 * read line after line) measured slower: AVX2 7.1-7.3 GiB/s against 8.4-9.4. */
#define FULL_BLOCK_FN(NAME, ATTR, V, E, L, H, LOADV, LO, HI, LANES, STOREU, STREAM)              \
    ATTR static inline __attribute__((always_inline)) void NAME(const char *s, Py_ssize_t ss, char *d, \
                                                                Py_ssize_t ds, const int nt) { \
        V out[H][E * L];                                                                      \
        UNROLL for (int h = 0; h < H; h++) {                                                  \
            const char *sh = s + h * E * L * ss;                                              \
            V x[E * L], y[E];                                                                 \
            UNROLL for (int k = 0; k < E * L; k++) {                                          \
                x[k] = LOADV((const void *)(sh + k * ss));                                    \
                _mm_prefetch(sh + k * ss + 64, _MM_HINT_T1);                                  \
            }                                                                                 \
            UNROLL for (int g = 0; g < L; g++) {                                              \
                V *xg = x + g * E;                                                            \
                UNROLL for (int n = 1; n < E; n *= 2) {                                       \
                    UNROLL for (int i = 0; i < E / 2; i++) {                                  \
                        y[2 * i] = LO(xg[i], xg[i + E / 2]);                                  \
                        y[2 * i + 1] = HI(xg[i], xg[i + E / 2]);                              \
                    }                                                                         \
                    UNROLL for (int i = 0; i < E; i++) xg[i] = y[i];                          \
                }                                                                             \
            }                                                                                 \
            UNROLL for (int j = 0; j < E; j++) {                                              \
                V o[L];                                                                       \
                LANES(o, x, j, E);                                                            \
                UNROLL for (int l = 0; l < L; l++) out[h][E * l + j] = o[l];                  \
            }                                                                                 \
        }                                                                                     \
        STORE_ROWS(V, H, E * L, STOREU, STREAM)                                               \
    }

/* A tile through BLOCKs of RB rows x W columns, aligning the destination first: where the
 * destination's row stride is a multiple of A bytes (64 if it can, else the register), the
 * first columns up to an A-byte boundary go through NARROW (the SSE2 E x E block) and plain
 * stores, the rest through non-temporal stores of whole registers. Ragged edges: NARROW
 * blocks, then element by element. */
#define SIMD_TILE(NAME, ATTR, T, E, RB, W, VBYTES, BLOCK, NARROW)                              \
    ATTR static void NAME(char *d, Py_ssize_t dr, const char *s, Py_ssize_t sc, Py_ssize_t nr, \
                          Py_ssize_t nc) {                                                    \
        const Py_ssize_t z = sizeof(T), ds = dr * z, ss = sc * z;                             \
        Py_ssize_t peel = 0, a = 64;                                                          \
        while (a >= VBYTES && ds % a) a /= 2;                                                 \
        const int nt = a >= VBYTES && (uintptr_t)d % z == 0 &&                                \
                       (peel = (Py_ssize_t)((a - (uintptr_t)d % a) % a) / z) + W <= nc;     \
        if (!nt) peel = 0;                                                                    \
        /* Whole blocks in rows [0, r_end), columns [peel, c_end); the rest around them. */   \
        const Py_ssize_t r_end = nr - nr % (RB), c_end = nc - (nc - peel) % (W);                 \
        if (nt) {                                                                             \
            for (Py_ssize_t r = 0; r < r_end; r += RB)                                        \
                for (Py_ssize_t c = peel; c < c_end; c += W)                                  \
                    BLOCK(s + r * z + c * ss, ss, d + r * ds + c * z, ds, 1);                 \
        } else {                                                                              \
            for (Py_ssize_t r = 0; r < r_end; r += RB)                                        \
                for (Py_ssize_t c = peel; c < c_end; c += W)                                  \
                    BLOCK(s + r * z + c * ss, ss, d + r * ds + c * z, ds, 0);                 \
        }                                                                                     \
        Py_ssize_t r = 0;                                                                     \
        for (; r < r_end; r += E) {                                                           \
            NARROW_COLS(T, E, NARROW, r, 0, peel);                                            \
            NARROW_COLS(T, E, NARROW, r, c_end, nc);                                          \
        }                                                                                     \
        for (; r + E <= nr; r += E) NARROW_COLS(T, E, NARROW, r, 0, nc);                      \
        for (; r < nr; r++)                                                                   \
            for (Py_ssize_t c = 0; c < nc; c++)                                               \
                *(T *)(d + r * ds + c * z) = *(const T *)(s + r * z + c * ss);                \
        if (nt) _mm_sfence(); /* ordered before whatever the caller does next with them */  \
    }

/* Rows [r, r + E), columns [from, to) of a tile: E x E blocks with plain stores, then column
 * by column. */
#define NARROW_COLS(T, E, NARROW, r, from, to)                                                 \
    do {                                                                                      \
        Py_ssize_t c_ = (from);                                                               \
        for (; c_ + E <= (to); c_ += E) NARROW(s + (r) * z + c_ * ss, ss, d + (r) * ds + c_ * z, ds, 0); \
        for (; c_ < (to); c_++)                                                               \
            for (Py_ssize_t k = 0; k < E; k++)                                                \
                *(T *)(d + ((r) + k) * ds + c_ * z) = *(const T *)(s + ((r) + k) * z + c_ * ss); \
    } while (0)

/* SSE2: one lane, 16-byte stores. */
#define LOAD_SSE2(p, step) _mm_loadu_si128((const __m128i *)(p))
#define SSE2_SET(Z, E, T, LO, HI)                                                              \
    BLOCK_FN(sse2_block##Z, , __m128i, E, 1, LOAD_SSE2, LO, HI, _mm_storeu_si128, _mm_stream_si128) \
    SIMD_TILE(sse2_tile##Z, , T, E, E, E, 16, sse2_block##Z, sse2_block##Z)
SSE2_SET(1, 16, uint8_t, _mm_unpacklo_epi8, _mm_unpackhi_epi8)
SSE2_SET(2, 8, uint16_t, _mm_unpacklo_epi16, _mm_unpackhi_epi16)
SSE2_SET(4, 4, uint32_t, _mm_unpacklo_epi32, _mm_unpackhi_epi32)
SSE2_SET(8, 2, uint64_t, _mm_unpacklo_epi64, _mm_unpackhi_epi64)
#endif /* X86_SSE2 */

#ifdef X86_WIDE
/* AVX2: two lanes; 16 x 16 whole-register blocks of 2-byte items (8 x 8 of 4-byte, 4 x 4 of
 * 8-byte), lane-parallel 16 x 32 blocks of bytes (32 x 32 would not fit in its 16 registers),
 * two blocks side by side (H = 2) so each destination row gets a whole 64-byte line. Half-line
 * non-temporal stores flush partly filled write-combining buffers: transposing a [128, 1024]
 * bf16 block out of L2 into memory, one thread, ran at 2.5 GiB/s with 32-byte non-temporal
 * stores, 6.2-7.5 with plain ones, 8-11 with two side by side. */
#define AVX2 __attribute__((target("avx2")))
#define LOAD_AVX2(p, step)                                                                     \
    _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p))),    \
                            _mm_loadu_si128((const __m128i *)((p) + (step))), 1)
#define LANES_AVX2(o, x, j, E)                                                                 \
    do {                                                                                      \
        o[0] = _mm256_permute2x128_si256(x[j], x[E + j], 0x20);                              \
        o[1] = _mm256_permute2x128_si256(x[j], x[E + j], 0x31);                              \
    } while (0)
#define AVX2_FULL(Z, E, T, LO, HI)                                                             \
    FULL_BLOCK_FN(avx2_block##Z, AVX2, __m256i, E, 2, 2, _mm256_loadu_si256, LO, HI, LANES_AVX2,  \
                  _mm256_storeu_si256, _mm256_stream_si256)                                   \
    SIMD_TILE(avx2_tile##Z, AVX2, T, E, (2 * E), (4 * E), 32, avx2_block##Z, sse2_block##Z)
BLOCK_FN(avx2_block1, AVX2, __m256i, 16, 2, LOAD_AVX2, _mm256_unpacklo_epi8, _mm256_unpackhi_epi8,
         _mm256_storeu_si256, _mm256_stream_si256)
SIMD_TILE(avx2_tile1, AVX2, uint8_t, 16, 16, 64, 32, avx2_block1, sse2_block1)
AVX2_FULL(2, 8, uint16_t, _mm256_unpacklo_epi16, _mm256_unpackhi_epi16)
AVX2_FULL(4, 4, uint32_t, _mm256_unpacklo_epi32, _mm256_unpackhi_epi32)
AVX2_FULL(8, 2, uint64_t, _mm256_unpacklo_epi64, _mm256_unpackhi_epi64)

/* AVX-512 (F for 32/64-bit unpacks, BW for 8/16-bit): four lanes, 64-byte stores; 32 x 32
 * whole-line blocks of 2-byte items (16 x 16 of 4-byte, 8 x 8 of 8-byte), lane-parallel
 * 16 x 64 blocks of bytes. */
#define AVX512 __attribute__((target("avx512f,avx512bw")))
#define LOAD_AVX512(p, step)                                                                   \
    _mm512_inserti64x4(_mm512_castsi256_si512(LOAD_AVX2(p, step)), LOAD_AVX2((p) + 2 * (step), step), 1)
#define STORE_AVX512(p, v) _mm512_storeu_si512((void *)(p), (v))
#define STREAM_AVX512(p, v) _mm512_stream_si512((void *)(p), (v))
#define LANES_AVX512(o, x, j, E)                                                               \
    do {                                                                                      \
        const __m512i t0 = _mm512_shuffle_i64x2(x[j], x[E + j], 0x44);                      \
        const __m512i t1 = _mm512_shuffle_i64x2(x[j], x[E + j], 0xEE);                      \
        const __m512i t2 = _mm512_shuffle_i64x2(x[2 * E + j], x[3 * E + j], 0x44);          \
        const __m512i t3 = _mm512_shuffle_i64x2(x[2 * E + j], x[3 * E + j], 0xEE);          \
        o[0] = _mm512_shuffle_i64x2(t0, t2, 0x88);                                           \
        o[1] = _mm512_shuffle_i64x2(t0, t2, 0xDD);                                           \
        o[2] = _mm512_shuffle_i64x2(t1, t3, 0x88);                                           \
        o[3] = _mm512_shuffle_i64x2(t1, t3, 0xDD);                                           \
    } while (0)
#define AVX512_FULL(Z, E, T, LO, HI)                                                           \
    FULL_BLOCK_FN(avx512_block##Z, AVX512, __m512i, E, 4, 1, _mm512_loadu_si512, LO, HI, LANES_AVX512, \
                  STORE_AVX512, STREAM_AVX512)                                                \
    SIMD_TILE(avx512_tile##Z, AVX512, T, E, (4 * E), (4 * E), 64, avx512_block##Z, sse2_block##Z)
BLOCK_FN(avx512_block1, AVX512, __m512i, 16, 1, LOAD_AVX512, _mm512_unpacklo_epi8, _mm512_unpackhi_epi8,
         STORE_AVX512, STREAM_AVX512)
SIMD_TILE(avx512_tile1, AVX512, uint8_t, 16, 16, 64, 64, avx512_block1, sse2_block1)
AVX512_FULL(2, 8, uint16_t, _mm512_unpacklo_epi16, _mm512_unpackhi_epi16)
AVX512_FULL(4, 4, uint32_t, _mm512_unpacklo_epi32, _mm512_unpackhi_epi32)
AVX512_FULL(8, 2, uint64_t, _mm512_unpacklo_epi64, _mm512_unpackhi_epi64)
#endif /* X86_WIDE */

/* ---- instruction sets, chosen once at import ---- */

typedef struct {
    const char *name;
    tile_fn fn[4]; /* item sizes 1, 2, 4, 8 */
} Isa;

static const Isa ISAS[] = {
    {"scalar", {scalar1, scalar2, scalar4, scalar8}},
#ifdef X86_SSE2
    {"sse2", {sse2_tile1, sse2_tile2, sse2_tile4, sse2_tile8}},
#endif
#ifdef X86_WIDE
    {"avx2", {avx2_tile1, avx2_tile2, avx2_tile4, avx2_tile8}},
    {"avx512", {avx512_tile1, avx512_tile2, avx512_tile4, avx512_tile8}},
#endif
};
enum { N_ISAS = sizeof(ISAS) / sizeof(ISAS[0]) };

static int isa_supported(const Isa *isa) {
#ifdef X86_WIDE
    if (strcmp(isa->name, "avx2") == 0) return __builtin_cpu_supports("avx2");
    if (strcmp(isa->name, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#endif
    (void)isa;
    return 1;
}

static const Isa *isa_in_use = &ISAS[0];

static tile_fn tile_for(Py_ssize_t itemsize) {
    const Isa *isa = isa_in_use;
    return isa->fn[itemsize == 1 ? 0 : itemsize == 2 ? 1 : itemsize == 4 ? 2 : 3];
}

/* ---- copy: tiles of an array in memory, on threads ---- */

typedef struct {
    char *dst;
    const char *src;
    tile_fn tile;
    Py_ssize_t batch, rows, cols, dst_b, dst_r, src_b, src_c, itemsize;
    Py_ssize_t first, last; /* work units [first, last): (batch, tile of rows) pairs */
} Task;

static void *run(void *arg) {
    const Task *t = (const Task *)arg;
    const Py_ssize_t row_tiles = (t->rows + TILE - 1) / TILE, z = t->itemsize;
    for (Py_ssize_t u = t->first; u < t->last; u++) {
        const Py_ssize_t b = u / row_tiles, r0 = (u % row_tiles) * TILE;
        const Py_ssize_t nr = t->rows - r0 < TILE ? t->rows - r0 : TILE;
        for (Py_ssize_t c0 = 0; c0 < t->cols; c0 += TILE) {
            const Py_ssize_t nc = t->cols - c0 < TILE ? t->cols - c0 : TILE;
            t->tile(t->dst + z * (b * t->dst_b + r0 * t->dst_r + c0), t->dst_r,
                    t->src + z * (b * t->src_b + r0 + c0 * t->src_c), t->src_c, nr, nc);
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
    t.tile = tile_for(t.itemsize);
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

/* ---- read: a file's array, block by block through cache ---- */

/* Source rows read per block: about this many bytes, so a block is still in L2 (or close, in
 * L3) when it is transposed out of it, and a multiple of 64 rows (16 for long rows) for the
 * SIMD blocks. Larger blocks give each destination row longer runs per block. Every expert of
 * the benchmark checkpoints read warm through reads() (AVX-512, 1 MiB L2 a core), x a plain
 * pread of the same bytes, interleaved in one process, medians of 9: 256 KiB 0.85 / 0.95
 * (3gb / 1gb, 2 threads), 512 KiB 0.90 / 0.98, 1 MiB 0.91 / 0.92; one thread 0.84 -> 0.88. */
#ifndef BLOCK_BYTES
#define BLOCK_BYTES (512 * 1024)
#endif

/* Source rows (destination columns) per block of rows of row_bytes bytes (> 0), at most cols. */
static Py_ssize_t block_cols(Py_ssize_t row_bytes, Py_ssize_t cols) {
    Py_ssize_t per = BLOCK_BYTES / row_bytes;
    per = per < 16 ? 16 : per < 64 ? per - per % 16 : per - per % 64;
    return per > cols ? cols : per;
}

/* Transposes a block of nc source rows of `rows` items (buf) into columns c0.. of batch
 * element b of dst (row stride dst_r, batch stride dst_b; strides in items of z bytes). */
static void put_block(tile_fn tile, char *dst, Py_ssize_t dst_b, Py_ssize_t dst_r, Py_ssize_t b, Py_ssize_t c0,
                      const char *buf, Py_ssize_t rows, Py_ssize_t nc, Py_ssize_t z) {
    for (Py_ssize_t r0 = 0; r0 < rows; r0 += TILE) {
        const Py_ssize_t nr = rows - r0 < TILE ? rows - r0 : TILE;
        tile(dst + z * (b * dst_b + r0 * dst_r + c0), dst_r, buf + z * r0, rows, nr, nc);
    }
}

/* Reads n bytes from fd at off into buf; returns the bytes read (fewer only where the file
 * ended) or -errno. (Reading each row into a padded buffer row, an odd number of cache lines
 * apart, with preadv, cost more in the read than it saved in the transpose: the AVX-512 and
 * AVX2 blocks use whole lines of each source row at once. [4, 40, 512, 1024] of bf16 read
 * into [40, 1024, 512] destinations, one thread: 4.0 GiB/s padded, 5.1 not.) */
static long long read_all(int fd, long long off, char *buf, long long n) {
    long long got = 0;
    while (got < n) {
        const ssize_t k = pread(fd, buf + got, (size_t)(n - got), (off_t)(off + got));
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return -errno;
        if (k == 0) break;
        got += k;
    }
    return got;
}

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
    const tile_fn tile = tile_for(z);
    const Py_ssize_t row_bytes = rows * z, per = block_cols(row_bytes, cols);
    void *mem = NULL;
    if (posix_memalign(&mem, 4096, (size_t)(per * row_bytes)) != 0) return PyErr_NoMemory();
    char *buf = mem;
    char *dst = (char *)(uintptr_t)dst_addr;
    long long done = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < batch; b++) {
        Py_ssize_t c0 = 0;
        for (; c0 < cols; c0 += per) {
            const Py_ssize_t nc = cols - c0 < per ? cols - c0 : per;
            const long long got = read_all(fd, offset + done, buf, (long long)nc * row_bytes);
            if (got < 0) err = (int)-got;
            if (got != (long long)nc * row_bytes) { done += got > 0 ? got : 0; break; }
            put_block(tile, dst, dst_b, dst_r, b, c0, buf, rows, nc, z);
            done += got;
        }
        if (c0 < cols) break; /* failed or ended */
    }
    Py_END_ALLOW_THREADS
    free(mem);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(done);
}

/* ---- reads: many ranges of cached files at once, on threads, without the GIL ----
 *
 * reads(jobs, threads, probe) -> [bytes read per job]
 *
 * A job is (fd, offset, dst, nbytes): pread nbytes at offset into dst; or (fd, offset, dst,
 * batch, rows, cols, dst_b, dst_r, itemsize): what read() does. The jobs are cut into units
 * (a plain job into equal pieces, a transposed one into its blocks) that the calling thread
 * and threads - 1 others take off one atomic counter until none is left.
 *
 * Why: a fill is a few to a few dozen such jobs. Run from Python, each job took a worker
 * hand-off and the GIL back and forth between the threads; on a small VM a thread woken for
 * the GIL waits tens of microseconds, so splitting a 1-2 MiB tensor over two threads made it
 * slower than one thread alone. Here the GIL is released once, and the units keep every
 * thread busy to the end of the fill.
 *
 * probe: first ask whether each job's bytes are in the page cache (cached_range); from the
 * first job that is not, the jobs are skipped (their result is -EAGAIN), for the caller to
 * read them in bulk (O_DIRECT, or from the read-ahead: lazysd/pread.py). Not probed further:
 * where the system has no cachestat, a probe that misses starts a read of its page, which
 * would make the caller's own probes of a cold stretch find it cached. A job that fails or
 * meets the end of the file reports -errno or fewer bytes than it asked for; the caller reads
 * it again its own way, which raises the error that names the file and key. */

typedef struct {
    int fd;
    long long offset, nbytes; /* nbytes: the job's bytes in the file */
    char *dst;
    Py_ssize_t batch, rows, cols, dst_b, dst_r, z, per; /* rows == 0: a plain read */
    long long unit, units, first;                        /* plain: bytes per unit; units; first unit's index */
} RJob;

typedef struct {
    RJob *jobs;
    Py_ssize_t njobs;
    long long units;
    long long next;  /* the next unit to take (atomic) */
    long long *got;  /* per job: bytes read (atomic) */
    int *err;        /* per job: errno of a failed unit, -1 a short read, 0 none (atomic) */
    size_t buf;      /* the largest transposed block: each thread's buffer */
    tile_fn tiles[4];
} RBatch;

/* The job holding unit u: the last whose first unit is <= u. */
static Py_ssize_t job_of(const RBatch *B, long long u) {
    Py_ssize_t lo = 0, hi = B->njobs - 1;
    while (lo < hi) {
        const Py_ssize_t mid = (lo + hi + 1) / 2;
        if (B->jobs[mid].first <= u) lo = mid; else hi = mid - 1;
    }
    return lo;
}

static void *read_units(void *arg) {
    RBatch *B = (RBatch *)arg;
    void *mem = NULL;
    if (B->buf && posix_memalign(&mem, 4096, B->buf) != 0) return NULL; /* the others do its share */
    char *buf = mem;
    for (;;) {
        const long long u = __atomic_fetch_add(&B->next, 1, __ATOMIC_RELAXED);
        if (u >= B->units) break;
        const Py_ssize_t j = job_of(B, u);
        const RJob *J = &B->jobs[j];
        if (__atomic_load_n(&B->err[j], __ATOMIC_RELAXED)) continue; /* the job is read again anyway */
        const long long k = u - J->first;
        long long want, got;
        if (J->rows == 0) {
            const long long at = k * J->unit;
            want = J->nbytes - at < J->unit ? J->nbytes - at : J->unit;
            got = read_all(J->fd, J->offset + at, J->dst + at, want);
        } else {
            /* A unit is a whole batch element (an expert), its blocks in turn, so that threads
             * write different pages: two threads filling columns of the same rows of fresh
             * memory fault the same pages and page tables (assign=True of the 1.85 GiB EP
             * benchmark checkpoint: 1.08 s with a block a unit, 0.75 s with one thread a
             * block of the old path). One 2-D array: a block a unit. */
            const Py_ssize_t blocks = (J->cols + J->per - 1) / J->per, row_bytes = J->rows * J->z;
            const Py_ssize_t b = J->batch > 1 ? k : 0, first = J->batch > 1 ? 0 : k;
            const Py_ssize_t last = J->batch > 1 ? blocks : k + 1;
            const tile_fn tile = B->tiles[J->z == 1 ? 0 : J->z == 2 ? 1 : J->z == 4 ? 2 : 3];
            want = got = 0;
            for (Py_ssize_t blk = first; blk < last; blk++) {
                const Py_ssize_t c0 = blk * J->per, nc = J->cols - c0 < J->per ? J->cols - c0 : J->per;
                const long long w = (long long)nc * row_bytes;
                const long long g = read_all(J->fd, J->offset + ((long long)b * J->cols + c0) * row_bytes, buf, w);
                want += w;
                if (g != w) {
                    got = g < 0 ? g : got + g;
                    break;
                }
                got += g;
                put_block(tile, J->dst, J->dst_b, J->dst_r, b, c0, buf, J->rows, nc, J->z);
            }
        }
        if (got != want) __atomic_store_n(&B->err[j], got < 0 ? (int)-got : -1, __ATOMIC_RELAXED);
        else __atomic_fetch_add(&B->got[j], got, __ATOMIC_RELAXED);
    }
    free(mem);
    return NULL;
}

/* Whether byte pos of fd is in the page cache (1), not (0); 1 where the system cannot tell
 * (or at the end of the file, which the read itself then reports). */
static int cached_at(int fd, long long pos) {
#ifdef RWF_NOWAIT
    char c;
    struct iovec v = {&c, 1};
    if (preadv2(fd, &v, 1, (off_t)pos, RWF_NOWAIT) < 0 && errno == EAGAIN) return 0;
#endif
    (void)fd, (void)pos;
    return 1;
}

#ifdef __linux__
#include <sys/syscall.h>
/* cachestat(2), Linux 6.5+: the same number on every architecture (the generic table). */
struct cs_range { unsigned long long off, len; };
struct cs_stat { unsigned long long cache, dirty, writeback, evicted, recently_evicted; };
static int cachestat_missing = 0;
#endif

/* Whether [pos, pos + n) is in the page cache (lazysd/pread.py, page_cached): at least half
 * of the pages that lie wholly inside it (a page shared with a neighbour may have been cached
 * by the neighbour's read), counted by cachestat, which reads nothing; where the system has
 * no cachestat, a one-byte RWF_NOWAIT read of the first and last of those pages. */
static int cached_range(int fd, long long pos, long long n) {
    long long lo = (pos + 4095) / 4096 * 4096, hi = (pos + n) / 4096 * 4096;
    if (lo >= hi) lo = pos / 4096 * 4096, hi = (pos + n + 4095) / 4096 * 4096;
#ifdef __linux__
    if (!cachestat_missing) {
        struct cs_range r = {(unsigned long long)lo, (unsigned long long)(hi - lo)};
        struct cs_stat st;
        if (syscall(451, fd, &r, &st, 0) == 0) return 2 * st.cache >= (unsigned long long)(hi - lo) / 4096;
        if (errno == ENOSYS) __atomic_store_n(&cachestat_missing, 1, __ATOMIC_RELAXED);
    }
#endif
    return cached_at(fd, lo) && cached_at(fd, hi - 4096);
}

/* The threads that help a caller of reads(): started on first use, kept for the next call.
 * Starting and joining threads for every call cost ~80 us a call on the 2-core build VM, as
 * much as reading 0.5 MiB; a load makes a call per tensor. After a batch a worker waits
 * SPIN_NS for the next one before it sleeps: a load's next tensor usually comes within that
 * (the Python between two fills, ~120 us a key when an HF-keyed view is copied key by key),
 * and waking a sleeping thread costs tens of microseconds on a VM. Warm, fresh processes,
 * medians of 4-5, 100 -> 300 us: Qwen3-MoE 0.9 GiB key by key 0.249 -> 0.208 s, native
 * unchanged; Step3p5 0.9 / 2.8 GiB native 0.124 -> 0.115 / 0.282 -> 0.273 s; 1 ms gained
 * little more. The spin costs where ranks share too few cores: 4 ranks on the 2 cores,
 * bench_ep 0.91 -> 0.95 s. One batch uses the pool at a time; a concurrent caller starts
 * threads of its own. */
#ifndef SPIN_NS
#define SPIN_NS 300000LL
#endif

static struct {
    pthread_mutex_t use;  /* held by the caller whose batch the pool runs */
    pthread_mutex_t m;    /* guards the fields below */
    pthread_cond_t wake, idle;
    int workers;          /* started (in this process) */
    unsigned long gen;    /* bumped for every batch (read without the lock while spinning) */
    RBatch *batch;
    int want, busy;       /* workers still wanted for the batch; workers inside it */
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
       0, 0, NULL, 0, 0};

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void *pool_worker(void *arg) {
    /* The generation before the batch it was started for, so that it joins that batch. */
    unsigned long seen = (unsigned long)(uintptr_t)arg;
    /* Signals go to the application's threads, never to a worker in the middle of a read. */
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    for (;;) {
        const long long until = now_ns() + SPIN_NS;
        while (__atomic_load_n(&P.gen, __ATOMIC_ACQUIRE) == seen && now_ns() < until) {
#ifdef X86_SSE2
            _mm_pause();
#endif
        }
        RBatch *B = NULL;
        pthread_mutex_lock(&P.m);
        while (P.gen == seen) pthread_cond_wait(&P.wake, &P.m);
        seen = P.gen;
        if (P.want > 0) {
            P.want--;
            P.busy++;
            B = P.batch;
        }
        pthread_mutex_unlock(&P.m);
        if (B == NULL) continue;
        read_units(B);
        pthread_mutex_lock(&P.m);
        if (--P.busy == 0) pthread_cond_signal(&P.idle);
        pthread_mutex_unlock(&P.m);
    }
    return NULL;
}

/* A child made by fork() has none of the workers (only the forking thread survives), and a
 * lock a worker held stays held: start afresh there. */
static void pool_after_fork(void) {
    pthread_mutex_init(&P.use, NULL);
    pthread_mutex_init(&P.m, NULL);
    pthread_cond_init(&P.wake, NULL);
    pthread_cond_init(&P.idle, NULL);
    P.workers = P.want = P.busy = 0;
    P.batch = NULL;
}

/* Runs B on the calling thread and up to `helpers` pool workers; 0 if the pool is in use. */
static int pool_run(RBatch *B, int helpers) {
    if (pthread_mutex_trylock(&P.use) != 0) return 0;
    pthread_mutex_lock(&P.m);
    while (P.workers < helpers) {
        pthread_t id;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&id, &attr, pool_worker, (void *)(uintptr_t)P.gen);
        pthread_attr_destroy(&attr);
        if (failed) break;
        P.workers++;
    }
    P.batch = B;
    P.want = helpers < P.workers ? helpers : P.workers;
    __atomic_add_fetch(&P.gen, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.m);
    read_units(B);
    /* Every unit is taken: no worker may join B from now on, and those in it finish. */
    pthread_mutex_lock(&P.m);
    P.want = 0;
    while (P.busy > 0) pthread_cond_wait(&P.idle, &P.m);
    P.batch = NULL;
    pthread_mutex_unlock(&P.m);
    pthread_mutex_unlock(&P.use);
    return 1;
}

/* Plain jobs are cut into about 8 units per thread, each 1 to 4 MiB, so the last units of a
 * fill are small and the threads end together. Not smaller: threads filling neighbouring
 * pieces of fresh memory fault pages under the same page tables (assign=True of the 1.85 GiB
 * EP benchmark checkpoint, 3 fresh processes each: 0.82 s with 256 KiB units, 0.75 with
 * 1 MiB; a warm load of the 0.9 GiB one: the same with 256 KiB or 1 MiB, 1-3% slower with 2). */
#ifndef UNIT_MIN
#define UNIT_MIN (1LL << 20)
#endif
#define UNIT_MAX (4LL << 20)
#ifndef SMALL_UNIT_MIN
#define SMALL_UNIT_MIN (256LL << 10)
#endif

static int parse_job(PyObject *t, RJob *J) {
    unsigned long long dst;
    const Py_ssize_t n = PyTuple_Check(t) ? PyTuple_GET_SIZE(t) : -1;
    memset(J, 0, sizeof *J);
    if (n == 4) {
        if (!PyArg_ParseTuple(t, "iLKL", &J->fd, &J->offset, &dst, &J->nbytes)) return 0;
    } else if (n == 9) {
        if (!PyArg_ParseTuple(t, "iLKnnnnnn", &J->fd, &J->offset, &dst, &J->batch, &J->rows, &J->cols, &J->dst_b,
                              &J->dst_r, &J->z))
            return 0;
        if (!valid_itemsize(J->z)) return 0;
        if (J->batch <= 0 || J->rows <= 0 || J->cols <= 0) J->batch = J->rows = J->cols = 0;
        const Py_ssize_t row_bytes = J->rows * J->z;
        J->per = row_bytes ? block_cols(row_bytes, J->cols) : 0; /* empty: rows == 0, a plain job of 0 bytes */
        J->nbytes = (long long)J->batch * J->cols * row_bytes;
    } else {
        PyErr_SetString(PyExc_TypeError, "a read job is (fd, offset, dst, nbytes) or (fd, offset, dst, batch, rows, "
                                         "cols, dst_b, dst_r, itemsize)");
        return 0;
    }
    if (J->offset < 0 || J->nbytes < 0) {
        PyErr_SetString(PyExc_ValueError, "a read job's offset and size cannot be negative");
        return 0;
    }
    J->dst = (char *)(uintptr_t)dst;
    return 1;
}

static PyObject *reads(PyObject *self, PyObject *args) {
    PyObject *seq;
    int threads, probe;
    if (!PyArg_ParseTuple(args, "Oip", &seq, &threads, &probe)) return NULL;
    PyObject *fast = PySequence_Fast(seq, "jobs must be a sequence of tuples");
    if (fast == NULL) return NULL;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    RBatch B = {0};
    B.jobs = PyMem_Calloc(n ? n : 1, sizeof(RJob));
    B.got = PyMem_Calloc(n ? n : 1, sizeof(long long));
    B.err = PyMem_Calloc(n ? n : 1, sizeof(int));
    PyObject *out = NULL;
    if (B.jobs == NULL || B.got == NULL || B.err == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!parse_job(PySequence_Fast_GET_ITEM(fast, i), &B.jobs[i])) goto done;
    B.njobs = n;
    for (int i = 0; i < 4; i++) B.tiles[i] = isa_in_use->fn[i];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    Py_BEGIN_ALLOW_THREADS
    long long total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const RJob *J = &B.jobs[i];
        if (probe == 1 && J->nbytes && !cached_range(J->fd, J->offset, J->nbytes))
            probe = 2; /* cold: this job and the rest are left to the caller (unprobed, see above) */
        if (probe == 2) B.err[i] = EAGAIN;
        else total += J->nbytes;
    }
    int nt = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    /* A call of under 2 MiB in all (one small tensor: an HF key of a per-expert checkpoint) is
     * still shared by the threads, in smaller units: alone, one thread copies it at a single
     * core's memory bandwidth while the others wait for the next tensor. */
    const long long unit_min = total < 2 * UNIT_MIN ? SMALL_UNIT_MIN : UNIT_MIN;
    if (nt > 1 && total / nt < unit_min) nt = (int)(total / unit_min) > 1 ? (int)(total / unit_min) : 1;
    /* m units a thread (1 to 8) of total / (m * nt) bytes each, no less than unit_min, so
     * that the threads end together: units of unit_min left one thread alone with the last
     * MiB of a 2.75 MiB attention weight (read again and again from the page cache on 2
     * threads: 165 us a read with units of unit_min, 135 with these). */
    long long m = total / (nt * unit_min);
    m = m < 1 ? 1 : m > 8 ? 8 : m;
    long long unit = ((total + nt * m - 1) / (nt * m) + 4095) / 4096 * 4096;
    unit = unit < 4096 ? 4096 : unit > UNIT_MAX ? UNIT_MAX : unit;
    for (Py_ssize_t i = 0; i < n; i++) {
        RJob *J = &B.jobs[i];
        J->first = B.units;
        if (B.err[i]) continue;
        if (J->rows == 0) {
            J->unit = unit;
            J->units = (J->nbytes + unit - 1) / unit;
        } else {
            J->units = J->batch > 1 ? J->batch : (J->cols + J->per - 1) / J->per;
            const size_t block = (size_t)J->per * J->rows * J->z;
            if (block > B.buf) B.buf = block;
        }
        B.units += J->units;
    }
    if (nt == 1 || !pool_run(&B, nt - 1)) {
        /* One thread, or the pool is busy with another caller's batch: threads of our own. */
        for (int i = 1; i < nt; i++) started[i] = pthread_create(&ids[i], NULL, read_units, &B) == 0;
        read_units(&B);
        for (int i = 1; i < nt; i++)
            if (started[i]) pthread_join(ids[i], NULL);
    }
    Py_END_ALLOW_THREADS
    out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        /* a unit no thread could take (no buffer) leaves the job short: read again by the caller */
        const long long r = B.err[i] > 0 ? -(long long)B.err[i] : B.got[i];
        PyObject *v = PyLong_FromLongLong(r);
        if (v == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, v);
    }
done:
    PyMem_Free(B.jobs);
    PyMem_Free(B.got);
    PyMem_Free(B.err);
    Py_DECREF(fast);
    return out;
}

/* ---- choosing the instruction set ---- */

static PyObject *isa(PyObject *self, PyObject *unused) { return PyUnicode_FromString(isa_in_use->name); }

static PyObject *isas(PyObject *self, PyObject *unused) {
    PyObject *out = PyList_New(0);
    for (int i = 0; out != NULL && i < N_ISAS; i++) {
        if (!isa_supported(&ISAS[i])) continue;
        PyObject *name = PyUnicode_FromString(ISAS[i].name);
        if (name == NULL || PyList_Append(out, name) < 0) Py_CLEAR(out);
        Py_XDECREF(name);
    }
    if (out == NULL) return NULL;
    PyObject *tuple = PyList_AsTuple(out);
    Py_DECREF(out);
    return tuple;
}

static PyObject *set_isa(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL) return NULL;
    for (int i = 0; i < N_ISAS; i++) {
        if (strcmp(ISAS[i].name, name) != 0) continue;
        if (!isa_supported(&ISAS[i])) break;
        isa_in_use = &ISAS[i];
        Py_RETURN_NONE;
    }
    PyObject *names = isas(self, NULL);
    if (names != NULL) {
        PyErr_Format(PyExc_ValueError, "instruction set %R is not available here (available: %R)", arg, names);
        Py_DECREF(names);
    }
    return NULL;
}

static PyMethodDef methods[] = {
    {"copy", copy, METH_VARARGS,
     "copy(dst, src, batch, rows, cols, dst_b, dst_r, src_b, src_c, itemsize, threads): "
     "dst[b, r, c] = src[b, c, r] over raw addresses; see lazysd/transpose.py."},
    {"read", read_transposed, METH_VARARGS,
     "read(fd, offset, dst, batch, rows, cols, dst_b, dst_r, itemsize) -> bytes read: "
     "pread a dense [batch, cols, rows] array and write its transpose; see lazysd/transpose.py."},
    {"reads", reads, METH_VARARGS,
     "reads(jobs, threads, probe) -> bytes read per job (-errno where it failed): plain and "
     "transposing preads of many ranges on threads; see lazysd/transpose.py."},
    {"isa", isa, METH_NOARGS, "isa() -> the instruction set the kernels use: 'scalar', 'sse2', 'avx2' or 'avx512'."},
    {"isas", isas, METH_NOARGS, "isas() -> the instruction sets this CPU and build support, slowest first."},
    {"set_isa", set_isa, METH_O,
     "set_isa(name): use this instruction set from now on (for tests and measurements; not while "
     "copies run on other threads). ValueError where it is not available."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_transpose", NULL, -1, methods};

PyMODINIT_FUNC PyInit__transpose(void) {
#ifdef X86_WIDE
    __builtin_cpu_init();
#endif
    pthread_atfork(NULL, NULL, pool_after_fork);
    /* The widest the CPU supports (the table is ordered slowest first). */
    for (int i = 0; i < N_ISAS; i++)
        if (isa_supported(&ISAS[i])) isa_in_use = &ISAS[i];
    return PyModule_Create(&module);
}
