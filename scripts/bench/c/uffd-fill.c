/*
 * The placement ceiling for `npm run bench`: creates a userfaultfd on anonymous memory, registers
 * it (MISSING), and fills it with UFFDIO_COPY in fixed chunks from one buffer (then a second
 * mapping with UFFDIO_ZEROPAGE), timing only the ioctl loops. No faults, no network: what the
 * kernel can place per second from one thread. Then the same copy from a source as large as the
 * memory, so every page is new data as it is in a migration (the one-buffer loop copies from
 * cache; the second figure is the fair ceiling for pages that arrive off the network).
 * Compiled at bench time with `cc -O2`.
 *
 * usage: uffd-fill [size_bytes (default 1 GiB)] [chunk_bytes (default 256 KiB)]
 * prints one JSON line: {"sizeBytes":..,"chunkBytes":..,"copyGBs":..,"zeropageGBs":..,"verified":..}
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
  fprintf(stderr, "uffd-fill: %s: %s\n", what, strerror(errno));
  exit(1);
}

/*
 * Maps and registers `size` bytes, fills them (copy from `buf`, or zero pages), returns seconds.
 * `stride` is 0 to copy every chunk from the start of `buf`, or `chunk` to walk through it.
 */
static double fill(int uffd, size_t size, size_t chunk, const char *buf, size_t stride, char **out) {
  char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) die("mmap");
  struct uffdio_register reg = {.range = {(uintptr_t)mem, size}, .mode = UFFDIO_REGISTER_MODE_MISSING};
  if (ioctl(uffd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER");
  double t0 = now();
  for (size_t off = 0; off < size;) {
    size_t len = size - off < chunk ? size - off : chunk;
    long done;
    int rc;
    if (buf) {
      const char *src = buf + (stride ? off : 0);
      struct uffdio_copy c = {.dst = (uintptr_t)(mem + off), .src = (uintptr_t)src, .len = len};
      rc = ioctl(uffd, UFFDIO_COPY, &c);
      done = c.copy;
    } else {
      struct uffdio_zeropage z = {.range = {(uintptr_t)(mem + off), len}};
      rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
      done = z.zeropage;
    }
    if (rc && errno != EAGAIN) die(buf ? "UFFDIO_COPY" : "UFFDIO_ZEROPAGE");
    if (done > 0) off += (size_t)done; /* a partial copy continues after the bytes it placed */
  }
  double t1 = now();
  *out = mem;
  return t1 - t0;
}

int main(int argc, char **argv) {
  size_t size = argc > 1 ? strtoull(argv[1], NULL, 0) : (size_t)1 << 30;
  size_t chunk = argc > 2 ? strtoull(argv[2], NULL, 0) : 64 * 4096;
  if (!size || size % 4096 || !chunk || chunk % 4096) {
    fprintf(stderr, "uffd-fill: sizes must be positive multiples of 4096\n");
    return 2;
  }
  int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (uffd < 0) die("userfaultfd");
  struct uffdio_api api = {.api = UFFD_API};
  if (ioctl(uffd, UFFDIO_API, &api)) die("UFFDIO_API");

  char *buf = aligned_alloc(4096, chunk);
  if (!buf) die("aligned_alloc");
  uint64_t x = 0x9e3779b97f4a7c15ull; /* xorshift: incompressible-looking, nonzero data */
  for (size_t i = 0; i < chunk; i += 8) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    memcpy(buf + i, &x, 8);
  }

  char *mem;
  double copyS = fill(uffd, size, chunk, buf, 0, &mem);
  int verified = 1;
  for (size_t off = 0; off < size; off += chunk) {
    size_t len = size - off < chunk ? size - off : chunk;
    if (memcmp(mem + off, buf, len)) verified = 0;
  }
  munmap(mem, size);

  double zeroS = fill(uffd, size, chunk, NULL, 0, &mem);
  for (size_t off = 0; off < size; off += 4096)
    if (mem[off] || mem[off + 4095]) verified = 0;
  munmap(mem, size);

  /* Every page new data: a source as large as the memory, written first (resident, not cached). */
  char *big = malloc(size);
  if (!big) die("malloc");
  for (size_t off = 0; off < size; off += chunk) memcpy(big + off, buf, size - off < chunk ? size - off : chunk);
  for (size_t off = 0; off < size; off += 4096) big[off] = (char)(off >> 12);
  double distinctS = fill(uffd, size, chunk, big, chunk, &mem);
  for (size_t off = 0; off < size; off += 4096)
    if (mem[off] != big[off] || mem[off + 4095] != big[off + 4095]) verified = 0;
  munmap(mem, size);
  free(big);
  close(uffd);

  printf("{\"sizeBytes\":%zu,\"chunkBytes\":%zu,\"copySeconds\":%.6f,\"copyGBs\":%.3f,"
         "\"zeropageSeconds\":%.6f,\"zeropageGBs\":%.3f,\"copyDistinctGBs\":%.3f,"
         "\"verified\":%s}\n",
         size, chunk, copyS, size / copyS / 1e9, zeroS, size / zeroS / 1e9,
         size / distinctS / 1e9, verified ? "true" : "false");
  return verified ? 0 : 1;
}
