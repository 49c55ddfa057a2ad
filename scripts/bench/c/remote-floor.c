/*
 * The remote floor for `npm run bench`: the smallest remote userfaultfd handler, a page server
 * and a fault handler that share nothing but one TCP connection, so the bench can measure what
 * our design (a dest that fetches each faulting page from a source over the network) costs at
 * the least on this machine, in the same run as the daemons.
 *
 *   remote-floor serve --listen HOST:PORT --image PATH
 *       Serves pages of PATH: one connection at a time, one request at a time, blocking. Prints
 *       "listening PORT" on stdout once bound; on EOF of stdin it prints its figures as one JSON
 *       line and exits.
 *   remote-floor handle --connect HOST:PORT --base ADDR --size BYTES [--uffd FD]
 *       Serves the page faults of the userfaultfd FD (default 3, inherited from the bench): for
 *       each fault, one request to the server, the answer placed with UFFDIO_COPY (or
 *       UFFDIO_ZEROPAGE when the server says the page is all zeros, as yabusame sends zero
 *       runs). Prints "ready" once connected; on EOF of stdin, its figures as one JSON line.
 *   remote-floor ping --connect HOST:PORT --pages N [--count N] [--length BYTES] [--depth N]
 *       The network and the server alone, no uffd: `count` requests for random pages (or
 *       ranges of `length` bytes) with `depth` of them in flight; one JSON line: round-trip
 *       percentiles (depth 1) and bytes per second.
 *
 * Wire format (native byte order, both ends on this machine): a request is {u64 offset,
 * u32 length, u32 0}; an answer is {u64 offset, u32 length, u32 flags} followed by `length`
 * bytes unless flags has bit 0 (all zeros). TCP_NODELAY on both ends: every request and answer
 * leaves at once, as yabusame's do.
 *
 * CPU per request is measured by each process with CLOCK_PROCESS_CPUTIME_ID from its first
 * request (or fault) to its last answer, so connection setup and idle time are not counted.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -std=gnu11 -o remote-floor remote-floor.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define MAX_LENGTH (1u << 20)
#define FLAG_ZERO 1u

struct request {
  uint64_t offset;
  uint32_t length;
  uint32_t reserved;
};
struct answer {
  uint64_t offset;
  uint32_t length;
  uint32_t flags;
};

static void die(const char *what) {
  fprintf(stderr, "remote-floor: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void usage(const char *why) {
  fprintf(stderr, "remote-floor: %s (see the comment at the top of remote-floor.c)\n", why);
  exit(2);
}

static uint64_t now_ns(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* --- samples: a growing array of durations (ns), percentiles by sorting --- */

struct samples {
  uint64_t *v;
  size_t n, cap;
};

static void sample(struct samples *s, uint64_t ns) {
  if (s->n == s->cap) {
    s->cap = s->cap ? s->cap * 2 : 4096;
    s->v = realloc(s->v, s->cap * sizeof *s->v);
    if (!s->v) die("realloc");
  }
  s->v[s->n++] = ns;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* The p-quantile in µs (nearest rank); sorts the samples. */
static double quantile_us(struct samples *s, double p) {
  if (!s->n) return 0;
  qsort(s->v, s->n, sizeof *s->v, cmp_u64);
  size_t i = (size_t)(p * (double)s->n);
  if (i >= s->n) i = s->n - 1;
  return (double)s->v[i] / 1000.0;
}

/* --- sockets --- */

static void split_host_port(const char *spec, char *host, size_t hostlen, char **port) {
  const char *colon = strrchr(spec, ':');
  if (!colon || (size_t)(colon - spec) >= hostlen) usage("HOST:PORT expected");
  memcpy(host, spec, (size_t)(colon - spec));
  host[colon - spec] = 0;
  *port = (char *)colon + 1;
}

static void nodelay(int fd) {
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one)) die("TCP_NODELAY");
}

static int tcp_connect(const char *spec) {
  char host[256], *port;
  split_host_port(spec, host, sizeof host, &port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
  int rc = getaddrinfo(host, port, &hints, &res);
  if (rc) {
    fprintf(stderr, "remote-floor: %s: %s\n", spec, gai_strerror(rc));
    exit(1);
  }
  int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  if (connect(fd, res->ai_addr, res->ai_addrlen)) die("connect");
  freeaddrinfo(res);
  nodelay(fd);
  return fd;
}

static int tcp_listen(const char *spec, int *port_out) {
  char host[256], *port;
  split_host_port(spec, host, sizeof host, &port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE},
                  *res;
  int rc = getaddrinfo(host, port, &hints, &res);
  if (rc) {
    fprintf(stderr, "remote-floor: %s: %s\n", spec, gai_strerror(rc));
    exit(1);
  }
  int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, res->ai_addr, res->ai_addrlen)) die("bind");
  if (listen(fd, 16)) die("listen");
  freeaddrinfo(res);
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  if (getsockname(fd, (struct sockaddr *)&ss, &len)) die("getsockname");
  *port_out = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                             : ((struct sockaddr_in *)&ss)->sin_port);
  return fd;
}

/* Reads exactly `len` bytes; false on EOF before any byte of them. */
static bool read_full(int fd, void *buf, size_t len) {
  size_t got = 0;
  while (got < len) {
    ssize_t n = recv(fd, (char *)buf + got, len - got, MSG_WAITALL);
    if (n == 0) {
      if (got == 0) return false;
      errno = EPIPE;
      die("short read");
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == ECONNRESET && got == 0) return false;
      die("recv");
    }
    got += (size_t)n;
  }
  return true;
}

static void write_full(int fd, struct iovec *iov, int iovcnt) {
  while (iovcnt > 0) {
    ssize_t n = writev(fd, iov, iovcnt);
    if (n < 0) {
      if (errno == EINTR) continue;
      die("writev");
    }
    while (iovcnt > 0 && (size_t)n >= iov->iov_len) {
      n -= (ssize_t)iov->iov_len;
      iov++, iovcnt--;
    }
    if (iovcnt > 0) {
      iov->iov_base = (char *)iov->iov_base + n;
      iov->iov_len -= (size_t)n;
    }
  }
}

static bool all_zero(const char *p, size_t len) {
  const uint64_t *w = (const uint64_t *)p;
  for (size_t i = 0; i < len / 8; i++)
    if (w[i]) return false;
  return true;
}

/* --- serve --- */

static int serve(const char *listen_spec, const char *image_path) {
  int image = open(image_path, O_RDONLY | O_CLOEXEC);
  if (image < 0) die(image_path);
  int port;
  int lfd = tcp_listen(listen_spec, &port);
  printf("listening %d\n", port);
  fflush(stdout);
  char *buf = aligned_alloc(PAGE, MAX_LENGTH);
  if (!buf) die("aligned_alloc");
  struct samples service = {0};
  uint64_t requests = 0, zero = 0, cpu_first = 0, cpu_last = 0;
  for (;;) {
    struct pollfd p[2] = {{.fd = lfd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (p[1].revents) break;
    if (!(p[0].revents & POLLIN)) continue;
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) continue;
    nodelay(fd);
    struct request rq;
    while (read_full(fd, &rq, sizeof rq)) {
      uint64_t t0 = now_ns(CLOCK_MONOTONIC);
      if (!cpu_first) cpu_first = now_ns(CLOCK_PROCESS_CPUTIME_ID);
      if (rq.length == 0 || rq.length > MAX_LENGTH || rq.length % PAGE) {
        fprintf(stderr, "remote-floor: bad request length %u\n", rq.length);
        break;
      }
      size_t got = 0;
      while (got < rq.length) {
        ssize_t n = pread(image, buf + got, rq.length - got, (off_t)(rq.offset + got));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("pread");
        if (n == 0) { /* past the end of the file: zeros */
          memset(buf + got, 0, rq.length - got);
          break;
        }
        got += (size_t)n;
      }
      struct answer a = {.offset = rq.offset, .length = rq.length, .flags = 0};
      struct iovec iov[2] = {{&a, sizeof a}, {buf, rq.length}};
      if (all_zero(buf, rq.length)) {
        a.flags = FLAG_ZERO;
        zero++;
        write_full(fd, iov, 1);
      } else {
        write_full(fd, iov, 2);
      }
      requests++;
      cpu_last = now_ns(CLOCK_PROCESS_CPUTIME_ID);
      sample(&service, now_ns(CLOCK_MONOTONIC) - t0);
    }
    close(fd);
  }
  double cpu_ns = (double)(cpu_last - cpu_first);
  printf("{\"requests\":%lu,\"zeroAnswers\":%lu,\"cpuNsPerRequest\":%.0f,"
         "\"serviceP50Us\":%.2f,\"serviceP99Us\":%.2f}\n",
         (unsigned long)requests, (unsigned long)zero, requests ? cpu_ns / (double)requests : 0,
         quantile_us(&service, 0.5), quantile_us(&service, 0.99));
  return 0;
}

/* --- handle --- */

static int handle(const char *connect_spec, int uffd, uint64_t base, uint64_t size) {
  int fd = tcp_connect(connect_spec);
  printf("ready\n");
  fflush(stdout);
  char *page = aligned_alloc(PAGE, PAGE);
  if (!page) die("aligned_alloc");
  struct samples service = {0};
  uint64_t faults = 0, zero = 0, cpu_first = 0, cpu_last = 0;
  struct uffd_msg msgs[16];
  for (;;) {
    struct pollfd p[2] = {{.fd = uffd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (p[1].revents) break;
    if (!(p[0].revents & POLLIN)) {
      if (p[0].revents & (POLLERR | POLLHUP)) break; /* the VMM is gone */
      continue;
    }
    ssize_t n = read(uffd, msgs, sizeof msgs); /* the fd is O_NONBLOCK (the VMM's choice) */
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      die("read uffd");
    }
    for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
      uint64_t t0 = now_ns(CLOCK_MONOTONIC);
      if (!cpu_first) cpu_first = now_ns(CLOCK_PROCESS_CPUTIME_ID);
      uint64_t addr = msgs[i].arg.pagefault.address & ~(uint64_t)(PAGE - 1);
      if (addr < base || addr >= base + size) {
        fprintf(stderr, "remote-floor: fault at 0x%lx outside the region\n", (unsigned long)addr);
        return 1;
      }
      struct request rq = {.offset = addr - base, .length = PAGE};
      struct iovec iov = {&rq, sizeof rq};
      write_full(fd, &iov, 1);
      struct answer a;
      if (!read_full(fd, &a, sizeof a)) die("the server closed the connection");
      if (a.offset != rq.offset || a.length != PAGE) {
        fprintf(stderr, "remote-floor: answer for %lu, asked %lu\n", (unsigned long)a.offset,
                (unsigned long)rq.offset);
        return 1;
      }
      if (!(a.flags & FLAG_ZERO) && !read_full(fd, page, PAGE))
        die("the server closed the connection");
      /* EEXIST: already placed (nothing else places pages here, but it is not an error);
       * EAGAIN: the mm is changing under us, try again. */
      for (;;) {
        int rc;
        if (a.flags & FLAG_ZERO) {
          struct uffdio_zeropage z = {.range = {addr, PAGE}};
          rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
        } else {
          struct uffdio_copy c = {.dst = addr, .src = (uintptr_t)page, .len = PAGE};
          rc = ioctl(uffd, UFFDIO_COPY, &c);
        }
        if (rc == 0 || errno == EEXIST) break;
        if (errno != EAGAIN) die("UFFDIO_COPY");
      }
      if (a.flags & FLAG_ZERO) zero++;
      faults++;
      cpu_last = now_ns(CLOCK_PROCESS_CPUTIME_ID);
      sample(&service, now_ns(CLOCK_MONOTONIC) - t0);
    }
  }
  double cpu_ns = (double)(cpu_last - cpu_first);
  printf("{\"faults\":%lu,\"zeroPages\":%lu,\"cpuNsPerFault\":%.0f,"
         "\"serviceP50Us\":%.2f,\"serviceP99Us\":%.2f}\n",
         (unsigned long)faults, (unsigned long)zero, faults ? cpu_ns / (double)faults : 0,
         quantile_us(&service, 0.5), quantile_us(&service, 0.99));
  return 0;
}

/* --- ping --- */

static uint64_t xorshift(uint64_t *s) {
  *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
  return *s;
}

static int ping(const char *connect_spec, uint64_t pages, uint64_t count, uint32_t length,
                unsigned depth, uint64_t seed) {
  if (!pages || !count || !length || length % PAGE || length > MAX_LENGTH || !depth)
    usage("ping needs --pages, --count, --length (a multiple of 4096, at most 1 MiB), --depth");
  uint64_t span = length / PAGE;
  if (span > pages) usage("--length exceeds the image");
  int fd = tcp_connect(connect_spec);
  char *buf = aligned_alloc(PAGE, MAX_LENGTH);
  uint64_t *sent_at = calloc(depth, sizeof *sent_at);
  if (!buf || !sent_at) die("alloc");
  struct samples rtt = {0};
  uint64_t s = seed | 1, sent = 0, received = 0, bytes = 0;
  uint64_t cpu0 = now_ns(CLOCK_PROCESS_CPUTIME_ID), t_start = now_ns(CLOCK_MONOTONIC);
  while (received < count) {
    while (sent < count && sent - received < depth) {
      struct request rq = {.offset = (xorshift(&s) % (pages - span + 1)) * PAGE, .length = length};
      struct iovec iov = {&rq, sizeof rq};
      sent_at[sent % depth] = now_ns(CLOCK_MONOTONIC);
      write_full(fd, &iov, 1);
      sent++;
    }
    struct answer a;
    if (!read_full(fd, &a, sizeof a)) die("the server closed the connection");
    if (!(a.flags & FLAG_ZERO) && !read_full(fd, buf, a.length)) die("short answer");
    sample(&rtt, now_ns(CLOCK_MONOTONIC) - sent_at[received % depth]);
    bytes += a.length;
    received++;
  }
  double seconds = (double)(now_ns(CLOCK_MONOTONIC) - t_start) / 1e9;
  double cpu_ns = (double)(now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu0);
  close(fd);
  double p50 = quantile_us(&rtt, 0.5), p99 = quantile_us(&rtt, 0.99);
  printf("{\"count\":%lu,\"length\":%u,\"depth\":%u,\"p50Us\":%.2f,\"p99Us\":%.2f,"
         "\"minUs\":%.2f,\"maxUs\":%.2f,\"bytesPerSec\":%.0f,\"cpuNsPerRequest\":%.0f}\n",
         (unsigned long)count, length, depth, p50, p99, (double)rtt.v[0] / 1000.0,
         (double)rtt.v[rtt.n - 1] / 1000.0, (double)bytes / seconds, cpu_ns / (double)count);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) usage("a mode is required: serve, handle or ping");
  const char *mode = argv[1];
  const char *listen_spec = NULL, *connect_spec = NULL, *image = NULL;
  uint64_t base = 0, size = 0, pages = 0, count = 1000, seed = 1;
  uint32_t length = PAGE;
  unsigned depth = 1;
  int uffd = 3;
  for (int i = 2; i < argc; i++) {
    const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!v) usage("an option without a value");
    i++;
    if (!strcmp(k, "--listen")) listen_spec = v;
    else if (!strcmp(k, "--connect")) connect_spec = v;
    else if (!strcmp(k, "--image")) image = v;
    else if (!strcmp(k, "--uffd")) uffd = atoi(v);
    else if (!strcmp(k, "--base")) base = strtoull(v, NULL, 0);
    else if (!strcmp(k, "--size")) size = strtoull(v, NULL, 0);
    else if (!strcmp(k, "--pages")) pages = strtoull(v, NULL, 0);
    else if (!strcmp(k, "--count")) count = strtoull(v, NULL, 0);
    else if (!strcmp(k, "--length")) length = (uint32_t)strtoul(v, NULL, 0);
    else if (!strcmp(k, "--depth")) depth = (unsigned)strtoul(v, NULL, 0);
    else if (!strcmp(k, "--seed")) seed = strtoull(v, NULL, 0);
    else usage("unknown option");
  }
  if (!strcmp(mode, "serve")) {
    if (!listen_spec || !image) usage("serve needs --listen and --image");
    return serve(listen_spec, image);
  }
  if (!strcmp(mode, "handle")) {
    if (!connect_spec || !size || base % PAGE || size % PAGE)
      usage("handle needs --connect, --base and --size (page-aligned)");
    return handle(connect_spec, uffd, base, size);
  }
  if (!strcmp(mode, "ping")) {
    if (!connect_spec) usage("ping needs --connect");
    return ping(connect_spec, pages, count, length, depth, seed);
  }
  usage("unknown mode");
  return 2;
}
