/*
 * uffd-race: threads fault on a registered range while another process unregisters it.
 *
 * The kernel wakes a range's waiters when it unregisters it, but a fault taken under the per-VMA
 * lock can queue after that wake and before the range loses its registration. Such a thread then
 * sleeps until someone wakes the range again. This program gives its userfaultfd to the process
 * under test (SCM_RIGHTS, fd 3) and, each iteration:
 *   - maps and registers a fresh anonymous range (MISSING) and starts --threads threads that read
 *     random pages of it, one after another, and a server thread that answers each fault with
 *     UFFDIO_ZEROPAGE, which wakes only the thread that waits on that page: the threads keep
 *     entering new faults;
 *   - asks the process under test to unregister the range (a line "unregister BASE LEN" on
 *     stdout) and waits for its "done" line on stdin, while the faults go on;
 *   - counts the threads still queued on the userfaultfd (the "total" line of its fdinfo). Once
 *     the unregister has returned no new fault can queue and the server's UFFDIO_ZEROPAGE fails
 *     (ENOENT) without waking anyone, so a thread that still waits is one that nothing will wake.
 *     A woken thread leaves the queue at once; one still there after --grace-ms is stranded, and is
 *     then woken with UFFDIO_WAKE so that every iteration ends.
 * The last stdout line is a JSON report.
 *
 * Usage: uffd-race [--iterations N] [--threads N] [--grace-ms MS]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define PAGES 4096UL
#define MAX_THREADS 64
#define HANDOFF_FD 3

static uint8_t *base;
static atomic_bool go, stop;
static int uffd;
static atomic_long faults_served;

static void die(const char *what) {
  fprintf(stderr, "uffd-race: %s: %s\n", what, strerror(errno));
  exit(2);
}

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static void *reader(void *arg) {
  uint64_t x = (uint64_t)(uintptr_t)arg * 0x9e3779b97f4a7c15ULL | 1;
  while (!atomic_load(&go)) {
  }
  while (!atomic_load(&stop)) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    (void)*(volatile uint8_t *)(base + (x % PAGES) * PAGE);
  }
  return NULL;
}

/* Answers every fault with a zero page; ENOENT once the range is unregistered (no wake then). */
static void *server(void *arg) {
  (void)arg;
  struct uffd_msg msgs[16];
  while (!atomic_load(&stop)) {
    ssize_t n = read(uffd, msgs, sizeof msgs);
    if (n < 0) {
      if (errno != EAGAIN) die("read the userfaultfd");
      sched_yield();
      continue;
    }
    for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
      struct uffdio_zeropage z = {
          .range = {.start = msgs[i].arg.pagefault.address & ~(PAGE - 1), .len = PAGE}};
      if (ioctl(uffd, UFFDIO_ZEROPAGE, &z) == 0) atomic_fetch_add(&faults_served, 1);
    }
  }
  return NULL;
}

/* Threads queued on the userfaultfd: "total" in /proc/self/fdinfo/FD (pending + read ones). */
static long queued(int uffd) {
  char path[64], buf[512];
  snprintf(path, sizeof path, "/proc/self/fdinfo/%d", uffd);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("open fdinfo");
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) die("read fdinfo");
  buf[n] = 0;
  const char *t = strstr(buf, "total:");
  if (!t) {
    fprintf(stderr, "uffd-race: no total in %s\n", path);
    exit(2);
  }
  return strtol(t + 6, NULL, 10);
}

static void send_uffd(int uffd) {
  char byte = 'u';
  struct iovec iov = {.iov_base = &byte, .iov_len = 1};
  union {
    struct cmsghdr h;
    char buf[CMSG_SPACE(sizeof(int))];
  } control;
  memset(&control, 0, sizeof control);
  struct msghdr msg = {
      .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
  struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(c), &uffd, sizeof uffd);
  if (sendmsg(HANDOFF_FD, &msg, MSG_NOSIGNAL) != 1) die("send the userfaultfd on fd 3");
  close(HANDOFF_FD);
}

int main(int argc, char **argv) {
  long iterations = 1000, threads = 4, grace_ms = 2000;
  static const struct option opts[] = {{"iterations", required_argument, 0, 'i'},
                                        {"threads", required_argument, 0, 't'},
                                        {"grace-ms", required_argument, 0, 'g'},
                                        {0, 0, 0, 0}};
  for (int o; (o = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
    long v = o == '?' ? -1 : strtol(optarg, NULL, 10);
    if (o == 'i' && v > 0) iterations = v;
    else if (o == 't' && v > 0 && v <= MAX_THREADS) threads = v;
    else if (o == 'g' && v > 0) grace_ms = v;
    else {
      fprintf(stderr, "usage: uffd-race [--iterations N] [--threads 1..64] [--grace-ms MS]\n");
      return 2;
    }
  }
  uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (uffd < 0) die("userfaultfd");
  struct uffdio_api api = {.api = UFFD_API};
  if (ioctl(uffd, UFFDIO_API, &api) != 0) die("UFFDIO_API");
  send_uffd(uffd);
  setvbuf(stdout, NULL, _IOLBF, 0);

  long stranded_iterations = 0, stranded_threads = 0;
  char line[64];
  for (long it = 0; it < iterations; it++) {
    size_t len = PAGES * PAGE;
    base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) die("mmap");
    struct uffdio_register reg = {.range = {.start = (uintptr_t)base, .len = len},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) die("UFFDIO_REGISTER");
    pthread_t th[MAX_THREADS], srv;
    atomic_store(&go, false);
    atomic_store(&stop, false);
    for (long i = 0; i < threads; i++)
      if (pthread_create(&th[i], NULL, reader, (void *)(uintptr_t)(it * MAX_THREADS + i + 1)))
        die("pthread_create");
    if (pthread_create(&srv, NULL, server, NULL)) die("pthread_create");
    atomic_store(&go, true);
    printf("unregister %" PRIuPTR " %zu\n", (uintptr_t)base, len);
    if (!fgets(line, sizeof line, stdin) || strcmp(line, "done\n") != 0) {
      fprintf(stderr, "uffd-race: expected \"done\" on stdin, got %s\n", feof(stdin) ? "EOF" : line);
      return 2;
    }
    uint64_t deadline = now_ns() + (uint64_t)grace_ms * 1000000ULL;
    long left;
    while ((left = queued(uffd)) > 0 && now_ns() < deadline) usleep(200);
    atomic_store(&stop, true);
    if (left > 0) {
      stranded_iterations++;
      stranded_threads += left;
      struct uffdio_range r = {.start = (uintptr_t)base, .len = len};
      if (ioctl(uffd, UFFDIO_WAKE, &r) != 0) die("UFFDIO_WAKE");
    }
    for (long i = 0; i < threads; i++) pthread_join(th[i], NULL);
    pthread_join(srv, NULL);
    munmap(base, len);
  }
  printf("{\"iterations\":%ld,\"threads\":%ld,\"faultsServed\":%ld,"
         "\"strandedIterations\":%ld,\"strandedThreads\":%ld}\n",
         iterations, threads, atomic_load(&faults_served), stranded_iterations, stranded_threads);
  return 0;
}
