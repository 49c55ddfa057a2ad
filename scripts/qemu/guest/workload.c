/*
 * yb-workload: the guest's init workload for yabusame's QEMU runs.
 *
 * Allocates N MiB (argv[1], default 512), fills every page with a pattern derived from its page
 * index and a per-page generation counter, then loops forever: rewrite one batch of pages (next
 * generation), reread and check every page, print one line per batch on stdout (the serial
 * console). After a post-copy migration the first batch touches every page, so the slowest batch
 * is the stall the guest felt.
 *
 * The check reads CHECK_WORDS words spread over each page rather than all 512: it still touches
 * every page (what post-copy cares about), and a whole-page reread of 512 MiB would make a batch
 * take seconds under TCG. Rewrites always write the whole page.
 *
 * Built static (-static): the initramfs holds busybox and this program, no libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

enum {
  PAGE_BYTES = 4096,
  WORDS_PER_PAGE = PAGE_BYTES / 8,
  CHECK_WORDS = 32,
  /* Mismatch lines printed per batch at most; the count stays exact. */
  MAX_REPORTS_PER_BATCH = 8,
};

static uint64_t pattern(uint64_t page, uint32_t gen, uint64_t word) {
  uint64_t x = (page << 24) ^ ((uint64_t)gen << 52) ^ (word * 0x9e3779b97f4a7c15ull);
  /* splitmix64's finaliser: neighbouring pages and words differ in every bit. */
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void write_page(uint64_t *mem, uint64_t page, uint32_t gen) {
  uint64_t *w = mem + page * WORDS_PER_PAGE;
  for (uint64_t i = 0; i < WORDS_PER_PAGE; i++) w[i] = pattern(page, gen, i);
}

int main(int argc, char **argv) {
  unsigned long mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 512;
  /* Pages rewritten per batch: a few percent of the set, so every batch also verifies. */
  unsigned long batch_pages = argc > 2 ? strtoul(argv[2], NULL, 10) : 0;
  if (mib == 0) {
    fprintf(stderr, "yb-workload: usage: workload [MiB] [pages per batch]\n");
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  uint64_t pages = (uint64_t)mib * 1024 * 1024 / PAGE_BYTES;
  if (batch_pages == 0 || batch_pages > pages) batch_pages = pages / 16 ? pages / 16 : 1;

  uint64_t *mem = mmap(NULL, pages * PAGE_BYTES, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  uint32_t *gen = calloc(pages, sizeof *gen);
  if (mem == MAP_FAILED || gen == NULL) {
    fprintf(stderr, "yb-workload: cannot allocate %lu MiB: %s\n", mib, strerror(errno));
    return 1;
  }

  uint64_t t0 = now_ms();
  for (uint64_t p = 0; p < pages; p++) write_page(mem, p, 0);
  printf("yb-workload start mib=%lu pages=%llu batch_pages=%lu fill_ms=%llu\n", mib,
         (unsigned long long)pages, batch_pages, (unsigned long long)(now_ms() - t0));

  uint64_t errors = 0, max_batch_ms = 0, cursor = 0;
  for (uint64_t batch = 1;; batch++) {
    uint64_t start = now_ms();
    for (unsigned long k = 0; k < batch_pages; k++) {
      uint64_t p = cursor;
      cursor = cursor + 1 == pages ? 0 : cursor + 1;
      gen[p]++;
      write_page(mem, p, gen[p]);
    }
    unsigned reports = 0;
    for (uint64_t p = 0; p < pages; p++) {
      const uint64_t *w = mem + p * WORDS_PER_PAGE;
      for (uint64_t c = 0; c < CHECK_WORDS; c++) {
        /* Spread the checked words over the page; the last one is the page's last word. */
        uint64_t i = (c + 1) * (WORDS_PER_PAGE / CHECK_WORDS) - 1;
        uint64_t want = pattern(p, gen[p], i);
        if (w[i] != want) {
          errors++;
          if (reports++ < MAX_REPORTS_PER_BATCH)
            printf("yb-workload MISMATCH batch=%llu page=%llu word=%llu gen=%u got=%016llx "
                   "want=%016llx\n",
                   (unsigned long long)batch, (unsigned long long)p, (unsigned long long)i,
                   gen[p], (unsigned long long)w[i], (unsigned long long)want);
          break;
        }
      }
    }
    uint64_t batch_ms = now_ms() - start;
    if (batch_ms > max_batch_ms) max_batch_ms = batch_ms;
    printf("yb-workload batch=%llu pages=%llu errors=%llu batch_ms=%llu max_batch_ms=%llu\n",
           (unsigned long long)batch, (unsigned long long)pages, (unsigned long long)errors,
           (unsigned long long)batch_ms, (unsigned long long)max_batch_ms);
  }
}
