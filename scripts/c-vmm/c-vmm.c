/*
 * c-vmm: an independent VMM for yabusame's handoff protocol, written in C from
 * protocol/README.md ("Handoff protocol") alone. It shares no code with vm-sim, so the two do
 * not share blind spots.
 *
 * It maps guest RAM (anonymous, hugetlbfs or shared memfd, one mmap per region), registers it
 * with a userfaultfd, hands the uffd to `yabusame dest` over its UNIX socket (SCM_RIGHTS on the
 * first sendmsg of one JSON line), starts vCPU threads after `ack` that first-touch and verify
 * pages while they still arrive, optionally discards pages (a balloon) or write-protects one,
 * and after `complete` verifies every page of every region against the image file, byte for
 * byte. The result is one JSON object on stdout (--json).
 *
 * Memory layout: one PROT_NONE window is reserved and region 0 is mapped at its top, region 1
 * below it, and so on, with a gap between neighbours; --order then decides how the handoff lists
 * them. Each page carries a state (image, zeros after a discard, plus the version of the last
 * stamp written into it), so its expected content is always exact. The final check reads every
 * page mincore() says is present; an absent page passes only if it must hold zeros (the daemon
 * leaves zero pages nobody touched unplaced, and unregisters every range before `complete`), and
 * a 4 KiB one is read to prove it; any other absent page is "missing".
 *
 * After `complete` no guest thread may still wait in a fault: the ranges are unregistered, so
 * nothing would ever wake it (in a real VMM, a vCPU hung for good). c-vmm counts the threads
 * still queued on its userfaultfd (its fdinfo's "total") and reports them as strandedThreads.
 *
 * Exit codes: 0 every page verified; 1 a mismatch, a missing page or a thread stranded in a fault
 * after complete; 2 usage or setup error;
 * 3 the daemon refused the handoff, ended the session with an error, or the run timed out.
 * `code` in the result is the daemon's error code, or c-vmm's own: CVMM_USAGE, CVMM_SETUP,
 * CVMM_UFFD, CVMM_IMAGE_IO, CVMM_CONNECT (exit 2); CVMM_TIMEOUT, CVMM_CONNECTION_CLOSED (the
 * daemon closed the connection without an error line), CVMM_RESUME_FAILED, CVMM_BAD_REPLY
 * (exit 3). The result's fields are documented with its schema in scripts/c-vmm/c-vmm.ts.
 *
 * Build: cc -O2 -g -pthread -Wall -Wextra -Werror -std=gnu11 -o c-vmm c-vmm.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/mman.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
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

#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif

#define KiB (1024ULL)
#define MiB (1024ULL * KiB)
#define GiB (1024ULL * MiB)
#define HUGE_2M (2 * MiB)
#define MAX_REGIONS 64
#define MAX_MISMATCHES 20
/* protocol/README.md: a handoff line is at most 65,536 bytes, and so is a reply line. */
#define MAX_LINE_BYTES 65536
/* PROT_NONE space between regions, so that no two regions are neighbours (or merge). */
#define GAP_BYTES (2 * MiB)

enum exit_code { EXIT_VERIFIED = 0, EXIT_MISMATCH = 1, EXIT_SETUP = 2, EXIT_SESSION = 3 };
enum backing { BACKING_ANON, BACKING_HUGETLB, BACKING_SHM };
static const char *const backing_names[] = {"anon", "hugetlb", "shm"};
enum order { ORDER_IMAGE, ORDER_REVERSE, ORDER_SHUFFLE };
enum wp_mode { WP_NONE, WP_BEFORE, WP_AFTER };

/*
 * Per-page state, one atomic word per page, so that every page's expected content is exact
 * while vCPUs, the balloon and the write-protect thread act on pages concurrently:
 * ST_LOCK is held by whoever is reading, writing or discarding the page; ST_ZERO says the base
 * content is zeros (the balloon discarded it) instead of the image; the low bits are the
 * version of the stamp last written over the base (0: none).
 */
#define ST_LOCK (1U << 31)
#define ST_ZERO (1U << 30)
#define ST_VERSION ((1U << 30) - 1)

struct region {
  int index;
  char name[16];
  uint64_t offset;      /* where the region starts in the image (= the image file), bytes */
  uint64_t size_bytes;  /* the size the handoff claims, bytes */
  uint64_t page_bytes;  /* page size, bytes */
  enum backing backing;
  uint64_t mapped_bytes; /* what is mapped: size_bytes, or less with --unmap-tail */
  uint8_t *base;
  int memfd;
  uint64_t pages;         /* size_bytes / page_bytes */
  uint64_t mapped_pages;  /* mapped_bytes / page_bytes */
  uint64_t first_global;  /* index of this region's first page among all pages */
  _Atomic uint32_t *state;
  uint8_t *discarded;     /* discarded at least once; written under the page lock */
  uint8_t *written;       /* stamped at least once; written under the page lock */
};

struct mismatch {
  int region;
  uint64_t page;
  char reason[160];
};

/* The stamp a write leaves in a page: enough to tell whose, which page and which write. */
struct stamp {
  uint64_t magic;
  uint32_t region;
  uint32_t version;
  uint64_t page;
  uint64_t check;
};
#define STAMP_MAGIC 0x504d54534d4d5643ULL /* "CVMMSTMP" */

static struct {
  const char *socket_path, *id, *source, *image_path, *secret;
  enum order order;
  int vcpus;
  double touch_fraction, write_fraction;
  int balloon_runs;
  enum wp_mode wp;
  int wp_wait_ms;
  uint64_t unmap_tail_bytes;
  int resume_timeout_ms, timeout_ms;
  uint64_t seed;
  bool json;
} opt = {.order = ORDER_REVERSE,
         .vcpus = 4,
         .touch_fraction = 0.3,
         .write_fraction = 0.2,
         .wp_wait_ms = 3000,
         .timeout_ms = 60000,
         .seed = 1};

static struct region regions[MAX_REGIONS];
/* Region indexes in the order the handoff lists them (--order). */
static int handoff_order[MAX_REGIONS];
static int nregions;
static uint64_t total_pages;
static int image_fd = -1;
static int uffd = -1;

/* Set once the session is over (complete, error, timeout): guest threads stop touching. */
static atomic_bool done;
/* Set just before every range is unregistered: a fault released from then on is filled by the
 * kernel, not by the daemon, so a touch that ends after this proves nothing. */
static atomic_bool unregistered;
/* Guest threads still running (the drain loop reads uffd events until this is 0). */
static atomic_int running_threads;

static pthread_mutex_t mismatch_lock = PTHREAD_MUTEX_INITIALIZER;
static struct mismatch mismatches[MAX_MISMATCHES];
static int nmismatches_listed;
static atomic_ullong mismatch_count, missing_count, verified_count;

/* The first page a vCPU touched, for --wp after (global page index + 1; 0: none yet). */
static pthread_mutex_t touched_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t touched_cond = PTHREAD_COND_INITIALIZER;
static uint64_t first_touched;

static atomic_int balloon_runs_done;
static bool wp_write_completed, wp_ran;

/* ---------------------------------------------------------------- small helpers */

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  flockfile(stderr);
  fputs("c-vmm: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  funlockfile(stderr);
  va_end(ap);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void pause_us(long us) {
  struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
  nanosleep(&ts, NULL);
}

/* splitmix64: seeds every thread's generator from --seed, so a run can be repeated. */
static uint64_t splitmix64(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static uint64_t rng_below(uint64_t *s, uint64_t n) { return n ? splitmix64(s) % n : 0; }
static double rng_unit(uint64_t *s) { return (double)(splitmix64(s) >> 11) / 9007199254740992.0; }

static bool parse_bytes(const char *s, uint64_t *out) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || end == s) return false;
  uint64_t mul = 1;
  if (*end == 'K' || *end == 'k') mul = KiB, end++;
  else if (*end == 'M' || *end == 'm') mul = MiB, end++;
  else if (*end == 'G' || *end == 'g') mul = GiB, end++;
  if (*end) return false;
  if (v > UINT64_MAX / mul) return false;
  *out = v * mul;
  return true;
}

static bool parse_int(const char *s, long min, long max, long *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < min || v > max) return false;
  *out = v;
  return true;
}

static bool parse_fraction(const char *s, double *out) {
  char *end;
  double v = strtod(s, &end);
  if (end == s || *end || !(v >= 0 && v <= 1)) return false;
  *out = v;
  return true;
}

/* ---------------------------------------------------------------- the JSON result */

static void json_string(FILE *f, const char *s) {
  fputc('"', f);
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p == '"' || *p == '\\') fprintf(f, "\\%c", *p);
    else if (*p == '\n') fputs("\\n", f);
    else if (*p < 0x20) fprintf(f, "\\u%04x", *p);
    else fputc(*p, f);
  }
  fputc('"', f);
}

enum outcome { OUTCOME_NONE, OUTCOME_COMPLETE, OUTCOME_REFUSED, OUTCOME_FAILED, OUTCOME_TIMEOUT };
static const char *const outcome_names[] = {"failed", "complete", "refused", "failed", "timeout"};

static struct {
  enum outcome outcome;
  char code[80];
  char message[1100];
  bool acked;
  uint64_t ack_total_pages;
  bool completed;
  uint64_t c_total, c_demand, c_background, c_zero, c_existed, c_discarded;
  uint64_t started_ns, ended_ns;
  int resumes;
  long stranded_threads;
  uint32_t *latencies_us;
  size_t nlatencies;
} result;

static void set_failure(enum outcome o, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_failure(enum outcome o, const char *code, const char *fmt, ...) {
  result.outcome = o;
  snprintf(result.code, sizeof result.code, "%s", code);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(result.message, sizeof result.message, fmt, ap);
  va_end(ap);
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

/* Pages ever discarded (or, when !discarded, ever stamped). */
static uint64_t count_flagged(bool discarded) {
  uint64_t n = 0;
  for (int i = 0; i < nregions; i++) {
    const uint8_t *flags = discarded ? regions[i].discarded : regions[i].written;
    if (!flags) continue; /* a setup error came first */
    for (uint64_t p = 0; p < regions[i].pages; p++) n += flags[p];
  }
  return n;
}

static void print_result(bool ok) {
  FILE *f = stdout;
  uint64_t elapsed_ms =
      result.started_ns && result.ended_ns ? (result.ended_ns - result.started_ns) / 1000000 : 0;
  fprintf(f, "{\"ok\":%s,\"outcome\":\"%s\"", ok ? "true" : "false",
          outcome_names[result.outcome]);
  if (result.code[0]) fputs(",\"code\":", f), json_string(f, result.code);
  if (result.message[0]) fputs(",\"message\":", f), json_string(f, result.message);
  if (result.acked) fprintf(f, ",\"ack\":{\"totalPages\":%" PRIu64 "}", result.ack_total_pages);
  if (result.completed)
    fprintf(f,
            ",\"complete\":{\"totalPages\":%" PRIu64 ",\"demandPages\":%" PRIu64
            ",\"backgroundPages\":%" PRIu64 ",\"zeroPages\":%" PRIu64 ",\"existedPages\":%" PRIu64
            ",\"discardedPages\":%" PRIu64 "}",
            result.c_total, result.c_demand, result.c_background, result.c_zero, result.c_existed,
            result.c_discarded);
  fprintf(f,
          ",\"totalPages\":%" PRIu64 ",\"pagesVerified\":%llu,\"missingPages\":%llu"
          ",\"mismatchCount\":%llu,\"mismatches\":[",
          total_pages, (unsigned long long)verified_count, (unsigned long long)missing_count,
          (unsigned long long)mismatch_count);
  for (int i = 0; i < nmismatches_listed; i++) {
    fprintf(f, "%s{\"region\":", i ? "," : "");
    json_string(f, regions[mismatches[i].region].name);
    fprintf(f, ",\"page\":%" PRIu64 ",\"reason\":", mismatches[i].page);
    json_string(f, mismatches[i].reason);
    fputc('}', f);
  }
  fprintf(f, "],\"writtenPages\":%" PRIu64 ",\"discardedPages\":%" PRIu64 ",\"balloonRuns\":%d",
          count_flagged(false), count_flagged(true),
          atomic_load(&balloon_runs_done));
  uint32_t p50 = 0, p99 = 0, max = 0;
  size_t n = result.nlatencies;
  if (n) {
    qsort(result.latencies_us, n, sizeof *result.latencies_us, cmp_u32);
    p50 = result.latencies_us[n / 2];
    p99 = result.latencies_us[n * 99 / 100 < n ? n * 99 / 100 : n - 1];
    max = result.latencies_us[n - 1];
  }
  fprintf(f, ",\"faults\":{\"count\":%zu,\"p50Us\":%u,\"p99Us\":%u,\"maxUs\":%u}", n, p50, p99,
          max);
  fprintf(f, ",\"elapsedMs\":%" PRIu64 ",\"resumes\":%d,\"strandedThreads\":%ld", elapsed_ms,
          result.resumes, result.stranded_threads);
  if (wp_ran) fprintf(f, ",\"wp\":{\"writeCompleted\":%s}", wp_write_completed ? "true" : "false");
  fputs(",\"handoffOrder\":[", f);
  for (int k = 0; k < nregions; k++) {
    if (k) fputc(',', f);
    json_string(f, regions[handoff_order[k]].name);
  }
  fputs("],\"regions\":[", f);
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    fprintf(f, "%s{\"name\":", i ? "," : "");
    json_string(f, r->name);
    fprintf(f,
            ",\"base\":%" PRIuPTR ",\"sizeBytes\":%" PRIu64 ",\"mappedBytes\":%" PRIu64
            ",\"offset\":%" PRIu64 ",\"pageSizeBytes\":%" PRIu64 ",\"backing\":\"%s\"}",
            (uintptr_t)r->base, r->size_bytes, r->mapped_bytes, r->offset, r->page_bytes,
            backing_names[r->backing]);
  }
  fputs("]}\n", f);
  fflush(f);
}

static _Noreturn void finish(int code) {
  if (!result.ended_ns) result.ended_ns = now_ns();
  bool ok = code == EXIT_VERIFIED;
  if (opt.json) print_result(ok);
  else
    fprintf(stdout,
            "%s: %s%s%s, %llu of %" PRIu64 " pages verified, %llu missing, %llu mismatched\n",
            ok ? "ok" : "FAILED", outcome_names[result.outcome], result.code[0] ? " " : "",
            result.code, (unsigned long long)verified_count, total_pages,
            (unsigned long long)missing_count, (unsigned long long)mismatch_count);
  exit(code);
}

/* A usage or setup error: the session never ran. */
static _Noreturn void setup_error(const char *code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static _Noreturn void setup_error(const char *code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char msg[600];
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  logmsg("%s", msg);
  set_failure(OUTCOME_FAILED, code, "%s", msg);
  finish(EXIT_SETUP);
}

/* ---------------------------------------------------------------- expected contents */

static void read_image(uint64_t offset, uint8_t *buf, uint64_t len) {
  uint64_t got = 0;
  while (got < len) {
    ssize_t n = pread(image_fd, buf + got, len - got, (off_t)(offset + got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      setup_error("CVMM_IMAGE_IO", "read image at %" PRIu64 ": %s", offset + got,
                  strerror(errno));
    if (n == 0) break; /* past the end of the file: a sparse tail reads as zeros */
    got += (uint64_t)n;
  }
  memset(buf + got, 0, len - got);
}

/* Where a page's stamp goes: it moves around the page so stamps do not all share one cache line. */
static uint64_t stamp_offset(const struct region *r, uint64_t page) {
  return ((page * 1096) % (r->page_bytes - sizeof(struct stamp))) & ~(uint64_t)7;
}

static struct stamp make_stamp(const struct region *r, uint64_t page, uint32_t version) {
  struct stamp s = {.magic = STAMP_MAGIC, .region = (uint32_t)r->index, .version = version,
                    .page = page};
  s.check = (opt.seed * 0x9e3779b97f4a7c15ULL) ^ (page << 20) ^ version;
  return s;
}

/* The page's content as its state says it must be: image or zeros, then the last stamp. */
static void expected_page(const struct region *r, uint64_t page, uint32_t st, uint8_t *buf) {
  if (st & ST_ZERO) memset(buf, 0, r->page_bytes);
  else read_image(r->offset + page * r->page_bytes, buf, r->page_bytes);
  uint32_t version = st & ST_VERSION;
  if (version) {
    struct stamp s = make_stamp(r, page, version);
    memcpy(buf + stamp_offset(r, page), &s, sizeof s);
  }
}

static void record_mismatch(const struct region *r, uint64_t page, bool missing, const char *fmt,
                            ...) __attribute__((format(printf, 4, 5)));
static void record_mismatch(const struct region *r, uint64_t page, bool missing, const char *fmt,
                            ...) {
  atomic_fetch_add(missing ? &missing_count : &mismatch_count, 1);
  pthread_mutex_lock(&mismatch_lock);
  if (nmismatches_listed < MAX_MISMATCHES) {
    struct mismatch *m = &mismatches[nmismatches_listed++];
    m->region = r->index;
    m->page = page;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->reason, sizeof m->reason, fmt, ap);
    va_end(ap);
  }
  pthread_mutex_unlock(&mismatch_lock);
}

static void describe_state(uint32_t st, char *out, size_t cap) {
  uint32_t v = st & ST_VERSION;
  if (v) snprintf(out, cap, "%s + stamp v%u", st & ST_ZERO ? "zero" : "image", v);
  else snprintf(out, cap, "%s", st & ST_ZERO ? "zero (discarded)" : "image");
}

/*
 * The page was zero before the guest touched it here (discarded, or zero in the image), so the
 * daemon may have left it unplaced: absent at complete, zeros on the first touch after it.
 */
static bool zero_before_touch(const struct region *r, uint64_t page, uint32_t st, uint8_t *buf) {
  if (st & ST_ZERO) return true;
  read_image(r->offset + page * r->page_bytes, buf, r->page_bytes);
  for (uint64_t i = 0; i < r->page_bytes; i++)
    if (buf[i]) return false;
  return true;
}

/* Compares a page of guest memory with what it must hold; true when equal. */
static bool verify_page(const struct region *r, uint64_t page, uint32_t st, uint8_t *buf) {
  const uint8_t *mem = r->base + page * r->page_bytes;
  expected_page(r, page, st, buf);
  if (memcmp(mem, buf, r->page_bytes) == 0) return true;
  uint64_t i = 0;
  while (mem[i] == buf[i]) i++;
  char what[48];
  describe_state(st, what, sizeof what);
  record_mismatch(r, page, false, "byte %" PRIu64 ": 0x%02x, expected 0x%02x (%s)", i, mem[i],
                  buf[i], what);
  return false;
}

/* ---------------------------------------------------------------- page locks */

static bool try_lock_page(struct region *r, uint64_t page, uint32_t *st) {
  uint32_t cur = atomic_load(&r->state[page]);
  if (cur & ST_LOCK) return false;
  if (!atomic_compare_exchange_strong(&r->state[page], &cur, cur | ST_LOCK)) return false;
  *st = cur;
  return true;
}

static void unlock_page(struct region *r, uint64_t page, uint32_t st) {
  atomic_store(&r->state[page], st & ~ST_LOCK);
}

static uint32_t next_version(uint32_t st) {
  uint32_t v = ((st & ST_VERSION) + 1) & ST_VERSION;
  return v ? v : 1;
}

static bool resident(const struct region *r, uint64_t page) {
  unsigned char vec[HUGE_2M / 4096];
  if (mincore(r->base + page * r->page_bytes, r->page_bytes, vec) != 0) return false;
  return vec[0] & 1;
}

static uint64_t max_page_bytes(void) {
  uint64_t max = 0;
  for (int i = 0; i < nregions; i++)
    if (regions[i].page_bytes > max) max = regions[i].page_bytes;
  return max;
}

static void global_page(uint64_t g, struct region **r, uint64_t *page) {
  int lo = 0, hi = nregions - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (regions[mid].first_global <= g) lo = mid;
    else hi = mid - 1;
  }
  *r = &regions[lo];
  *page = g - regions[lo].first_global;
}

/* ---------------------------------------------------------------- vCPU threads */

struct vcpu {
  pthread_t thread;
  uint64_t rng;
  uint64_t *touches; /* global page indexes to first-touch, in this order */
  size_t ntouches;
  uint8_t *buf;
  uint32_t *lat_us;
  size_t nlat, cap;
};

static void note_first_touch(uint64_t g) {
  pthread_mutex_lock(&touched_lock);
  if (!first_touched) {
    first_touched = g + 1;
    pthread_cond_broadcast(&touched_cond);
  }
  pthread_mutex_unlock(&touched_lock);
}

/*
 * One touch: lock the page, note whether it is present, read it (or write a stamp first: a write
 * fault on a missing page is a path of its own), time that first access, verify the whole page.
 */
static void touch(struct vcpu *v, uint64_t g) {
  struct region *r;
  uint64_t page;
  global_page(g, &r, &page);
  if (page >= r->mapped_pages) return;
  uint32_t st;
  if (!try_lock_page(r, page, &st)) return; /* the balloon or the wp thread has it */
  uint8_t *addr = r->base + page * r->page_bytes;
  bool was_present = resident(r, page);
  bool write = rng_unit(&v->rng) < opt.write_fraction;
  uint32_t nst = st;
  uint64_t t0 = now_ns();
  if (write) {
    nst = (st & ST_ZERO) | next_version(st);
    struct stamp s = make_stamp(r, page, nst & ST_VERSION);
    memcpy(addr + stamp_offset(r, page), &s, sizeof s);
  } else {
    (void)*(volatile uint8_t *)(addr + stamp_offset(r, page));
  }
  uint64_t t1 = now_ns();
  if (!was_present) {
    if (v->nlat == v->cap) {
      v->cap = v->cap ? v->cap * 2 : 1024;
      v->lat_us = realloc(v->lat_us, v->cap * sizeof *v->lat_us);
      if (!v->lat_us) abort();
    }
    uint64_t us = (t1 - t0) / 1000;
    v->lat_us[v->nlat++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
  }
  /* Once the ranges are unregistered a released fault reads kernel zero-fill, not the daemon's
   * page: such a touch proves nothing (the final check reports pages missing at complete). */
  if (!atomic_load(&unregistered)) verify_page(r, page, nst, v->buf);
  if (write) r->written[page] = 1;
  unlock_page(r, page, nst);
  note_first_touch(g);
}

static void *vcpu_main(void *arg) {
  struct vcpu *v = arg;
  for (size_t i = 0; i < v->ntouches && !atomic_load(&done); i++) touch(v, v->touches[i]);
  /* With a balloon the guest stays busy: it keeps touching random pages, some of them freed,
   * which must fault back as zeros, at a pace that leaves the host's CPUs to the daemon.
   * Otherwise it goes quiet, so that what the daemon does meanwhile is its own doing. */
  while (opt.balloon_runs > 0 && !atomic_load(&done)) {
    touch(v, rng_below(&v->rng, total_pages));
    pause_us(100);
  }
  atomic_fetch_sub(&running_threads, 1);
  return NULL;
}

/* ---------------------------------------------------------------- the balloon */

static void *balloon_main(void *arg) {
  uint64_t rng = (uint64_t)(uintptr_t)arg;
  int attempts = 0;
  while (atomic_load(&balloon_runs_done) < opt.balloon_runs && !atomic_load(&done) &&
         attempts < opt.balloon_runs * 100) {
    attempts++;
    struct region *r;
    uint64_t first;
    global_page(rng_below(&rng, total_pages), &r, &first);
    uint64_t max_run = r->page_bytes >= HUGE_2M ? 2 : 16;
    uint64_t n = 1 + rng_below(&rng, max_run);
    if (first >= r->mapped_pages) continue;
    if (first + n > r->mapped_pages) n = r->mapped_pages - first;
    uint32_t st;
    uint64_t locked = 0;
    while (locked < n && try_lock_page(r, first + locked, &st)) locked++;
    if (locked < n) {
      for (uint64_t i = 0; i < locked; i++)
        unlock_page(r, first + i, atomic_load(&r->state[first + i]));
      continue;
    }
    /* anon and hugetlb: MADV_DONTNEED drops the pages (whole huge pages here); shm: the pages
     * live in the memfd, so MADV_REMOVE punches them out of the file (madvise(2)). Both raise
     * UFFD_EVENT_REMOVE, and the madvise waits until the daemon has read it. */
    int advice = r->backing == BACKING_SHM ? MADV_REMOVE : MADV_DONTNEED;
    if (madvise(r->base + first * r->page_bytes, n * r->page_bytes, advice) != 0) {
      logmsg("balloon: madvise(%s, page %" PRIu64 ", %" PRIu64 " pages): %s", r->name, first, n,
             strerror(errno));
      for (uint64_t i = 0; i < n; i++) unlock_page(r, first + i, atomic_load(&r->state[first + i]));
      break;
    }
    for (uint64_t i = 0; i < n; i++) {
      r->discarded[first + i] = 1;
      unlock_page(r, first + i, ST_ZERO);
    }
    atomic_fetch_add(&balloon_runs_done, 1);
    pause_us(2000); /* spread the discards over the migration: some pages present, some not */
  }
  atomic_fetch_sub(&running_threads, 1);
  return NULL;
}

/* ---------------------------------------------------------------- write-protect after ack */

struct wp_writer {
  uint8_t *addr;
  struct stamp stamp;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool completed;
};

static void *wp_writer_main(void *arg) {
  struct wp_writer *w = arg;
  memcpy(w->addr, &w->stamp, sizeof w->stamp);
  pthread_mutex_lock(&w->lock);
  w->completed = true;
  pthread_cond_signal(&w->cond);
  pthread_mutex_unlock(&w->lock);
  return NULL;
}

static int uffd_register(struct region *r, uint64_t start, uint64_t len, uint64_t mode) {
  struct uffdio_register reg = {.range = {.start = (uintptr_t)start, .len = len}, .mode = mode};
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) return -errno;
  if (!(reg.ioctls & (1ULL << _UFFDIO_COPY))) {
    logmsg("%s: the kernel offers no UFFDIO_COPY on this range", r->name);
    return -EINVAL;
  }
  return 0;
}

static int uffd_unregister(uint64_t start, uint64_t len) {
  struct uffdio_range range = {.start = start, .len = len};
  return ioctl(uffd, UFFDIO_UNREGISTER, &range) == 0 ? 0 : -errno;
}

/*
 * The kernel wakes a range's waiters before it clears the registration, and a fault taken under
 * the per-VMA lock can queue in between: after an unregister, a wake of the same range frees it.
 */
static void uffd_wake(uint64_t start, uint64_t len) {
  struct uffdio_range range = {.start = start, .len = len};
  if (ioctl(uffd, UFFDIO_WAKE, &range) != 0) logmsg("UFFDIO_WAKE: %s", strerror(errno));
}

/* Threads queued on the userfaultfd, read or not: "total" in its fdinfo. */
static long queued_faults(void) {
  char path[64], buf[512];
  snprintf(path, sizeof path, "/proc/self/fdinfo/%d", uffd);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return -1;
  buf[n] = 0;
  const char *t = strstr(buf, "total:");
  return t ? strtol(t + 6, NULL, 10) : -1;
}

/*
 * After ack, a write-protect fault arrives at a daemon that only knows MISSING faults: nothing it
 * can place resolves it. The write must not complete, and the daemon must not spin on it.
 */
static void *wp_main(void *arg) {
  (void)arg;
  struct region *r;
  uint64_t page;
  pthread_mutex_lock(&touched_lock);
  while (!first_touched && !atomic_load(&done)) pthread_cond_wait(&touched_cond, &touched_lock);
  uint64_t g = first_touched - 1;
  pthread_mutex_unlock(&touched_lock);
  if (!first_touched) goto out;
  global_page(g, &r, &page);
  uint32_t st;
  while (!try_lock_page(r, page, &st)) {
    if (atomic_load(&done)) goto out;
    sched_yield();
  }
  uint8_t *addr = r->base + page * r->page_bytes;
  int err = uffd_register(r, (uintptr_t)r->base, r->mapped_bytes,
                          UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
  if (err) {
    logmsg("wp: re-register %s MISSING|WP: %s", r->name, strerror(-err));
    unlock_page(r, page, st);
    goto out;
  }
  struct uffdio_writeprotect wp = {.range = {.start = (uintptr_t)addr, .len = r->page_bytes},
                                   .mode = UFFDIO_WRITEPROTECT_MODE_WP};
  if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0) {
    logmsg("wp: UFFDIO_WRITEPROTECT %s page %" PRIu64 ": %s", r->name, page, strerror(errno));
    unlock_page(r, page, st);
    goto out;
  }
  uint32_t nst = (st & ST_ZERO) | next_version(st);
  struct wp_writer w = {.addr = addr + stamp_offset(r, page),
                        .stamp = make_stamp(r, page, nst & ST_VERSION),
                        .lock = PTHREAD_MUTEX_INITIALIZER,
                        .cond = PTHREAD_COND_INITIALIZER};
  pthread_t writer;
  if (pthread_create(&writer, NULL, wp_writer_main, &w) != 0) abort();
  wp_ran = true;
  logmsg("event wp-write %s page %" PRIu64, r->name, page);
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += opt.wp_wait_ms / 1000;
  deadline.tv_nsec += (long)(opt.wp_wait_ms % 1000) * 1000000L;
  if (deadline.tv_nsec >= 1000000000L) deadline.tv_sec++, deadline.tv_nsec -= 1000000000L;
  pthread_mutex_lock(&w.lock);
  while (!w.completed && pthread_cond_timedwait(&w.cond, &w.lock, &deadline) != ETIMEDOUT) {
  }
  wp_write_completed = w.completed;
  pthread_mutex_unlock(&w.lock);
  logmsg("event wp-verdict %s: the write %s within %d ms",
         wp_write_completed ? "completed" : "blocked",
         wp_write_completed ? "completed" : "did not complete", opt.wp_wait_ms);
  /* Unregistering wakes the blocked writer and clears the page's write protection
   * (userfaultfd(2)); the rest of the region stays registered for MISSING faults. */
  err = uffd_unregister((uintptr_t)addr, r->page_bytes);
  if (err) logmsg("wp: unregister %s page %" PRIu64 ": %s", r->name, page, strerror(-err));
  pthread_join(writer, NULL);
  r->written[page] = 1;
  unlock_page(r, page, nst);
out:
  atomic_fetch_sub(&running_threads, 1);
  return NULL;
}

/* ---------------------------------------------------------------- setup */

static void usage(void) {
  fputs("usage: c-vmm --socket PATH --id ID --source URL --image PATH [options]\n"
        "  --region OFF:SIZE[:PAGE[:BACKING]]  repeatable; PAGE 4k|2m, BACKING anon|hugetlb|shm\n"
        "  --order image|reverse|shuffle  --vcpus N  --touch-fraction F  --write-fraction F\n"
        "  --balloon N  --wp before|after  --wp-wait-ms MS  --unmap-tail BYTES  --secret HEX\n"
        "  --resume-timeout MS  --timeout MS  --seed N  --json\n",
        stderr);
}

static _Noreturn void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static _Noreturn void usage_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char msg[400];
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  usage();
  setup_error("CVMM_USAGE", "%s", msg);
}

static void parse_region(const char *spec) {
  if (nregions == MAX_REGIONS) usage_error("at most %d regions", MAX_REGIONS);
  char buf[200];
  snprintf(buf, sizeof buf, "%s", spec);
  char *fields[5] = {0};
  int n = 0;
  for (char *save, *tok = strtok_r(buf, ":", &save); tok && n < 5; tok = strtok_r(NULL, ":", &save))
    fields[n++] = tok;
  if (n < 2 || n > 4) usage_error("--region %s: expected OFF:SIZE[:PAGE[:BACKING]]", spec);
  struct region *r = &regions[nregions];
  memset(r, 0, sizeof *r);
  r->index = nregions;
  r->memfd = -1;
  snprintf(r->name, sizeof r->name, "ram%d", nregions);
  if (!parse_bytes(fields[0], &r->offset) || !parse_bytes(fields[1], &r->size_bytes) ||
      r->size_bytes == 0)
    usage_error("--region %s: bad offset or size", spec);
  r->page_bytes = 4 * KiB;
  if (n >= 3) {
    if (!strcmp(fields[2], "4k")) r->page_bytes = 4 * KiB;
    else if (!strcmp(fields[2], "2m")) r->page_bytes = HUGE_2M;
    else usage_error("--region %s: page size must be 4k or 2m", spec);
  }
  r->backing = r->page_bytes == HUGE_2M ? BACKING_HUGETLB : BACKING_ANON;
  if (n == 4) {
    if (!strcmp(fields[3], "anon")) r->backing = BACKING_ANON;
    else if (!strcmp(fields[3], "hugetlb")) r->backing = BACKING_HUGETLB;
    else if (!strcmp(fields[3], "shm")) r->backing = BACKING_SHM;
    else usage_error("--region %s: backing must be anon, hugetlb or shm", spec);
  }
  if ((r->backing == BACKING_HUGETLB) != (r->page_bytes == HUGE_2M) &&
      !(r->backing == BACKING_SHM))
    usage_error("--region %s: 2m pages need hugetlb or shm, hugetlb needs 2m pages", spec);
  if (r->offset % r->page_bytes || r->size_bytes % r->page_bytes)
    usage_error("--region %s: offset and size must be multiples of the page size", spec);
  nregions++;
}

static void parse_args(int argc, char **argv) {
  for (int i = 1; i < argc; i++)
    if (!strcmp(argv[i], "--json")) opt.json = true;
  enum { O_SOCKET = 256, O_ID, O_SOURCE, O_IMAGE, O_REGION, O_ORDER, O_VCPUS, O_TOUCH, O_WRITE,
         O_BALLOON, O_WP, O_WP_WAIT, O_UNMAP_TAIL, O_SECRET, O_RESUME, O_TIMEOUT, O_SEED, O_JSON,
         O_HELP };
  static const struct option longopts[] = {
      {"socket", required_argument, 0, O_SOCKET},     {"id", required_argument, 0, O_ID},
      {"source", required_argument, 0, O_SOURCE},     {"image", required_argument, 0, O_IMAGE},
      {"region", required_argument, 0, O_REGION},     {"order", required_argument, 0, O_ORDER},
      {"vcpus", required_argument, 0, O_VCPUS},
      {"touch-fraction", required_argument, 0, O_TOUCH},
      {"write-fraction", required_argument, 0, O_WRITE},
      {"balloon", required_argument, 0, O_BALLOON},   {"wp", required_argument, 0, O_WP},
      {"wp-wait-ms", required_argument, 0, O_WP_WAIT},
      {"unmap-tail", required_argument, 0, O_UNMAP_TAIL},
      {"secret", required_argument, 0, O_SECRET},
      {"resume-timeout", required_argument, 0, O_RESUME},
      {"timeout", required_argument, 0, O_TIMEOUT},   {"seed", required_argument, 0, O_SEED},
      {"json", no_argument, 0, O_JSON},               {"help", no_argument, 0, O_HELP},
      {0, 0, 0, 0}};
  long v;
  int c;
  opterr = 0;
  while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
    switch (c) {
    case O_SOCKET: opt.socket_path = optarg; break;
    case O_ID: opt.id = optarg; break;
    case O_SOURCE: opt.source = optarg; break;
    case O_IMAGE: opt.image_path = optarg; break;
    case O_REGION: parse_region(optarg); break;
    case O_ORDER:
      if (!strcmp(optarg, "image")) opt.order = ORDER_IMAGE;
      else if (!strcmp(optarg, "reverse")) opt.order = ORDER_REVERSE;
      else if (!strcmp(optarg, "shuffle")) opt.order = ORDER_SHUFFLE;
      else usage_error("--order must be image, reverse or shuffle");
      break;
    case O_VCPUS:
      if (!parse_int(optarg, 0, 256, &v)) usage_error("--vcpus must be 0..256");
      opt.vcpus = (int)v;
      break;
    case O_TOUCH:
      if (!parse_fraction(optarg, &opt.touch_fraction))
        usage_error("--touch-fraction must be in [0, 1]");
      break;
    case O_WRITE:
      if (!parse_fraction(optarg, &opt.write_fraction))
        usage_error("--write-fraction must be in [0, 1]");
      break;
    case O_BALLOON:
      if (!parse_int(optarg, 0, 1000000, &v)) usage_error("--balloon must be 0..1000000");
      opt.balloon_runs = (int)v;
      break;
    case O_WP:
      if (!strcmp(optarg, "before")) opt.wp = WP_BEFORE;
      else if (!strcmp(optarg, "after")) opt.wp = WP_AFTER;
      else usage_error("--wp must be before or after");
      break;
    case O_WP_WAIT:
      if (!parse_int(optarg, 1, 3600000, &v)) usage_error("--wp-wait-ms must be 1..3600000");
      opt.wp_wait_ms = (int)v;
      break;
    case O_UNMAP_TAIL:
      if (!parse_bytes(optarg, &opt.unmap_tail_bytes)) usage_error("--unmap-tail: bad size");
      break;
    case O_SECRET:
      for (const char *p = optarg; *p; p++)
        if (!strchr("0123456789abcdefABCDEF", *p)) usage_error("--secret must be hex");
      opt.secret = optarg;
      break;
    case O_RESUME:
      if (!parse_int(optarg, 1, 3600000, &v)) usage_error("--resume-timeout must be 1..3600000 ms");
      opt.resume_timeout_ms = (int)v;
      break;
    case O_TIMEOUT:
      if (!parse_int(optarg, 1, 86400000, &v)) usage_error("--timeout must be 1..86400000 ms");
      opt.timeout_ms = (int)v;
      break;
    case O_SEED:
      if (!parse_int(optarg, 0, LONG_MAX, &v))
        usage_error("--seed must be a non-negative integer");
      opt.seed = (uint64_t)v;
      break;
    case O_JSON: opt.json = true; break;
    case O_HELP: usage(); exit(0);
    default: usage_error("unknown or incomplete option %s", argv[optind - 1]);
    }
  }
  if (optind < argc) usage_error("unexpected argument %s", argv[optind]);
  /* The page to write-protect is one a vCPU has touched, so it is present. */
  if (opt.wp == WP_AFTER && opt.vcpus == 0) usage_error("--wp after needs --vcpus 1 or more");
  if (!opt.socket_path || !opt.id || !opt.source || !opt.image_path)
    usage_error("--socket, --id, --source and --image are required");
}

static void setup_regions(void) {
  image_fd = open(opt.image_path, O_RDONLY | O_CLOEXEC);
  if (image_fd < 0) setup_error("CVMM_IMAGE_IO", "open %s: %s", opt.image_path, strerror(errno));
  if (nregions == 0) {
    struct stat sb;
    if (fstat(image_fd, &sb) != 0)
      setup_error("CVMM_IMAGE_IO", "stat %s: %s", opt.image_path, strerror(errno));
    if (sb.st_size <= 0 || sb.st_size % 4096)
      setup_error("CVMM_USAGE", "%s: size %lld is not a positive multiple of 4096", opt.image_path,
                  (long long)sb.st_size);
    char spec[64];
    snprintf(spec, sizeof spec, "0:%lld", (long long)sb.st_size);
    parse_region(spec);
  }
  struct region *last = &regions[nregions - 1];
  if (opt.unmap_tail_bytes) {
    if (opt.unmap_tail_bytes % last->page_bytes || opt.unmap_tail_bytes >= last->size_bytes)
      usage_error("--unmap-tail must be whole pages, less than the last region");
  }
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    r->pages = r->size_bytes / r->page_bytes;
    r->mapped_bytes = r->size_bytes - (r == last ? opt.unmap_tail_bytes : 0);
    r->mapped_pages = r->mapped_bytes / r->page_bytes;
    r->first_global = total_pages;
    total_pages += r->pages;
    r->state = calloc(r->pages, sizeof *r->state);
    r->discarded = calloc(r->pages, 1);
    r->written = calloc(r->pages, 1);
    if (!r->state || !r->discarded || !r->written) setup_error("CVMM_SETUP", "out of memory");
  }
  /*
   * The layout is fixed rather than left to mmap's choices: one PROT_NONE window is reserved,
   * then region 0 is mapped at its top, region 1 below it, and so on, each in a 2 MiB-aligned
   * slot with a gap above it. So every region is its own mapping at an address unrelated to its
   * image offset, and the handoff order (--order) decides whether a later region is listed
   * second although it lies lower in memory.
   */
  uint64_t window = HUGE_2M; /* slack to align the window's start */
  for (int i = 0; i < nregions; i++)
    window += GAP_BYTES + (regions[i].size_bytes + HUGE_2M - 1) / HUGE_2M * HUGE_2M;
  uint8_t *reserved =
      mmap(NULL, window, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserved == MAP_FAILED)
    setup_error("CVMM_SETUP", "reserve %" PRIu64 " bytes of address space: %s", window,
                strerror(errno));
  uintptr_t top = ((uintptr_t)reserved + window) / HUGE_2M * HUGE_2M;
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    top -= GAP_BYTES + (r->size_bytes + HUGE_2M - 1) / HUGE_2M * HUGE_2M;
    void *want = (void *)top;
    int prot = PROT_READ | PROT_WRITE;
    void *base;
    if (r->backing == BACKING_SHM) {
      /* Like QEMU's memory-backend-file,share=on: a shared file mapping, shmem or hugetlbfs. */
      unsigned flags = MFD_CLOEXEC | (r->page_bytes == HUGE_2M ? MFD_HUGETLB | MFD_HUGE_2MB : 0);
      r->memfd = memfd_create(r->name, flags);
      if (r->memfd < 0) setup_error("CVMM_SETUP", "memfd_create %s: %s", r->name, strerror(errno));
      if (ftruncate(r->memfd, (off_t)r->size_bytes) != 0)
        setup_error("CVMM_SETUP", "ftruncate %s: %s", r->name, strerror(errno));
      base = mmap(want, r->size_bytes, prot, MAP_SHARED | MAP_FIXED, r->memfd, 0);
    } else if (r->backing == BACKING_HUGETLB) {
      /* No MAP_NORESERVE: the huge pages are reserved now, so a fault can never SIGBUS. */
      base = mmap(want, r->size_bytes, prot,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_HUGETLB | MAP_HUGE_2MB, -1, 0);
    } else {
      base = mmap(want, r->size_bytes, prot,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    }
    if (base == MAP_FAILED)
      setup_error("CVMM_SETUP", "mmap %s (%" PRIu64 " bytes, %s): %s", r->name, r->size_bytes,
                  backing_names[r->backing], strerror(errno));
    r->base = base;
  }
}

static uint64_t probe_features(void) {
  int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return 0;
  struct uffdio_api api = {.api = UFFD_API};
  uint64_t features = ioctl(fd, UFFDIO_API, &api) == 0 ? api.features : 0;
  close(fd);
  return features;
}

static int open_uffd(void) {
  int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd >= 0) return fd;
  int err = errno;
  /* Where the syscall is denied to unprivileged users, /dev/userfaultfd hands them out. */
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev < 0)
    setup_error("CVMM_UFFD", "userfaultfd: %s; /dev/userfaultfd: %s", strerror(err),
                strerror(errno));
  fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
  int err2 = errno;
  close(dev);
  if (fd < 0) setup_error("CVMM_UFFD", "USERFAULTFD_IOC_NEW: %s", strerror(err2));
  return fd;
}

static void setup_uffd(void) {
  bool hugetlb = false, shm = false, wp_shared = false;
  for (int i = 0; i < nregions; i++) {
    bool huge_backed = regions[i].page_bytes == HUGE_2M;
    hugetlb |= huge_backed;
    shm |= regions[i].backing == BACKING_SHM && !huge_backed;
    wp_shared |= regions[i].backing != BACKING_ANON;
  }
  uint64_t want = UFFD_FEATURE_THREAD_ID;
  if (hugetlb) want |= UFFD_FEATURE_MISSING_HUGETLBFS;
  if (shm) want |= UFFD_FEATURE_MISSING_SHMEM;
  if (opt.balloon_runs) want |= UFFD_FEATURE_EVENT_REMOVE;
  if (opt.wp != WP_NONE) {
    want |= UFFD_FEATURE_PAGEFAULT_FLAG_WP;
    if (wp_shared) want |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
  }
  uint64_t have = probe_features();
  if ((want & have) != want)
    setup_error("CVMM_UFFD",
                "the kernel lacks userfaultfd features 0x%" PRIx64 " (offers 0x%" PRIx64 ")",
                want & ~have, have);
  uffd = open_uffd();
  struct uffdio_api api = {.api = UFFD_API, .features = want};
  if (ioctl(uffd, UFFDIO_API, &api) != 0)
    setup_error("CVMM_UFFD", "UFFDIO_API features 0x%" PRIx64 ": %s", want, strerror(errno));
  uint64_t mode = UFFDIO_REGISTER_MODE_MISSING;
  if (opt.wp == WP_BEFORE) mode |= UFFDIO_REGISTER_MODE_WP;
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    int err = uffd_register(r, (uintptr_t)r->base, r->size_bytes, mode);
    if (err) setup_error("CVMM_UFFD", "UFFDIO_REGISTER %s: %s", r->name, strerror(-err));
  }
  /* --unmap-tail: the region was registered whole, then loses its tail, so the handoff
   * describes memory of which only a part still exists. Nothing maps here before the reply:
   * no thread stack or large malloc can fill the hole first. */
  struct region *last = &regions[nregions - 1];
  if (last->mapped_bytes < last->size_bytes &&
      munmap(last->base + last->mapped_bytes, last->size_bytes - last->mapped_bytes) != 0)
    setup_error("CVMM_SETUP", "munmap tail of %s: %s", last->name, strerror(errno));
}

/* ---------------------------------------------------------------- the handoff */

static int cmp_by_offset(const void *a, const void *b) {
  uint64_t x = regions[*(const int *)a].offset, y = regions[*(const int *)b].offset;
  return x < y ? -1 : x > y;
}

static void choose_order(void) {
  for (int i = 0; i < nregions; i++) handoff_order[i] = i;
  qsort(handoff_order, (size_t)nregions, sizeof *handoff_order, cmp_by_offset);
  if (opt.order == ORDER_REVERSE) {
    for (int i = 0, j = nregions - 1; i < j; i++, j--) {
      int t = handoff_order[i];
      handoff_order[i] = handoff_order[j];
      handoff_order[j] = t;
    }
  } else if (opt.order == ORDER_SHUFFLE) {
    uint64_t rng = opt.seed ^ 0x0bde5ULL;
    for (int i = nregions - 1; i > 0; i--) {
      int j = (int)rng_below(&rng, (uint64_t)i + 1);
      int t = handoff_order[i];
      handoff_order[i] = handoff_order[j];
      handoff_order[j] = t;
    }
  }
}

/* The handoff line, newline included, in a malloc'd buffer of *len bytes. */
static char *build_handoff(bool resume, size_t *len) {
  char *line = NULL;
  FILE *f = open_memstream(&line, len);
  if (!f) setup_error("CVMM_SETUP", "open_memstream: %s", strerror(errno));
  fputs("{\"type\":\"handoff\",\"version\":1,\"migrationId\":", f);
  json_string(f, opt.id);
  fputs(",\"source\":", f);
  json_string(f, opt.source);
  fputs(",\"regions\":[", f);
  for (int k = 0; k < nregions; k++) {
    const struct region *r = &regions[handoff_order[k]];
    fprintf(f,
            "%s{\"name\":\"%s\",\"base\":%" PRIuPTR ",\"sizeBytes\":%" PRIu64
            ",\"offset\":%" PRIu64 ",\"pageSizeBytes\":%" PRIu64 "}",
            k ? "," : "", r->name, (uintptr_t)r->base, r->size_bytes, r->offset, r->page_bytes);
  }
  fputc(']', f);
  if (resume) fputs(",\"resume\":true", f);
  if (opt.secret) fprintf(f, ",\"secret\":\"%s\"", opt.secret);
  fputs("}\n", f);
  if (fclose(f) != 0) setup_error("CVMM_SETUP", "build the handoff line: %s", strerror(errno));
  if (*len > MAX_LINE_BYTES)
    setup_error("CVMM_USAGE", "the handoff line is %zu bytes, over %d", *len, MAX_LINE_BYTES);
  return line;
}

static int connect_socket(void) {
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  if (strlen(opt.socket_path) >= sizeof addr.sun_path) {
    errno = ENAMETOOLONG;
    return -1;
  }
  strcpy(addr.sun_path, opt.socket_path);
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) return -1;
  if (connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) {
    int err = errno;
    close(s);
    errno = err;
    return -1;
  }
  return s;
}

/* The first sendmsg carries the uffd (SCM_RIGHTS) with the line; later ones carry the rest. */
static int send_handoff(int s, const char *line, size_t len) {
  union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
  } control;
  memset(&control, 0, sizeof control);
  struct iovec iov = {.iov_base = (void *)line, .iov_len = len};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                       .msg_controllen = sizeof control.buf};
  struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &uffd, sizeof(int));
  ssize_t n;
  do n = sendmsg(s, &msg, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n < 0) return -1;
  size_t sent = (size_t)n;
  while (sent < len) {
    n = send(s, line + sent, len - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    sent += (size_t)n;
  }
  return 0;
}

/* ---------------------------------------------------------------- reply lines (flat JSON) */

static const char *skip_ws(const char *s) {
  while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n') s++;
  return s;
}

/* Skips one JSON value; NULL when malformed. */
static const char *skip_value(const char *s) {
  s = skip_ws(s);
  if (*s == '"') {
    for (s++; *s && *s != '"'; s++)
      if (*s == '\\' && !*++s) return NULL;
    return *s ? s + 1 : NULL;
  }
  if (*s == '{' || *s == '[') {
    char close = *s == '{' ? '}' : ']';
    s = skip_ws(s + 1);
    if (*s == close) return s + 1;
    for (;;) {
      if (close == '}') {
        s = skip_value(s);
        if (!s) return NULL;
        s = skip_ws(s);
        if (*s++ != ':') return NULL;
      }
      s = skip_value(s);
      if (!s) return NULL;
      s = skip_ws(s);
      if (*s == close) return s + 1;
      if (*s++ != ',') return NULL;
    }
  }
  const char *start = s;
  while (*s && !strchr(",}] \t\r\n", *s)) s++;
  return s > start ? s : NULL;
}

/* The value of a top-level key of a JSON object, or NULL. */
static const char *json_find(const char *obj, const char *key) {
  const char *s = skip_ws(obj);
  if (*s++ != '{') return NULL;
  size_t klen = strlen(key);
  for (;;) {
    s = skip_ws(s);
    if (*s != '"') return NULL;
    const char *k = s + 1;
    const char *after = skip_value(s);
    if (!after) return NULL;
    bool match = (size_t)(after - 1 - k) == klen && !memcmp(k, key, klen);
    s = skip_ws(after);
    if (*s++ != ':') return NULL;
    s = skip_ws(s);
    if (match) return s;
    s = skip_value(s);
    if (!s) return NULL;
    s = skip_ws(s);
    if (*s++ != ',') return NULL;
  }
}

static bool json_get_string(const char *obj, const char *key, char *out, size_t cap) {
  const char *v = json_find(obj, key);
  if (!v || *v != '"' || cap == 0) return false;
  size_t n = 0;
  for (v++; *v && *v != '"'; v++) {
    char c = *v;
    if (c == '\\') {
      c = *++v;
      if (c == 'n') c = '\n';
      else if (c == 't') c = '\t';
      else if (c == 'u') {
        /* Non-ASCII escapes are rare in messages; keep a placeholder rather than decode. */
        for (int i = 0; i < 4 && v[1]; i++) v++;
        c = '?';
      } else if (c != '"' && c != '\\' && c != '/') c = '?';
    }
    if (n + 1 < cap) out[n++] = c;
  }
  out[n] = 0;
  return *v == '"';
}

static bool json_get_u64(const char *obj, const char *key, uint64_t *out) {
  const char *v = json_find(obj, key);
  if (!v) return false;
  char *end;
  errno = 0;
  unsigned long long n = strtoull(v, &end, 10);
  if (errno || end == v || *v == '-') return false;
  *out = n;
  return true;
}

/* ---------------------------------------------------------------- guest threads */

static struct vcpu *vcpus;
static pthread_t balloon_thread, wp_thread;
static bool threads_started, balloon_started, wp_started;

static void start_guest(void) {
  threads_started = true;
  uint64_t want = (uint64_t)(opt.touch_fraction * (double)total_pages + 0.5);
  uint64_t *perm = NULL;
  if (opt.vcpus > 0 && want > 0) {
    perm = malloc(total_pages * sizeof *perm);
    if (!perm) abort();
    for (uint64_t i = 0; i < total_pages; i++) perm[i] = i;
    uint64_t rng = opt.seed ^ 0x70c4ULL;
    for (uint64_t i = 0; i < want; i++) {
      uint64_t j = i + rng_below(&rng, total_pages - i);
      uint64_t t = perm[i];
      perm[i] = perm[j];
      perm[j] = t;
    }
  }
  uint64_t max_page = max_page_bytes();
  vcpus = calloc((size_t)(opt.vcpus ? opt.vcpus : 1), sizeof *vcpus);
  if (!vcpus) abort();
  for (int i = 0; i < opt.vcpus; i++) {
    struct vcpu *v = &vcpus[i];
    v->rng = opt.seed * 1000003ULL + (uint64_t)i;
    v->buf = malloc(max_page);
    v->touches = malloc((want / (uint64_t)opt.vcpus + 1) * sizeof *v->touches);
    if (!v->buf || !v->touches) abort();
    for (uint64_t k = (uint64_t)i; k < want; k += (uint64_t)opt.vcpus)
      v->touches[v->ntouches++] = perm[k];
  }
  free(perm);
  for (int i = 0; i < opt.vcpus; i++) {
    atomic_fetch_add(&running_threads, 1);
    if (pthread_create(&vcpus[i].thread, NULL, vcpu_main, &vcpus[i]) != 0) abort();
  }
  if (opt.balloon_runs > 0) {
    atomic_fetch_add(&running_threads, 1);
    balloon_started = true;
    void *seed = (void *)(uintptr_t)(opt.seed ^ 0xba11);
    if (pthread_create(&balloon_thread, NULL, balloon_main, seed) != 0) abort();
  }
  if (opt.wp == WP_AFTER) {
    atomic_fetch_add(&running_threads, 1);
    wp_started = true;
    if (pthread_create(&wp_thread, NULL, wp_main, NULL) != 0) abort();
  }
}

/*
 * Ends the guest's activity without hanging on anything: the wp experiment finishes its own
 * window first (so that "the write completed" is never an effect of our unregistering), then
 * every range is unregistered, which releases every thread blocked in a fault. A balloon thread
 * blocked in madvise waits for its UFFD_EVENT_REMOVE to be read; once the session is over that
 * reader is us.
 */
static void stop_guest(void) {
  atomic_store(&done, true);
  pthread_mutex_lock(&touched_lock);
  pthread_cond_broadcast(&touched_cond);
  pthread_mutex_unlock(&touched_lock);
  if (wp_started) pthread_join(wp_thread, NULL);
  atomic_store(&unregistered, true);
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    int err = uffd_unregister((uintptr_t)r->base, r->mapped_bytes);
    if (err) logmsg("unregister %s: %s", r->name, strerror(-err));
    uffd_wake((uintptr_t)r->base, r->mapped_bytes);
  }
  while (atomic_load(&running_threads) > 0) {
    struct pollfd p = {.fd = uffd, .events = POLLIN};
    if (poll(&p, 1, 20) > 0) {
      struct uffd_msg msgs[16];
      (void)!read(uffd, msgs, sizeof msgs);
    }
  }
  if (!threads_started) return;
  for (int i = 0; i < opt.vcpus; i++) {
    pthread_join(vcpus[i].thread, NULL);
    struct vcpu *v = &vcpus[i];
    size_t n = result.nlatencies + v->nlat + 1;
    result.latencies_us = realloc(result.latencies_us, n * sizeof *result.latencies_us);
    if (!result.latencies_us) abort();
    memcpy(result.latencies_us + result.nlatencies, v->lat_us, v->nlat * sizeof(uint32_t));
    result.nlatencies += v->nlat;
  }
  if (balloon_started) pthread_join(balloon_thread, NULL);
}

/* ---------------------------------------------------------------- final verification */

static unsigned char **snapshot_residency(void) {
  unsigned char **vecs = calloc((size_t)nregions, sizeof *vecs);
  if (!vecs) abort();
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    uint64_t small_pages = r->mapped_bytes / 4096;
    unsigned char *vec = calloc(small_pages + 1, 1);
    if (!vec) abort();
    if (mincore(r->base, r->mapped_bytes, vec) != 0)
      logmsg("mincore %s: %s", r->name, strerror(errno));
    vecs[i] = vec;
  }
  return vecs;
}

static bool page_resident(unsigned char *const *vecs, const struct region *r, uint64_t page) {
  /* mincore reports per base page; a huge page is resident as a whole. */
  return vecs[r->index][page * (r->page_bytes / 4096)] & 1;
}

/*
 * Every page of every region: present when complete arrived (unless the guest discarded it),
 * then equal to what its state says. A page that is not present now is never read: reading it
 * would make the kernel fill it and prove nothing.
 */
static void verify_all(unsigned char *const *at_complete) {
  unsigned char **now = snapshot_residency();
  uint64_t max_page = max_page_bytes();
  uint8_t *buf = malloc(max_page);
  if (!buf) abort();
  for (int i = 0; i < nregions; i++) {
    struct region *r = &regions[i];
    for (uint64_t p = 0; p < r->pages; p++) {
      if (p >= r->mapped_pages) {
        record_mismatch(r, p, true, "missing: not mapped (--unmap-tail)");
        continue;
      }
      uint32_t st = atomic_load(&r->state[p]);
      bool then = page_resident(at_complete, r, p);
      if (!then || !page_resident(now, r, p)) {
        /*
         * Absent at complete (or still): right only for a page that was zero before the guest
         * touched it, which the daemon may leave unplaced; the guest's first touch after
         * complete reads zeros (every range is unregistered by then). Any other is missing.
         */
        if (!zero_before_touch(r, p, st, buf)) {
          record_mismatch(r, p, true, then ? "missing: not present after complete"
                                           : "missing: not present when complete arrived");
          continue;
        }
        /* Still absent: a 4 KiB page is read to prove it reads as zeros; a huge one is not (its
         * first touch would take a page from the pool). */
        if (!page_resident(now, r, p) && r->page_bytes != 4096) {
          if (st & ST_VERSION) record_mismatch(r, p, true, "missing: stamped but absent");
          else atomic_fetch_add(&verified_count, 1);
          continue;
        }
      }
      if (verify_page(r, p, st, buf)) atomic_fetch_add(&verified_count, 1);
    }
    free(now[i]);
  }
  free(now);
  free(buf);
}

/* ---------------------------------------------------------------- the session */

static int remaining_ms(uint64_t deadline_ns) {
  uint64_t t = now_ns();
  if (t >= deadline_ns) return 0;
  uint64_t ms = (deadline_ns - t + 999999) / 1000000;
  return ms > INT32_MAX ? INT32_MAX : (int)ms;
}

/* Reconnects with backoff and hands the same uffd over again; -1 when the deadline passes. */
static int resume_handoff(uint64_t deadline_ns) {
  size_t len;
  char *line = build_handoff(true, &len);
  int s = -1;
  for (long delay_ms = 10;; delay_ms = delay_ms * 2 > 500 ? 500 : delay_ms * 2) {
    s = connect_socket();
    if (s >= 0 && send_handoff(s, line, len) == 0) {
      result.resumes++;
      logmsg("resumed: handed the uffd over again (resume %d)", result.resumes);
      break;
    }
    if (s >= 0) close(s);
    s = -1;
    if (remaining_ms(deadline_ns) <= delay_ms) break;
    pause_us(delay_ms * 1000);
  }
  free(line);
  return s;
}

static void run_session(void) {
  static char rx[2 * MAX_LINE_BYTES];
  size_t rxlen = 0;
  size_t len;
  char *line = build_handoff(false, &len);
  result.started_ns = now_ns();
  uint64_t deadline = result.started_ns + (uint64_t)opt.timeout_ms * 1000000ULL;
  int s = connect_socket();
  if (s < 0) setup_error("CVMM_CONNECT", "connect %s: %s", opt.socket_path, strerror(errno));
  if (send_handoff(s, line, len) != 0)
    setup_error("CVMM_CONNECT", "send the handoff to %s: %s", opt.socket_path, strerror(errno));
  free(line);
  for (;;) {
    char *nl;
    while ((nl = memchr(rx, '\n', rxlen)) != NULL) {
      *nl = 0;
      char type[32] = "";
      json_get_string(rx, "type", type, sizeof type);
      if (!strcmp(type, "ack")) {
        json_get_u64(rx, "totalPages", &result.ack_total_pages);
        if (!result.acked) {
          result.acked = true;
          logmsg("ack: %" PRIu64 " pages; the guest runs", result.ack_total_pages);
          start_guest();
        }
      } else if (!strcmp(type, "complete")) {
        result.completed = true;
        json_get_u64(rx, "totalPages", &result.c_total);
        json_get_u64(rx, "demandPages", &result.c_demand);
        json_get_u64(rx, "backgroundPages", &result.c_background);
        json_get_u64(rx, "zeroPages", &result.c_zero);
        json_get_u64(rx, "existedPages", &result.c_existed);
        json_get_u64(rx, "discardedPages", &result.c_discarded);
        result.outcome = OUTCOME_COMPLETE;
      } else if (!strcmp(type, "error")) {
        char code[80] = "", message[1100] = "";
        json_get_string(rx, "code", code, sizeof code);
        json_get_string(rx, "message", message, sizeof message);
        set_failure(result.acked ? OUTCOME_FAILED : OUTCOME_REFUSED, code[0] ? code : "UNKNOWN",
                    "%s", message);
        logmsg("error %s: %s", result.code, result.message);
      } else if (strcmp(type, "progress") != 0) {
        logmsg("ignoring an unexpected reply line: %.200s", rx);
      }
      size_t used = (size_t)(nl - rx) + 1;
      memmove(rx, rx + used, rxlen - used);
      rxlen -= used;
      if (result.outcome != OUTCOME_NONE) break;
    }
    if (result.outcome != OUTCOME_NONE) break;
    if (rxlen >= MAX_LINE_BYTES) {
      set_failure(result.acked ? OUTCOME_FAILED : OUTCOME_REFUSED, "CVMM_BAD_REPLY",
                  "a reply line exceeds %d bytes", MAX_LINE_BYTES);
      break;
    }
    int wait = remaining_ms(deadline);
    struct pollfd p = {.fd = s, .events = POLLIN};
    int pr = wait > 0 ? poll(&p, 1, wait) : 0;
    if (pr < 0 && errno == EINTR) continue;
    if (pr == 0) {
      set_failure(OUTCOME_TIMEOUT, "CVMM_TIMEOUT", "no complete within %d ms", opt.timeout_ms);
      logmsg("%s", result.message);
      break;
    }
    ssize_t n = read(s, rx + rxlen, sizeof rx - rxlen);
    if (n < 0 && errno == EINTR) continue;
    if (n > 0) {
      rxlen += (size_t)n;
      continue;
    }
    /* The daemon closed the connection without an error line: it died or is restarting. */
    close(s);
    s = -1;
    if (result.acked && opt.resume_timeout_ms) {
      uint64_t resume_deadline = now_ns() + (uint64_t)opt.resume_timeout_ms * 1000000ULL;
      if (resume_deadline > deadline) resume_deadline = deadline;
      logmsg("the daemon closed the connection before complete; resuming");
      s = resume_handoff(resume_deadline);
      rxlen = 0;
      if (s >= 0) continue;
      set_failure(OUTCOME_FAILED, "CVMM_RESUME_FAILED",
                  "no daemon took the resumed handoff within %d ms", opt.resume_timeout_ms);
    } else {
      set_failure(result.acked ? OUTCOME_FAILED : OUTCOME_REFUSED, "CVMM_CONNECTION_CLOSED",
                  "the daemon closed the handoff connection before %s",
                  result.acked ? "complete" : "ack");
    }
    logmsg("%s", result.message);
    break;
  }
  result.ended_ns = now_ns();
  unsigned char **at_complete = result.outcome == OUTCOME_COMPLETE ? snapshot_residency() : NULL;
  if (result.outcome == OUTCOME_COMPLETE) {
    /* A thread the daemon's unregister woke leaves the queue at once; allow a busy machine 2 s. */
    uint64_t deadline = now_ns() + 2000000000ULL;
    long left;
    while ((left = queued_faults()) > 0 && now_ns() < deadline) pause_us(1000);
    if (left > 0) {
      result.stranded_threads = left;
      logmsg("%ld guest thread(s) still blocked in a fault 2 s after complete: nothing wakes them",
             left);
    }
  }
  stop_guest();
  if (s >= 0) close(s);
  if (result.outcome != OUTCOME_COMPLETE) finish(EXIT_SESSION);
  /* A page absent now reads as zeros, never blocks (the daemon did this too, before complete). */
  for (int i = 0; i < nregions; i++)
    uffd_unregister((uint64_t)(uintptr_t)regions[i].base, regions[i].mapped_bytes);
  verify_all(at_complete);
  for (int i = 0; i < nregions; i++) free(at_complete[i]);
  free(at_complete);
  logmsg("complete: %llu of %" PRIu64 " pages verified, %llu missing, %llu mismatched",
         (unsigned long long)verified_count, total_pages, (unsigned long long)missing_count,
         (unsigned long long)mismatch_count);
  bool bad = missing_count || mismatch_count || verified_count != total_pages ||
             result.stranded_threads > 0;
  finish(bad ? EXIT_MISMATCH : EXIT_VERIFIED);
}

int main(int argc, char **argv) {
  parse_args(argc, argv);
  setup_regions();
  choose_order();
  setup_uffd();
  run_session();
}
