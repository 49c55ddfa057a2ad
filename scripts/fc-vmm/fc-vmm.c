/*
 * fc-vmm: stands in for Firecracker restoring a snapshot with
 * "mem_backend": {"backend_type": "Uffd", "backend_path": SOCKET}, for yabusame dest's tests and
 * bench. It does what Firecracker does on that path (tests/fixtures/firecracker/README.md):
 *
 *   - maps each guest region as its own anonymous private mapping (MAP_NORESERVE; hugetlbfs
 *     with MAP_HUGETLB | MAP_HUGE_2MB for 2 MiB pages), at the addresses a handshake file names
 *     (MAP_FIXED_NOREPLACE) or where the kernel puts them (region 0 first, so highest);
 *   - creates a userfaultfd (O_CLOEXEC | O_NONBLOCK), UFFDIO_API asking for
 *     UFFD_FEATURE_EVENT_REMOVE only, registers every region in MISSING mode;
 *   - connects once and sends, in one sendmsg with the uffd in SCM_RIGHTS, the handshake: the
 *     bytes of --handshake FILE exactly, or what the release family --format sends for its
 *     regions (serde_json's compact output, no newline);
 *   - closes its end of the socket right away up to v1.11, keeps it open from v1.12 (it never
 *     reads it), and keeps its own copy of the uffd;
 *   - then runs the guest: vCPU threads first-touch pages (reads and stamped writes) and verify
 *     each against the memory file, while pages arrive; a balloon discards pages with
 *     MADV_DONTNEED (UFFD_EVENT_REMOVE) which must then read as zeros;
 *
 * and what Firecracker cannot: it waits until every page is present (mincore), then verifies
 * every page of every region byte for byte against the memory file. The result is one JSON
 * object on stdout (--json). It also measures a working set (--ws-pages): a fixed list of pages
 * touched in order, the "first useful work" of a restored function, timed from the handshake.
 * With --start-on-sigusr1 the guest starts only on SIGUSR1; "atStart" in the result says which
 * pages were present by then (all of them, and those of the working set): what a handler
 * streamed ahead of any fault.
 *
 * Exit codes: 0 every page verified; 1 a mismatch or a missing page; 2 usage or setup error;
 * 3 timeout (pages still missing). Build: cc -O2 -g -pthread -Wall -Wextra -Werror -std=gnu11
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/mman.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define KiB (1024ULL)
#define MiB (1024ULL * KiB)
#define HUGE_2M (2 * MiB)
#define MAX_REGIONS 8
#define MAX_MISMATCHES 20
#define MAX_HANDSHAKE 65536

/* Per-page state (as c-vmm): ST_LOCK held while a thread reads, writes or discards the page;
 * ST_ZERO: its base content is zeros (discarded) instead of the file; low bits: the version of
 * the last stamp written over it (0: none). */
#define ST_LOCK (1U << 31)
#define ST_ZERO (1U << 30)
#define ST_VERSION ((1U << 30) - 1)

struct region {
  uint64_t base, size, offset, page;
  uint8_t *mem;
  uint64_t pages, first_global;
  /* all_present(): pages [0, present_upto) were seen present (or freed by the balloon). */
  uint64_t present_upto;
  _Atomic uint32_t *state;
  uint8_t *discarded;
};

struct stamp {
  uint64_t magic;
  uint32_t version;
  uint32_t pad;
  uint64_t page;
};
#define STAMP_MAGIC 0x504d5453564d4346ULL /* "FCVMSTMP" */

static struct {
  const char *socket_path, *mem_file, *handshake_file, *format;
  uint64_t split, page, unmap_tail;
  int vcpus;
  double touch_fraction, write_fraction;
  int balloon;
  long ws_pages, ws_cluster;
  uint64_t ws_seed, ws_jitter_seed;
  double ws_jitter;
  bool wait_complete, json, start_on_signal;
  int timeout_ms, close_socket_after_ms, hold_ms;
  uint64_t seed;
} opt = {.format = "v1.12",
         .page = 4096,
         .vcpus = 2,
         .touch_fraction = 0.2,
         .write_fraction = 0.2,
         .ws_cluster = 8,
         .ws_seed = 1,
         .ws_jitter_seed = 1,
         .wait_complete = true,
         .timeout_ms = 60000,
         .close_socket_after_ms = -1,
         .seed = 1};

static struct region regions[MAX_REGIONS];
static int nregions;
static uint64_t total_pages;
static int mem_fd = -1, uffd = -1, sock = -1;
static char handshake[MAX_HANDSHAKE];
static size_t handshake_len;
static bool keeps_socket;
static atomic_bool done;
static atomic_int running_threads;
static uint64_t t_handshake_ns;

static pthread_mutex_t mismatch_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
  int region;
  uint64_t page;
  char reason[160];
} mismatches[MAX_MISMATCHES];
static int nlisted;
static atomic_ullong mismatch_count, missing_count, verified_count, unexpected_bytes,
    touches_verified;
static atomic_int balloon_done;

/* --- result ------------------------------------------------------------------------------ */

static struct {
  const char *outcome, *code;
  char message[400];
  uint32_t *lat;
  size_t nlat;
  uint64_t elapsed_ms, work_ms;
  long work_faults, work_touches;
  /* When the guest started: pages present, the working set's distinct pages, those present. */
  uint64_t present_at_start, ws_distinct, ws_present_at_start;
  bool handler_closed;
} result = {.outcome = "failed"};

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  flockfile(stderr);
  fputs("fc-vmm: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  funlockfile(stderr);
  va_end(ap);
}

static void json_string(const char *s) {
  putchar('"');
  for (; *s; s++) {
    if (*s == '"' || *s == '\\') printf("\\%c", *s);
    else if ((unsigned char)*s < 0x20) printf("\\u%04x", *s);
    else putchar(*s);
  }
  putchar('"');
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

static _Noreturn void finish(int code) {
  if (opt.json) {
    uint32_t p50 = 0, p99 = 0, max = 0;
    if (result.nlat) {
      qsort(result.lat, result.nlat, sizeof *result.lat, cmp_u32);
      p50 = result.lat[result.nlat / 2];
      p99 = result.lat[result.nlat * 99 / 100];
      max = result.lat[result.nlat - 1];
    }
    uint64_t discarded = 0;
    for (int i = 0; i < nregions; i++)
      for (uint64_t p = 0; regions[i].discarded && p < regions[i].pages; p++)
        discarded += regions[i].discarded[p];
    printf("{\"ok\":%s,\"outcome\":\"%s\"", code == 0 ? "true" : "false", result.outcome);
    if (result.code) printf(",\"code\":\"%s\"", result.code);
    if (result.message[0]) printf(",\"message\":"), json_string(result.message);
    printf(",\"format\":\"%s\",\"handshakeBytes\":%zu,\"totalPages\":%" PRIu64, opt.format,
           handshake_len, total_pages);
    printf(",\"pagesVerified\":%llu,\"touchesVerified\":%llu,\"missingPages\":%llu"
           ",\"mismatchCount\":%llu,\"mismatches\":[",
           (unsigned long long)verified_count, (unsigned long long)touches_verified,
           (unsigned long long)missing_count, (unsigned long long)mismatch_count);
    for (int i = 0; i < nlisted; i++) {
      printf("%s{\"region\":%d,\"page\":%" PRIu64 ",\"reason\":", i ? "," : "",
             mismatches[i].region, mismatches[i].page);
      json_string(mismatches[i].reason);
      putchar('}');
    }
    printf("],\"faults\":{\"count\":%zu,\"p50Us\":%u,\"p99Us\":%u,\"maxUs\":%u}", result.nlat, p50,
           p99, max);
    printf(",\"elapsedMs\":%" PRIu64 ",\"work\":{\"touches\":%ld,\"faults\":%ld,\"ms\":%" PRIu64 "}",
           result.elapsed_ms, result.work_touches, result.work_faults, result.work_ms);
    printf(",\"atStart\":{\"present\":%" PRIu64 ",\"wsPages\":%" PRIu64 ",\"wsPresent\":%" PRIu64
           "}",
           result.present_at_start, result.ws_distinct, result.ws_present_at_start);
    printf(",\"discardedPages\":%" PRIu64 ",\"balloonRuns\":%d,\"unexpectedBytes\":%llu", discarded,
           atomic_load(&balloon_done), (unsigned long long)unexpected_bytes);
    printf(",\"handlerClosedSocket\":%s,\"regions\":[", result.handler_closed ? "true" : "false");
    for (int i = 0; i < nregions; i++)
      printf("%s{\"base\":%" PRIu64 ",\"size\":%" PRIu64 ",\"offset\":%" PRIu64
             ",\"pageSize\":%" PRIu64 "}",
             i ? "," : "", regions[i].base, regions[i].size, regions[i].offset, regions[i].page);
    printf("]}\n");
    fflush(stdout);
  }
  _exit(code);
}

static _Noreturn void setup_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static _Noreturn void setup_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(result.message, sizeof result.message, fmt, ap);
  va_end(ap);
  logmsg("%s", result.message);
  result.code = "FCVMM_SETUP";
  finish(2);
}

/* --- rng ---------------------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
static uint64_t below(uint64_t *s, uint64_t n) { return n ? splitmix64(s) % n : 0; }
static double unit(uint64_t *s) { return (double)(splitmix64(s) >> 11) / 9007199254740992.0; }

/* --- pages -------------------------------------------------------------------------------- */

static void global_page(uint64_t g, struct region **r, uint64_t *page) {
  int i = 0;
  while (i + 1 < nregions && regions[i + 1].first_global <= g) i++;
  *r = &regions[i];
  *page = g - regions[i].first_global;
}

static bool try_lock(struct region *r, uint64_t p, uint32_t *st) {
  uint32_t cur = atomic_load(&r->state[p]);
  if (cur & ST_LOCK) return false;
  if (!atomic_compare_exchange_strong(&r->state[p], &cur, cur | ST_LOCK)) return false;
  *st = cur;
  return true;
}
static void unlock(struct region *r, uint64_t p, uint32_t st) {
  atomic_store(&r->state[p], st & ~ST_LOCK);
}

static uint64_t stamp_at(const struct region *r, uint64_t p) {
  return ((p * 1096) % (r->page - sizeof(struct stamp))) & ~7ULL;
}

static void expected(const struct region *r, uint64_t p, uint32_t st, uint8_t *buf) {
  if (st & ST_ZERO) memset(buf, 0, r->page);
  else {
    uint64_t got = 0;
    while (got < r->page) {
      ssize_t n = pread(mem_fd, buf + got, r->page - got, (off_t)(r->offset + p * r->page + got));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      got += (uint64_t)n;
    }
    memset(buf + got, 0, r->page - got);
  }
  if (st & ST_VERSION) {
    struct stamp s = {.magic = STAMP_MAGIC, .version = st & ST_VERSION, .page = p};
    memcpy(buf + stamp_at(r, p), &s, sizeof s);
  }
}

static void mismatch(const struct region *r, uint64_t p, bool missing, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void mismatch(const struct region *r, uint64_t p, bool missing, const char *fmt, ...) {
  atomic_fetch_add(missing ? &missing_count : &mismatch_count, 1);
  pthread_mutex_lock(&mismatch_lock);
  if (nlisted < MAX_MISMATCHES) {
    mismatches[nlisted].region = (int)(r - regions);
    mismatches[nlisted].page = p;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(mismatches[nlisted].reason, sizeof mismatches[nlisted].reason, fmt, ap);
    va_end(ap);
    nlisted++;
  }
  pthread_mutex_unlock(&mismatch_lock);
}

static bool verify(const struct region *r, uint64_t p, uint32_t st, uint8_t *buf) {
  const uint8_t *mem = r->mem + p * r->page;
  expected(r, p, st, buf);
  if (memcmp(mem, buf, r->page) == 0) return true;
  uint64_t i = 0;
  while (mem[i] == buf[i]) i++;
  mismatch(r, p, false, "byte %" PRIu64 ": 0x%02x, expected 0x%02x (%s%s)", i, mem[i], buf[i],
           st & ST_ZERO ? "zeros" : "file", st & ST_VERSION ? " + stamp" : "");
  return false;
}

static bool resident(const struct region *r, uint64_t p) {
  unsigned char vec[HUGE_2M / 4096];
  if (mincore(r->mem + p * r->page, r->page, vec) != 0) return false;
  return vec[0] & 1;
}

/* One touch: read (or stamp) the page, time it if it was not present, verify it. Returns
 * whether the page was absent (a fault was taken). */
static bool touch(uint64_t g, uint64_t *rng, uint8_t *buf, uint32_t **lat, size_t *nlat,
                  size_t *cap) {
  struct region *r;
  uint64_t p;
  global_page(g, &r, &p);
  uint32_t st;
  while (!try_lock(r, p, &st)) {
    if (atomic_load(&done)) return false;
    sched_yield();
  }
  uint8_t *addr = r->mem + p * r->page;
  bool absent = !resident(r, p);
  bool write = unit(rng) < opt.write_fraction;
  uint32_t nst = st;
  uint64_t t0 = now_ns();
  if (write) {
    uint32_t v = ((st & ST_VERSION) + 1) & ST_VERSION;
    nst = (st & ST_ZERO) | (v ? v : 1);
    struct stamp s = {.magic = STAMP_MAGIC, .version = nst & ST_VERSION, .page = p};
    memcpy(addr + stamp_at(r, p), &s, sizeof s);
  } else {
    (void)*(volatile uint8_t *)(addr + stamp_at(r, p));
  }
  uint64_t us = (now_ns() - t0) / 1000;
  if (absent) {
    if (*nlat == *cap) {
      *cap = *cap ? *cap * 2 : 1024;
      *lat = realloc(*lat, *cap * sizeof **lat);
      if (!*lat) abort();
    }
    (*lat)[(*nlat)++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
  }
  if (verify(r, p, nst, buf)) atomic_fetch_add(&touches_verified, 1);
  unlock(r, p, nst);
  return absent;
}

/* --- guest threads ------------------------------------------------------------------------ */

struct vcpu {
  pthread_t thread;
  int index;
  uint64_t *list;
  size_t n;
  bool working_set;
  uint32_t *lat;
  size_t nlat, cap;
  long faults;
};

static uint64_t max_page(void) {
  uint64_t m = 0;
  for (int i = 0; i < nregions; i++) m = regions[i].page > m ? regions[i].page : m;
  return m;
}

static atomic_int ws_left;
static atomic_long ws_faults;

static void *vcpu_main(void *arg) {
  struct vcpu *v = arg;
  uint64_t rng = opt.seed * 1000003ULL + (uint64_t)v->index;
  uint8_t *buf = malloc(max_page());
  if (!buf) abort();
  for (size_t i = 0; i < v->n && !atomic_load(&done); i++)
    if (touch(v->list[i], &rng, buf, &v->lat, &v->nlat, &v->cap)) v->faults++;
  if (v->working_set) atomic_fetch_add(&ws_faults, v->faults);
  if (atomic_fetch_sub(&ws_left, 1) == 1 && v->working_set)
    result.work_ms = (now_ns() - t_handshake_ns) / 1000000;
  /* With a balloon the guest stays busy, touching pages some of which were freed. */
  while (opt.balloon > 0 && !atomic_load(&done)) {
    touch(below(&rng, total_pages), &rng, buf, &v->lat, &v->nlat, &v->cap);
    usleep(200);
  }
  free(buf);
  atomic_fetch_sub(&running_threads, 1);
  return NULL;
}

static void *balloon_main(void *arg) {
  uint64_t rng = (uint64_t)(uintptr_t)arg;
  for (int tries = 0; atomic_load(&balloon_done) < opt.balloon && !atomic_load(&done) &&
                      tries < opt.balloon * 100;
       tries++) {
    struct region *r;
    uint64_t first;
    global_page(below(&rng, total_pages), &r, &first);
    uint64_t n = 1 + below(&rng, r->page >= HUGE_2M ? 2 : 16);
    if (first + n > r->pages) n = r->pages - first;
    uint32_t st;
    uint64_t locked = 0;
    while (locked < n && try_lock(r, first + locked, &st)) locked++;
    if (locked < n) {
      for (uint64_t i = 0; i < locked; i++) unlock(r, first + i, atomic_load(&r->state[first + i]));
      continue;
    }
    /* Firecracker's balloon: MADV_DONTNEED, which queues UFFD_EVENT_REMOVE and waits until the
     * handler has read it. */
    if (madvise(r->mem + first * r->page, n * r->page, MADV_DONTNEED) != 0) {
      logmsg("balloon: madvise: %s", strerror(errno));
      for (uint64_t i = 0; i < n; i++) unlock(r, first + i, atomic_load(&r->state[first + i]));
      break;
    }
    for (uint64_t i = 0; i < n; i++) {
      r->discarded[first + i] = 1;
      unlock(r, first + i, ST_ZERO);
    }
    atomic_fetch_add(&balloon_done, 1);
    usleep(2000);
  }
  atomic_fetch_sub(&running_threads, 1);
  return NULL;
}

/* The working set: ws_pages pages in clusters of ws_cluster consecutive pages at random places
 * (--ws-seed: the same on every restore), a fraction --ws-jitter of the clusters moved elsewhere
 * (--ws-jitter-seed: what differs between two restores of one snapshot). */
static uint64_t *working_set(size_t *n) {
  uint64_t *list = malloc((size_t)opt.ws_pages * sizeof *list);
  if (!list) abort();
  uint64_t rng = opt.ws_seed, jrng = opt.ws_jitter_seed ^ 0x5eed;
  size_t k = 0;
  while (k < (size_t)opt.ws_pages) {
    uint64_t start = below(&rng, total_pages);
    uint64_t moved = below(&jrng, total_pages);
    if (unit(&jrng) < opt.ws_jitter) start = moved;
    for (long c = 0; c < opt.ws_cluster && k < (size_t)opt.ws_pages; c++)
      list[k++] = (start + (uint64_t)c) % total_pages;
  }
  *n = k;
  return list;
}

static struct vcpu *vcpus;
static pthread_t balloon_thread;

/* Before the guest runs: which pages are present already (a handler that streamed some ahead,
 * e.g. a recorded working set), and how many of the working set's pages (ws, n) they are. */
static void residency_at_start(const uint64_t *ws, size_t n) {
  uint8_t *present = calloc(total_pages ? total_pages : 1, 1);
  if (!present) abort();
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    size_t small = r->size / 4096;
    unsigned char *vec = malloc(small ? small : 1);
    if (!vec) abort();
    if (mincore(r->mem, r->size, vec) != 0) memset(vec, 0, small);
    for (uint64_t p = 0; p < r->pages; p++)
      present[r->first_global + p] = vec[p * (r->page / 4096)] & 1;
    free(vec);
  }
  for (uint64_t g = 0; g < total_pages; g++) result.present_at_start += present[g];
  uint8_t *seen = calloc(total_pages ? total_pages : 1, 1);
  if (!seen) abort();
  for (size_t k = 0; k < n; k++) {
    if (seen[ws[k]]) continue;
    seen[ws[k]] = 1;
    result.ws_distinct++;
    result.ws_present_at_start += present[ws[k]];
  }
  free(seen);
  free(present);
}

static void start_guest(void) {
  vcpus = calloc((size_t)opt.vcpus + 1, sizeof *vcpus);
  if (!vcpus) abort();
  uint64_t *list;
  size_t n;
  bool ws = opt.ws_pages > 0;
  if (ws) {
    list = working_set(&n);
    residency_at_start(list, n);
  } else {
    residency_at_start(NULL, 0);
    n = (size_t)(opt.touch_fraction * (double)total_pages + 0.5);
    list = malloc((total_pages ? total_pages : 1) * sizeof *list);
    if (!list) abort();
    for (uint64_t i = 0; i < total_pages; i++) list[i] = i;
    uint64_t rng = opt.seed ^ 0x70c4ULL;
    for (size_t i = 0; i < n; i++) {
      uint64_t j = i + below(&rng, total_pages - i);
      uint64_t t = list[i];
      list[i] = list[j];
      list[j] = t;
    }
  }
  atomic_store(&ws_left, opt.vcpus);
  for (int i = 0; i < opt.vcpus; i++) {
    struct vcpu *v = &vcpus[i];
    v->index = i;
    v->working_set = ws;
    v->list = malloc((n / (size_t)opt.vcpus + 1) * sizeof *v->list);
    if (!v->list) abort();
    for (size_t k = (size_t)i; k < n; k += (size_t)opt.vcpus) v->list[v->n++] = list[k];
  }
  result.work_touches = (long)n;
  free(list);
  for (int i = 0; i < opt.vcpus; i++) {
    atomic_fetch_add(&running_threads, 1);
    if (pthread_create(&vcpus[i].thread, NULL, vcpu_main, &vcpus[i]) != 0) abort();
  }
  if (opt.balloon > 0) {
    atomic_fetch_add(&running_threads, 1);
    if (pthread_create(&balloon_thread, NULL, balloon_main, (void *)(uintptr_t)(opt.seed ^ 0xba11)))
      abort();
  }
}

static void stop_guest(void) {
  atomic_store(&done, true);
  for (int i = 0; i < opt.vcpus; i++) {
    pthread_join(vcpus[i].thread, NULL);
    struct vcpu *v = &vcpus[i];
    result.lat = realloc(result.lat, (result.nlat + v->nlat + 1) * sizeof *result.lat);
    if (!result.lat) abort();
    memcpy(result.lat + result.nlat, v->lat, v->nlat * sizeof *v->lat);
    result.nlat += v->nlat;
  }
  if (opt.balloon > 0) pthread_join(balloon_thread, NULL);
  result.work_faults = atomic_load(&ws_faults);
}

/* --- handshake ---------------------------------------------------------------------------- */

/* The integer value of "key": in one {...} element of a flat JSON array; false if absent. */
static bool json_u64(const char *elem, const char *end, const char *key, uint64_t *out) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\":", key);
  size_t plen = strlen(pat);
  for (const char *p = elem; p + plen <= end; p++) {
    if (memcmp(p, pat, plen) == 0) {
      char *e;
      *out = strtoull(p + plen, &e, 10);
      return e != p + plen;
    }
  }
  return false;
}

/* Regions from a handshake file: each {...} with base_host_virt_addr, size, offset and a page
 * size (page_size, else page_size_kib, which holds bytes, else 4096). */
static void regions_from_handshake(void) {
  FILE *f = fopen(opt.handshake_file, "rb");
  if (!f) setup_error("open %s: %s", opt.handshake_file, strerror(errno));
  handshake_len = fread(handshake, 1, sizeof handshake, f);
  fclose(f);
  keeps_socket = strstr(handshake, "\"page_size\":") != NULL;
  opt.format = keeps_socket ? "v1.12" : strstr(handshake, "\"page_size_kib\":") ? "v1.7" : "v1.1";
  const char *p = handshake, *end = handshake + handshake_len;
  while ((p = memchr(p, '{', (size_t)(end - p))) != NULL) {
    const char *close = memchr(p, '}', (size_t)(end - p));
    if (!close || nregions == MAX_REGIONS) setup_error("%s: unexpected shape", opt.handshake_file);
    struct region *r = &regions[nregions++];
    if (!json_u64(p, close, "base_host_virt_addr", &r->base) || !json_u64(p, close, "size", &r->size) ||
        !json_u64(p, close, "offset", &r->offset))
      setup_error("%s: region %d lacks a field", opt.handshake_file, nregions - 1);
    if (!json_u64(p, close, "page_size", &r->page) && !json_u64(p, close, "page_size_kib", &r->page))
      r->page = 4096;
    p = close + 1;
  }
}

/* What Firecracker of --format sends for the regions (serde_json, compact, keys in order). */
static void build_handshake(void) {
  size_t n = 0;
  keeps_socket = !strcmp(opt.format, "v1.12");
  bool kib = strcmp(opt.format, "v1.1") != 0;
  n += (size_t)snprintf(handshake + n, sizeof handshake - n, "[");
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    n += (size_t)snprintf(handshake + n, sizeof handshake - n,
                          "%s{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64
                          ",\"offset\":%" PRIu64,
                          i ? "," : "", r->base, r->size, r->offset);
    if (keeps_socket)
      n += (size_t)snprintf(handshake + n, sizeof handshake - n, ",\"page_size\":%" PRIu64, r->page);
    if (kib)
      n += (size_t)snprintf(handshake + n, sizeof handshake - n, ",\"page_size_kib\":%" PRIu64,
                            r->page);
    n += (size_t)snprintf(handshake + n, sizeof handshake - n, "}");
  }
  n += (size_t)snprintf(handshake + n, sizeof handshake - n, "]");
  handshake_len = n;
}

static void setup(void) {
  mem_fd = open(opt.mem_file, O_RDONLY | O_CLOEXEC);
  if (mem_fd < 0) setup_error("open %s: %s", opt.mem_file, strerror(errno));
  struct stat sb;
  if (fstat(mem_fd, &sb) != 0) setup_error("stat %s: %s", opt.mem_file, strerror(errno));
  bool fixed = opt.handshake_file != NULL;
  if (fixed) regions_from_handshake();
  else {
    uint64_t size = (uint64_t)sb.st_size;
    uint64_t split = opt.split && opt.split < size ? opt.split : size;
    if (split % opt.page || size % opt.page)
      setup_error("--split and the file size must be multiples of the page size");
    regions[0] = (struct region){.size = split, .offset = 0, .page = opt.page};
    nregions = 1;
    if (split < size) regions[nregions++] = (struct region){.size = size - split, .offset = split, .page = opt.page};
  }
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    if (r->page == HUGE_2M) flags |= MAP_HUGETLB | MAP_HUGE_2MB;
    if (fixed) flags |= MAP_FIXED_NOREPLACE;
    void *want = fixed ? (void *)(uintptr_t)r->base : NULL;
    void *m = mmap(want, r->size, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (m == MAP_FAILED) setup_error("mmap region %d (%" PRIu64 " bytes): %s", i, r->size, strerror(errno));
    if (fixed && m != want) setup_error("region %d: mapped at %p, not %p", i, m, want);
    r->mem = m;
    r->base = (uint64_t)(uintptr_t)m;
    r->pages = r->size / r->page;
    r->first_global = total_pages;
    total_pages += r->pages;
    r->state = calloc(r->pages, sizeof *r->state);
    r->discarded = calloc(r->pages, 1);
    if (!r->state || !r->discarded) setup_error("out of memory");
  }
  if (!fixed) build_handshake();

  uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (uffd < 0) setup_error("userfaultfd: %s", strerror(errno));
  struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
  if (ioctl(uffd, UFFDIO_API, &api) != 0) setup_error("UFFDIO_API: %s", strerror(errno));
  for (int i = 0; i < nregions; i++) {
    struct uffdio_register reg = {.range = {.start = regions[i].base, .len = regions[i].size},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0)
      setup_error("UFFDIO_REGISTER region %d: %s", i, strerror(errno));
  }
  /* --unmap-tail: the last region loses its tail after registration, so the handshake names
   * memory that no longer exists (a handler must refuse it). Less than a thread stack: nothing
   * this process maps before the handler has read the handshake can fill the hole. */
  struct region *last = &regions[nregions - 1];
  if (opt.unmap_tail > 0) {
    if (opt.unmap_tail >= last->size || opt.unmap_tail % last->page)
      setup_error("--unmap-tail must be whole pages, less than the last region");
    if (munmap(last->mem + last->size - opt.unmap_tail, opt.unmap_tail) != 0)
      setup_error("munmap the tail: %s", strerror(errno));
  }
}

static void send_handshake(void) {
  sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  snprintf(addr.sun_path, sizeof addr.sun_path, "%s", opt.socket_path);
  if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
    setup_error("connect %s: %s", opt.socket_path, strerror(errno));
  union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
  } control;
  memset(&control, 0, sizeof control);
  struct iovec iov = {.iov_base = handshake, .iov_len = handshake_len};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                       .msg_controllen = sizeof control.buf};
  struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &uffd, sizeof(int));
  /* One sendmsg; like Firecracker, the byte count is not checked. */
  if (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0) setup_error("sendmsg: %s", strerror(errno));
  t_handshake_ns = now_ns();
  logmsg("event handshake-sent %s %zu bytes", opt.format, handshake_len);
  if (!keeps_socket) {
    close(sock);
    sock = -1;
  }
}

/* Firecracker never reads its socket; we look, to prove the handler writes nothing. */
static void check_socket(void) {
  if (sock < 0) return;
  char buf[256];
  ssize_t n;
  while ((n = recv(sock, buf, sizeof buf, MSG_DONTWAIT)) > 0) atomic_fetch_add(&unexpected_bytes, (unsigned long long)n);
  if (n == 0) result.handler_closed = true;
}

/* --- the end ------------------------------------------------------------------------------ */

/* Polled every 2 ms while pages arrive, by many fc-vmm processes at once in the bench: it goes
 * on from the first page not yet seen present, 16 MiB per mincore, and stops at a missing page
 * (a page once present stays so, or is freed by the balloon, which marks it ST_ZERO). */
static bool all_present(void) {
  unsigned char vec[4096];
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    uint64_t step = r->page / 4096;
    uint64_t per_call = sizeof vec / step;
    while (r->present_upto < r->pages) {
      uint64_t n = r->pages - r->present_upto;
      if (n > per_call) n = per_call;
      if (mincore(r->mem + r->present_upto * r->page, n * r->page, vec) != 0) return false;
      for (uint64_t k = 0; k < n; k++, r->present_upto++)
        if (!(vec[k * step] & 1) && !(atomic_load(&r->state[r->present_upto]) & ST_ZERO))
          return false;
    }
  }
  return true;
}

/* Every page of every region against the memory file, read in chunks (holes not read at all:
 * SEEK_DATA says where they are); a page not present is missing unless the balloon freed it. */
#define CHUNK (4 * MiB)
static void verify_all(void) {
  uint8_t *buf = malloc(CHUNK), *page_buf = malloc(max_page()), *zero = calloc(1, CHUNK);
  if (!buf || !page_buf || !zero) abort();
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    unsigned char *vec = malloc(r->size / 4096);
    if (!vec) abort();
    if (mincore(r->mem, r->size, vec) != 0) memset(vec, 0, r->size / 4096);
    uint64_t step = r->page / 4096;
    for (uint64_t off = 0; off < r->size; off += CHUNK) {
      uint64_t n = r->size - off < CHUNK ? r->size - off : CHUNK;
      off_t at = (off_t)(r->offset + off);
      off_t data = lseek(mem_fd, at, SEEK_DATA);
      bool hole = data < 0 || (uint64_t)data >= r->offset + off + n;
      const uint8_t *src = zero;
      if (!hole) {
        uint64_t got = 0;
        while (got < n) {
          ssize_t k = pread(mem_fd, buf + got, n - got, at + (off_t)got);
          if (k < 0 && errno == EINTR) continue;
          if (k <= 0) break;
          got += (uint64_t)k;
        }
        memset(buf + got, 0, n - got);
        src = buf;
      }
      for (uint64_t q = 0; q < n; q += r->page) {
        uint64_t p = (off + q) / r->page;
        uint32_t st = atomic_load(&r->state[p]);
        if (!(vec[p * step] & 1) && !(st & ST_ZERO)) {
          mismatch(r, p, true, "missing: not present");
          continue;
        }
        bool ok;
        if (st & (ST_ZERO | ST_VERSION)) ok = verify(r, p, st, page_buf);
        else if ((ok = memcmp(r->mem + p * r->page, src + q, r->page) == 0) == false)
          ok = verify(r, p, st, page_buf); /* names the first differing byte */
        if (ok) atomic_fetch_add(&verified_count, 1);
      }
    }
    free(vec);
  }
  free(buf);
  free(page_buf);
  free(zero);
}

static void usage(void) {
  fputs("usage: fc-vmm --socket PATH --mem-file FILE [--handshake FILE | --format v1.1|v1.7|v1.12\n"
        "  [--split BYTES] [--page 4k|2m]] [--vcpus N] [--touch-fraction F] [--write-fraction F]\n"
        "  [--balloon N] [--ws-pages N --ws-cluster N --ws-seed N --ws-jitter F --ws-jitter-seed N]\n"
        "  [--no-wait] [--hold-ms MS] [--close-socket-after-ms MS] [--timeout MS] [--seed N]\n"
        "  [--start-on-sigusr1] [--unmap-tail BYTES] [--json]\n",
        stderr);
}

static void parse_args(int argc, char **argv) {
  enum { O_SOCKET = 256, O_MEM, O_HS, O_FORMAT, O_SPLIT, O_PAGE, O_VCPUS, O_TOUCH, O_WRITE,
         O_BALLOON, O_WSP, O_WSC, O_WSS, O_WSJ, O_WSJS, O_NOWAIT, O_HOLD, O_CLOSE, O_TIMEOUT,
         O_SEED, O_JSON, O_START, O_UNMAP };
  static const struct option longopts[] = {
      {"socket", 1, 0, O_SOCKET},        {"mem-file", 1, 0, O_MEM},
      {"handshake", 1, 0, O_HS},         {"format", 1, 0, O_FORMAT},
      {"split", 1, 0, O_SPLIT},          {"page", 1, 0, O_PAGE},
      {"vcpus", 1, 0, O_VCPUS},          {"touch-fraction", 1, 0, O_TOUCH},
      {"write-fraction", 1, 0, O_WRITE}, {"balloon", 1, 0, O_BALLOON},
      {"ws-pages", 1, 0, O_WSP},         {"ws-cluster", 1, 0, O_WSC},
      {"ws-seed", 1, 0, O_WSS},          {"ws-jitter", 1, 0, O_WSJ},
      {"ws-jitter-seed", 1, 0, O_WSJS},  {"no-wait", 0, 0, O_NOWAIT},
      {"hold-ms", 1, 0, O_HOLD},         {"close-socket-after-ms", 1, 0, O_CLOSE},
      {"timeout", 1, 0, O_TIMEOUT},      {"seed", 1, 0, O_SEED},
      {"json", 0, 0, O_JSON},            {"start-on-sigusr1", 0, 0, O_START},
      {"unmap-tail", 1, 0, O_UNMAP},     {0, 0, 0, 0}};
  int c;
  while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
    switch (c) {
    case O_SOCKET: opt.socket_path = optarg; break;
    case O_MEM: opt.mem_file = optarg; break;
    case O_HS: opt.handshake_file = optarg; break;
    case O_FORMAT:
      if (strcmp(optarg, "v1.1") && strcmp(optarg, "v1.7") && strcmp(optarg, "v1.12"))
        setup_error("--format must be v1.1, v1.7 or v1.12");
      opt.format = optarg;
      break;
    case O_SPLIT: opt.split = strtoull(optarg, NULL, 10); break;
    case O_PAGE: opt.page = !strcmp(optarg, "2m") ? HUGE_2M : 4096; break;
    case O_VCPUS: opt.vcpus = atoi(optarg); break;
    case O_TOUCH: opt.touch_fraction = atof(optarg); break;
    case O_WRITE: opt.write_fraction = atof(optarg); break;
    case O_BALLOON: opt.balloon = atoi(optarg); break;
    case O_WSP: opt.ws_pages = atol(optarg); break;
    case O_WSC: opt.ws_cluster = atol(optarg); break;
    case O_WSS: opt.ws_seed = strtoull(optarg, NULL, 10); break;
    case O_WSJ: opt.ws_jitter = atof(optarg); break;
    case O_WSJS: opt.ws_jitter_seed = strtoull(optarg, NULL, 10); break;
    case O_NOWAIT: opt.wait_complete = false; break;
    case O_HOLD: opt.hold_ms = atoi(optarg); break;
    case O_CLOSE: opt.close_socket_after_ms = atoi(optarg); break;
    case O_TIMEOUT: opt.timeout_ms = atoi(optarg); break;
    case O_SEED: opt.seed = strtoull(optarg, NULL, 10); break;
    case O_JSON: opt.json = true; break;
    case O_START: opt.start_on_signal = true; break;
    case O_UNMAP: opt.unmap_tail = strtoull(optarg, NULL, 10); break;
    default: usage(); setup_error("bad arguments");
    }
  }
  if (!opt.socket_path || !opt.mem_file) {
    usage();
    setup_error("--socket and --mem-file are required");
  }
  if (opt.vcpus < 1) opt.vcpus = 1;
  if (opt.ws_cluster < 1) opt.ws_cluster = 1;
}

int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++)
    if (!strcmp(argv[i], "--json")) opt.json = true;
  parse_args(argc, argv);
  sigset_t start_signal;
  sigemptyset(&start_signal);
  sigaddset(&start_signal, SIGUSR1);
  /* Blocked before any thread exists, so that only sigwait() takes it. */
  if (opt.start_on_signal) pthread_sigmask(SIG_BLOCK, &start_signal, NULL);
  setup();
  send_handshake();
  if (opt.start_on_signal) {
    logmsg("event waiting-for-start");
    int sig;
    sigwait(&start_signal, &sig);
  }
  start_guest();
  uint64_t deadline = t_handshake_ns + (uint64_t)opt.timeout_ms * 1000000ULL;
  bool closed_socket = false;
  bool complete = false;
  for (;;) {
    uint64_t t = now_ns();
    if (!closed_socket && opt.close_socket_after_ms >= 0 &&
        t - t_handshake_ns >= (uint64_t)opt.close_socket_after_ms * 1000000ULL) {
      closed_socket = true;
      if (sock >= 0) close(sock);
      sock = -1;
      logmsg("event socket-closed");
    }
    check_socket();
    bool guest_done = atomic_load(&ws_left) == 0;
    if (opt.wait_complete && guest_done && atomic_load(&balloon_done) >= opt.balloon &&
        all_present()) {
      complete = true;
      break;
    }
    if (!opt.wait_complete && atomic_load(&ws_left) == 0 &&
        t - t_handshake_ns >= (uint64_t)opt.hold_ms * 1000000ULL)
      break;
    if (t >= deadline) break;
    usleep(2000);
  }
  result.elapsed_ms = (now_ns() - t_handshake_ns) / 1000000;
  if (!opt.wait_complete) {
    /* Only the touched pages were verified (by the vCPUs). */
    stop_guest();
    check_socket();
    result.outcome = "touched";
    finish(mismatch_count ? 1 : 0);
  }
  if (!complete) {
    result.outcome = "timeout";
    result.code = "FCVMM_TIMEOUT";
    snprintf(result.message, sizeof result.message, "pages still missing after %d ms",
             opt.timeout_ms);
    logmsg("%s", result.message);
    /* The vCPUs may be blocked in faults nobody serves: leave without joining them. */
    result.work_faults = atomic_load(&ws_faults);
    finish(3);
  }
  stop_guest();
  check_socket();
  verify_all();
  result.outcome = "complete";
  logmsg("complete: %llu of %" PRIu64 " pages verified, %llu missing, %llu mismatched",
         (unsigned long long)verified_count, total_pages, (unsigned long long)missing_count,
         (unsigned long long)mismatch_count);
  finish(missing_count || mismatch_count || verified_count != total_pages ? 1 : 0);
}
