/*
 * A TCP forwarding proxy that adds a fixed one-way delay in each direction, for the bench's
 * emulated link (this kernel has no netem: the bench limits the rate with tbf and adds the delay
 * here). Every chunk read from one side is written to the other side `delay` after it was read,
 * in order; nothing is reordered, dropped or merged across the delay.
 *
 *   delay-proxy --delay-us N --map LISTEN_HOST:PORT=TARGET_HOST:PORT [--map ...]
 *               [--max-queued-bytes B] [--fifo] [--spin-us N]
 *
 * Prints "listening PORT..." on stdout once every listener is bound (port 0 picks one). On
 * SIGTERM, SIGINT or EOF of stdin it prints its figures as one JSON line and exits: connections,
 * bytes each way, and how late chunks left against their due time (µs, p50/p99/max), which is
 * the proxy's own imprecision.
 *
 * One thread, epoll, non-blocking sockets, TCP_NODELAY on both sides. The due times of all
 * queued chunks are kept in arrival order per direction (a fixed delay keeps each queue sorted),
 * so the next wake-up is the earliest queue head over the connections; a timerfd armed at that
 * absolute CLOCK_MONOTONIC time, with a timer slack of 1 ns (PR_SET_TIMERSLACK; the default
 * 50 µs would be as large as the delay). A direction stops reading once `max-queued-bytes` wait
 * in it (default 4 MiB), so TCP flow control holds the sender back. --fifo asks for SCHED_FIFO
 * (root), which shortens wake-ups on a busy machine; --spin-us N arms the timer N µs early and
 * spins to the due time (each delayed chunk then costs up to N µs of CPU).
 *
 * Build: cc -O2 -Wall -Wextra -Werror -std=gnu11 -o delay-proxy delay-proxy.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_MAPS 8
#define READ_BYTES (64 * 1024)

static void die(const char *what) {
  fprintf(stderr, "delay-proxy: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void usage(const char *why) {
  fprintf(stderr, "delay-proxy: %s (see the comment at the top of delay-proxy.c)\n", why);
  exit(2);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* --- lateness samples (µs × 10, bounded histogram: 0..100 ms) --- */

#define HIST_BUCKETS 1000001
static uint32_t *hist; /* index: lateness in 0.1 µs, the last bucket holds everything beyond */
static uint64_t hist_n, late_max_ns;

static void record_lateness(uint64_t ns) {
  uint64_t i = ns / 100;
  if (i >= HIST_BUCKETS) i = HIST_BUCKETS - 1;
  hist[i]++;
  hist_n++;
  if (ns > late_max_ns) late_max_ns = ns;
}

static double hist_quantile_us(double p) {
  if (!hist_n) return 0;
  uint64_t want = (uint64_t)(p * (double)hist_n), seen = 0;
  for (uint64_t i = 0; i < HIST_BUCKETS; i++) {
    seen += hist[i];
    if (seen > want) return (double)i / 10.0;
  }
  return (double)(HIST_BUCKETS - 1) / 10.0;
}

/* --- connections --- */

struct chunk {
  struct chunk *next;
  uint64_t due;
  uint32_t len, off;
  bool started;
  char data[];
};

struct dir {
  struct chunk *head, *tail;
  size_t queued;
  bool eof;      /* the reading side sent FIN */
  bool shut;     /* we passed the FIN on */
  bool paused;   /* not reading: too much queued */
  bool blocked;  /* the writing side's buffer is full: wait for EPOLLOUT */
  uint64_t bytes;
};

struct conn;
struct end {
  struct conn *conn;
  int fd;
  int side;   /* 0: the client, 1: the target */
  bool gone;  /* out of the epoll set: it hung up */
};

struct conn {
  struct conn *prev, *next;
  struct end ends[2];
  struct dir dirs[2]; /* dirs[i]: from ends[i] to ends[1 - i] */
  bool connected;     /* the target's connect completed */
  bool dead;
};

struct map {
  int lfd;
  struct addrinfo *target;
};

static int ep, tfd;
static uint64_t delay_ns, spin_ns, max_queued = 4u << 20;
static struct conn *conns;
static uint64_t accepted, refused, bytes_up, bytes_down;
static char readbuf[READ_BYTES];

static void resolve(const char *spec, int flags, struct addrinfo **out) {
  char host[256];
  const char *colon = strrchr(spec, ':');
  if (!colon || (size_t)(colon - spec) >= sizeof host) usage("HOST:PORT expected");
  memcpy(host, spec, (size_t)(colon - spec));
  host[colon - spec] = 0;
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = flags};
  int rc = getaddrinfo(host, colon + 1, &hints, out);
  if (rc) {
    fprintf(stderr, "delay-proxy: %s: %s\n", spec, gai_strerror(rc));
    exit(1);
  }
}

static void nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void watch(struct end *e) {
  struct conn *c = e->conn;
  struct dir *in = &c->dirs[e->side], *out = &c->dirs[1 - e->side];
  uint32_t ev = 0;
  if (e->gone) return;
  if (!in->eof && !in->paused && (e->side == 0 || c->connected)) ev |= EPOLLIN | EPOLLRDHUP;
  if (out->blocked || (e->side == 1 && !c->connected)) ev |= EPOLLOUT;
  struct epoll_event x = {.events = ev, .data.ptr = e};
  if (epoll_ctl(ep, EPOLL_CTL_MOD, e->fd, &x)) die("epoll_ctl");
}

static void kill_conn(struct conn *c) {
  if (c->dead) return;
  c->dead = true;
  for (int i = 0; i < 2; i++) {
    close(c->ends[i].fd);
    for (struct chunk *k = c->dirs[i].head, *n; k; k = n) {
      n = k->next;
      free(k);
    }
    c->dirs[i].head = c->dirs[i].tail = NULL;
  }
}

static void reap(void) {
  for (struct conn *c = conns, *n; c; c = n) {
    n = c->next;
    if (!c->dead) continue;
    if (c->prev) c->prev->next = c->next;
    else conns = c->next;
    if (c->next) c->next->prev = c->prev;
    free(c);
  }
}

/* Writes the due chunks of direction `i`; returns false if the connection died. */
static bool flush_dir(struct conn *c, int i, uint64_t now) {
  struct dir *d = &c->dirs[i];
  struct end *to = &c->ends[1 - i];
  if (!c->connected || d->blocked) return true;
  while (d->head && d->head->due <= now) {
    struct chunk *k = d->head;
    if (!k->started) {
      record_lateness(now - k->due);
      k->started = true;
    }
    ssize_t n = send(to->fd, k->data + k->off, k->len - k->off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        d->blocked = true;
        watch(to);
        return true;
      }
      kill_conn(c);
      return false;
    }
    k->off += (uint32_t)n;
    if (k->off < k->len) continue;
    d->head = k->next;
    if (!d->head) d->tail = NULL;
    d->queued -= k->len;
    free(k);
    if (d->paused && d->queued < max_queued / 2) {
      d->paused = false;
      watch(&c->ends[i]);
    }
  }
  if (!d->head && d->eof && !d->shut) {
    d->shut = true;
    shutdown(to->fd, SHUT_WR);
    if (c->dirs[1 - i].shut) kill_conn(c);
  }
  return !c->dead;
}

static void read_end(struct end *e) {
  struct conn *c = e->conn;
  struct dir *d = &c->dirs[e->side];
  for (int rounds = 0; rounds < 16 && !d->paused && !d->eof; rounds++) {
    ssize_t n = recv(e->fd, readbuf, sizeof readbuf, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      kill_conn(c);
      return;
    }
    uint64_t now = now_ns();
    if (n == 0) {
      d->eof = true;
      break;
    }
    struct chunk *k = malloc(sizeof *k + (size_t)n);
    if (!k) die("malloc");
    memcpy(k->data, readbuf, (size_t)n);
    k->next = NULL;
    k->due = now + delay_ns;
    k->len = (uint32_t)n;
    k->off = 0;
    k->started = false;
    if (d->tail) d->tail->next = k;
    else d->head = k;
    d->tail = k;
    d->queued += (size_t)n;
    d->bytes += (uint64_t)n;
    if (e->side == 0) bytes_up += (uint64_t)n;
    else bytes_down += (uint64_t)n;
    if (d->queued >= max_queued) d->paused = true;
    if (delay_ns == 0 && !flush_dir(c, e->side, now)) return;
  }
  watch(e);
  if (d->eof) flush_dir(c, e->side, now_ns());
}

static void accept_on(struct map *m) {
  for (;;) {
    int fd = accept4(m->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    int up = socket(m->target->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (up < 0) die("socket");
    nodelay(fd);
    nodelay(up);
    if (connect(up, m->target->ai_addr, m->target->ai_addrlen) && errno != EINPROGRESS) {
      refused++;
      close(fd);
      close(up);
      continue;
    }
    struct conn *c = calloc(1, sizeof *c);
    if (!c) die("calloc");
    c->ends[0] = (struct end){.conn = c, .fd = fd, .side = 0};
    c->ends[1] = (struct end){.conn = c, .fd = up, .side = 1};
    c->next = conns;
    if (conns) conns->prev = c;
    conns = c;
    for (int i = 0; i < 2; i++) {
      struct epoll_event x = {.events = 0, .data.ptr = &c->ends[i]};
      if (epoll_ctl(ep, EPOLL_CTL_ADD, c->ends[i].fd, &x)) die("epoll_ctl");
      watch(&c->ends[i]);
    }
    accepted++;
  }
}

static void on_end(struct end *e, uint32_t ev) {
  struct conn *c = e->conn;
  if (c->dead) return;
  if (e->side == 1 && !c->connected && (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(e->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
      refused++;
      kill_conn(c);
      return;
    }
    c->connected = true;
    watch(&c->ends[0]);
    watch(e);
  }
  if (ev & EPOLLOUT) {
    struct dir *towards = &c->dirs[1 - e->side];
    if (towards->blocked) {
      towards->blocked = false;
      watch(e);
      if (!flush_dir(c, 1 - e->side, now_ns())) return;
    }
  }
  if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) read_end(e);
  if (c->dead) return;
  if (ev & EPOLLERR) {
    kill_conn(c);
  } else if ((ev & EPOLLHUP) && c->dirs[e->side].eof) {
    /* Both ways shut on this socket: epoll would report it forever. What it sent is queued
     * for the other side (still delayed), so the connection lives on until that is out. */
    e->gone = true;
    epoll_ctl(ep, EPOLL_CTL_DEL, e->fd, NULL);
  }
}

/* Arms the timer at the earliest due head that can be written (none: disarmed). */
static void arm(void) {
  uint64_t next = 0;
  for (struct conn *c = conns; c; c = c->next) {
    if (c->dead || !c->connected) continue;
    for (int i = 0; i < 2; i++) {
      struct dir *d = &c->dirs[i];
      if (d->head && !d->blocked && (!next || d->head->due < next)) next = d->head->due;
    }
  }
  struct itimerspec its = {0};
  if (next && spin_ns) next = next > spin_ns ? next - spin_ns : 1;
  if (next) {
    its.it_value.tv_sec = (time_t)(next / 1000000000u);
    its.it_value.tv_nsec = (long)(next % 1000000000u);
  }
  if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL)) die("timerfd_settime");
}

int main(int argc, char **argv) {
  struct map maps[MAX_MAPS];
  int nmaps = 0;
  bool fifo = false;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--fifo")) {
      fifo = true;
      continue;
    }
    if (i + 1 >= argc) usage("an option without a value");
    const char *k = argv[i], *v = argv[++i];
    if (!strcmp(k, "--delay-us")) delay_ns = (uint64_t)(strtod(v, NULL) * 1000.0);
    else if (!strcmp(k, "--spin-us")) spin_ns = (uint64_t)(strtod(v, NULL) * 1000.0);
    else if (!strcmp(k, "--max-queued-bytes")) max_queued = strtoull(v, NULL, 0);
    else if (!strcmp(k, "--map")) {
      if (nmaps == MAX_MAPS) usage("too many --map");
      char *spec = strdup(v), *eq = strchr(spec, '=');
      if (!eq) usage("--map LISTEN=TARGET");
      *eq = 0;
      struct addrinfo *l;
      resolve(spec, AI_PASSIVE, &l);
      resolve(eq + 1, 0, &maps[nmaps].target);
      int fd = socket(l->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) die("socket");
      int one = 1;
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      if (bind(fd, l->ai_addr, l->ai_addrlen)) die(spec);
      if (listen(fd, 64)) die("listen");
      freeaddrinfo(l);
      maps[nmaps++].lfd = fd;
    } else usage("unknown option");
  }
  if (!nmaps) usage("at least one --map is required");
  if (prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0)) die("PR_SET_TIMERSLACK");
  if (fifo) {
    struct sched_param sp = {.sched_priority = 10};
    if (sched_setscheduler(0, SCHED_FIFO, &sp)) die("SCHED_FIFO");
  }
  hist = calloc(HIST_BUCKETS, sizeof *hist);
  if (!hist) die("calloc");

  ep = epoll_create1(EPOLL_CLOEXEC);
  tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigprocmask(SIG_BLOCK, &sigs, NULL);
  int sfd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);
  if (ep < 0 || tfd < 0 || sfd < 0) die("epoll/timerfd/signalfd");
  /* Tags for the fds that are not connection ends: their addresses mark them. */
  static char tag_timer, tag_signal, tag_stdin;
  struct epoll_event x = {.events = EPOLLIN, .data.ptr = &tag_timer};
  epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &x);
  x.data.ptr = &tag_signal;
  epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &x);
  x.data.ptr = &tag_stdin;
  epoll_ctl(ep, EPOLL_CTL_ADD, 0, &x); /* fails harmlessly when stdin is /dev/null */
  printf("listening");
  for (int i = 0; i < nmaps; i++) {
    x.data.ptr = &maps[i];
    if (epoll_ctl(ep, EPOLL_CTL_ADD, maps[i].lfd, &x)) die("epoll_ctl");
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    getsockname(maps[i].lfd, (struct sockaddr *)&ss, &len);
    printf(" %d", ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                  : ((struct sockaddr_in *)&ss)->sin_port));
  }
  printf("\n");
  fflush(stdout);

  struct epoll_event evs[64];
  for (bool running = true; running;) {
    int n = epoll_wait(ep, evs, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      die("epoll_wait");
    }
    for (int i = 0; i < n; i++) {
      void *p = evs[i].data.ptr;
      if (p == &tag_timer) {
        uint64_t ticks;
        if (read(tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN) die("read timerfd");
      } else if (p == &tag_signal || p == &tag_stdin) {
        char buf[128];
        if (p == &tag_signal || read(0, buf, sizeof buf) <= 0) running = false;
      } else if (p >= (void *)maps && p < (void *)(maps + nmaps)) {
        accept_on(p);
      } else {
        on_end(p, evs[i].events);
      }
    }
    /* Everything due now goes out, then the timer waits for the next head. With --spin-us the
     * timer fires that much early and we spin to the due time: wake-up latency traded for CPU. */
    uint64_t now = now_ns();
    if (spin_ns) {
      uint64_t next = 0;
      for (struct conn *c = conns; c; c = c->next)
        for (int d = 0; d < 2 && !c->dead; d++)
          if (c->connected && c->dirs[d].head && !c->dirs[d].blocked &&
              (!next || c->dirs[d].head->due < next))
            next = c->dirs[d].head->due;
      while (next > now && next - now <= spin_ns) now = now_ns();
    }
    for (struct conn *c = conns; c; c = c->next)
      for (int d = 0; d < 2 && !c->dead; d++) flush_dir(c, d, now);
    reap();
    arm();
  }
  printf("{\"delayUs\":%.1f,\"connections\":%lu,\"refused\":%lu,\"bytesUp\":%lu,"
         "\"bytesDown\":%lu,\"chunks\":%lu,\"lateP50Us\":%.1f,\"lateP99Us\":%.1f,"
         "\"lateMaxUs\":%.1f}\n",
         (double)delay_ns / 1000.0, (unsigned long)accepted, (unsigned long)refused,
         (unsigned long)bytes_up, (unsigned long)bytes_down, (unsigned long)hist_n,
         hist_quantile_us(0.5), hist_quantile_us(0.99), (double)late_max_ns / 1000.0);
  return 0;
}
