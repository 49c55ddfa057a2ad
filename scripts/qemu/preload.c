/*
 * yabusame-preload: lets a stock QEMU destination hand its guest RAM to `yabusame dest`.
 *
 * Loaded with LD_PRELOAD into the destination QEMU, whose guest RAM is a memory-backend-file
 * with share=on. When QEMU maps that file (MAP_SHARED), this library, after the real mmap:
 * creates a userfaultfd, does the UFFDIO_API handshake (MISSING_SHMEM, THREAD_ID), registers the
 * mapping in MISSING mode, connects to the dest's handoff socket, sends the handoff line with the
 * uffd attached (SCM_RIGHTS, protocol/README.md "Handoff protocol"), and returns to QEMU only
 * after the daemon's `ack`. The guest therefore never runs without a page handler.
 *
 * Fail closed: every failure before `ack` prints `yabusame-preload: ...` on stderr and ends QEMU.
 * After `ack` a thread reads the daemon's reply lines; if the connection closes before
 * `complete`, it reconnects with backoff and hands the same uffd over again with "resume":true.
 * That includes a session the daemon ended with an `error` (it closes after one): the guest has
 * no other page handler, and a new session takes over the pages already present.
 * The library keeps its own copy of the uffd for the life of the process, so a dead daemon only
 * pauses the guest's faulting threads.
 *
 * Environment:
 *   YABUSAME_RAM_PATH      the RAM file to match (QEMU's mem-path), required
 *   YABUSAME_SOCKET        the dest's handoff socket, required
 *   YABUSAME_MIGRATION_ID  the migration id at the source, required
 *   YABUSAME_SOURCE        ws:// URL of `yabusame source`, required
 *   YABUSAME_SECRET        optional hex; sent as "secret" in the handoff line
 *   YABUSAME_ACK_TIMEOUT_MS  how long to wait for `ack`, default 30000; until then a handoff the
 *                          daemon refuses as "not yet" (UNKNOWN_MIGRATION: the migration is
 *                          registered with the source after this QEMU started; SOURCE_UNREACHABLE,
 *                          HANDOFF_BUSY) or a daemon not listening yet is retried
 *   YABUSAME_EVENT_REMOVE  "1": also ask for UFFD_FEATURE_EVENT_REMOVE (the guest's discards
 *                          then reach the daemon; the madvising thread waits for it to read them)
 *
 * Build: cc -shared -fPIC -O2 -Wall -Wextra -Werror -o yabusame-preload.so preload.c -ldl -pthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/magic.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

/* The handoff protocol's limit for one line, newline included. */
#define MAX_LINE 65536

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);

static struct {
  char ram_path[PATH_MAX];
  const char *socket_path;
  const char *migration_id;
  const char *source;
  const char *secret;
  int ack_timeout_ms;
  int event_remove;
} cfg;

/* The one handed-over mapping. */
static struct {
  int uffd;
  uintptr_t base;
  size_t size_bytes;
  uint64_t offset;
  uint64_t page_size_bytes;
} region = {.uffd = -1};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned matching_mmaps;
static __thread int in_resolve;

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  fprintf(stderr, "yabusame-preload: %s; stopping QEMU (the guest must not run without a page "
                  "handler)\n", msg);
  fflush(stderr);
  _exit(1);
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  fprintf(stderr, "yabusame-preload: %s\n", msg);
}

static const char *required_env(const char *name) {
  const char *v = getenv(name);
  if (v == NULL || *v == '\0') die("%s is not set", name);
  return v;
}

/* The RAM file may not exist yet (QEMU creates it): canonicalise its folder only. */
static void canonical_ram_path(const char *path) {
  char dir[PATH_MAX], real[PATH_MAX];
  const char *slash = strrchr(path, '/');
  if (slash == NULL) {
    if (getcwd(dir, sizeof dir) == NULL) die("getcwd: %s", strerror(errno));
    slash = path - 1;
  } else {
    size_t n = (size_t)(slash - path);
    if (n >= sizeof dir) die("YABUSAME_RAM_PATH is too long");
    memcpy(dir, path, n);
    dir[n] = '\0';
    if (n == 0) strcpy(dir, "/");
  }
  if (realpath(dir, real) == NULL) die("YABUSAME_RAM_PATH: folder %s: %s", dir, strerror(errno));
  int n = snprintf(cfg.ram_path, sizeof cfg.ram_path, "%s/%s", strcmp(real, "/") ? real : "",
                   slash + 1);
  if (n < 0 || (size_t)n >= sizeof cfg.ram_path) die("YABUSAME_RAM_PATH is too long");
}

__attribute__((constructor)) static void preload_init(void) {
  canonical_ram_path(required_env("YABUSAME_RAM_PATH"));
  cfg.socket_path = required_env("YABUSAME_SOCKET");
  cfg.migration_id = required_env("YABUSAME_MIGRATION_ID");
  cfg.source = required_env("YABUSAME_SOURCE");
  cfg.secret = getenv("YABUSAME_SECRET");
  if (cfg.secret != NULL && *cfg.secret == '\0') cfg.secret = NULL;
  if (cfg.secret != NULL) {
    for (const char *c = cfg.secret; *c; c++) {
      if (!strchr("0123456789abcdefABCDEF", *c)) die("YABUSAME_SECRET is not hex");
    }
  }
  const char *t = getenv("YABUSAME_ACK_TIMEOUT_MS");
  cfg.ack_timeout_ms = t != NULL && *t ? atoi(t) : 30000;
  if (cfg.ack_timeout_ms <= 0) die("YABUSAME_ACK_TIMEOUT_MS must be a positive number");
  const char *r = getenv("YABUSAME_EVENT_REMOVE");
  cfg.event_remove = r != NULL && strcmp(r, "1") == 0;
  struct sockaddr_un sa;
  if (strlen(cfg.socket_path) >= sizeof sa.sun_path) die("YABUSAME_SOCKET is too long");
}

static mmap_fn real_mmap(void) {
  static mmap_fn fn;
  if (fn == NULL) {
    /* dlsym may allocate, and an allocator may mmap: that inner call goes to the kernel. */
    in_resolve = 1;
    fn = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
    in_resolve = 0;
    if (fn == NULL) die("dlsym(mmap): %s", dlerror());
  }
  return fn;
}

static void *raw_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
  return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

static int fd_is_ram_file(int fd) {
  char link[64], target[PATH_MAX];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, target, sizeof target - 1);
  if (n < 0) return 0;
  target[n] = '\0';
  return strcmp(target, cfg.ram_path) == 0;
}

/* JSON string body: the ids and URLs here are plain ASCII; escape what JSON requires. */
static size_t json_escape(char *out, size_t cap, const char *s) {
  size_t n = 0;
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    char tmp[8];
    const char *piece = tmp;
    if (c == '"' || c == '\\') {
      tmp[0] = '\\', tmp[1] = (char)c, tmp[2] = '\0';
    } else if (c < 0x20) {
      snprintf(tmp, sizeof tmp, "\\u%04x", c);
    } else {
      tmp[0] = (char)c, tmp[1] = '\0';
    }
    size_t len = strlen(piece);
    if (n + len >= cap) return cap;
    memcpy(out + n, piece, len);
    n += len;
  }
  out[n] = '\0';
  return n;
}

static int handoff_line(char *buf, size_t cap, int resume) {
  char id[512], source[2048], secret[600];
  if (json_escape(id, sizeof id, cfg.migration_id) >= sizeof id) return -1;
  if (json_escape(source, sizeof source, cfg.source) >= sizeof source) return -1;
  secret[0] = '\0';
  if (cfg.secret != NULL) {
    if (strlen(cfg.secret) > 512) return -1;
    snprintf(secret, sizeof secret, ",\"secret\":\"%s\"", cfg.secret);
  }
  int n = snprintf(buf, cap,
                   "{\"type\":\"handoff\",\"version\":1,\"migrationId\":\"%s\",\"source\":\"%s\","
                   "\"regions\":[{\"name\":\"ram0\",\"base\":%llu,\"sizeBytes\":%llu,"
                   "\"offset\":%llu,\"pageSizeBytes\":%llu}]%s%s}\n",
                   id, source, (unsigned long long)region.base,
                   (unsigned long long)region.size_bytes, (unsigned long long)region.offset,
                   (unsigned long long)region.page_size_bytes, secret,
                   resume ? ",\"resume\":true" : "");
  return n > 0 && (size_t)n < cap ? n : -1;
}

/* Connects and sends the handoff line, the uffd on its first sendmsg. Returns the socket or -1
 * with `why` filled. */
static int send_handoff(int resume, char *why, size_t why_cap) {
  char line[MAX_LINE];
  int len = handoff_line(line, sizeof line, resume);
  if (len < 0) {
    snprintf(why, why_cap, "handoff line longer than %d bytes", MAX_LINE);
    return -1;
  }
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) {
    snprintf(why, why_cap, "socket: %s", strerror(errno));
    return -1;
  }
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  strcpy(sa.sun_path, cfg.socket_path);
  if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
    int e = errno;
    snprintf(why, why_cap, "connect %s: %s", cfg.socket_path, strerror(e));
    close(s);
    errno = e; /* the caller tells "no daemon yet" (ENOENT, ECONNREFUSED) from the rest */
    return -1;
  }
  union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
  } control;
  memset(&control, 0, sizeof control);
  struct iovec iov = {.iov_base = line, .iov_len = (size_t)len};
  struct msghdr msg = {.msg_iov = &iov,
                       .msg_iovlen = 1,
                       .msg_control = control.buf,
                       .msg_controllen = sizeof control.buf};
  struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &region.uffd, sizeof(int));
  ssize_t sent;
  do sent = sendmsg(s, &msg, MSG_NOSIGNAL);
  while (sent < 0 && errno == EINTR);
  if (sent < 0) {
    snprintf(why, why_cap, "sendmsg: %s", strerror(errno));
    close(s);
    return -1;
  }
  /* The rest of the line, if the first sendmsg took only part of it, carries no fd. */
  for (size_t off = (size_t)sent; off < (size_t)len;) {
    ssize_t n = send(s, line + off, (size_t)len - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      snprintf(why, why_cap, "send: %s", strerror(errno));
      close(s);
      return -1;
    }
    off += (size_t)n;
  }
  return s;
}

/* A line reader over the handoff connection. */
struct reader {
  int fd;
  char buf[MAX_LINE + 1];
  size_t len;
};

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Reads one line (without its newline) into `out`. Returns 1 for a line, 0 at EOF, -1 on an
 * error or when `timeout_ms` (if >= 0) ran out, with `why` filled. */
static int read_line(struct reader *r, char *out, size_t cap, int timeout_ms, char *why,
                     size_t why_cap) {
  int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : -1;
  for (;;) {
    char *nl = memchr(r->buf, '\n', r->len);
    if (nl != NULL) {
      size_t n = (size_t)(nl - r->buf);
      size_t copy = n < cap - 1 ? n : cap - 1;
      memcpy(out, r->buf, copy);
      out[copy] = '\0';
      memmove(r->buf, nl + 1, r->len - n - 1);
      r->len -= n + 1;
      return 1;
    }
    if (r->len >= MAX_LINE) {
      snprintf(why, why_cap, "the daemon sent a line longer than %d bytes", MAX_LINE);
      return -1;
    }
    int wait = -1;
    if (deadline >= 0) {
      int64_t left = deadline - now_ms();
      if (left <= 0) {
        snprintf(why, why_cap, "no reply within %d ms", timeout_ms);
        return -1;
      }
      wait = (int)left;
    }
    struct pollfd p = {.fd = r->fd, .events = POLLIN};
    int pr = poll(&p, 1, wait);
    if (pr < 0 && errno == EINTR) continue;
    if (pr < 0) {
      snprintf(why, why_cap, "poll: %s", strerror(errno));
      return -1;
    }
    if (pr == 0) continue;
    ssize_t n = read(r->fd, r->buf + r->len, MAX_LINE - r->len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      snprintf(why, why_cap, "read: %s", strerror(errno));
      return -1;
    }
    if (n == 0) return 0;
    r->len += (size_t)n;
  }
}

static int line_is(const char *line, const char *type) {
  char want[64];
  snprintf(want, sizeof want, "\"type\":\"%s\"", type);
  return strstr(line, want) != NULL;
}

/* The `code` of an error reply line, or "" (for retry decisions; the line is logged whole). */
static void reply_code(const char *line, char *code, size_t cap) {
  code[0] = '\0';
  const char *at = strstr(line, "\"code\":\"");
  if (at == NULL) return;
  at += strlen("\"code\":\"");
  size_t n = 0;
  while (at[n] != '\0' && at[n] != '"' && n + 1 < cap) n++;
  memcpy(code, at, n);
  code[n] = '\0';
}

/* Waits for the first reply line: 1 for `ack`, 0 otherwise with `why` filled (and `code` with
 * the refusal's code, if there was one). */
static int wait_ack(struct reader *r, int timeout_ms, char *why, size_t why_cap, char *code,
                    size_t code_cap) {
  char line[MAX_LINE];
  code[0] = '\0';
  int got = read_line(r, line, sizeof line, timeout_ms, why, why_cap);
  if (got == 0) snprintf(why, why_cap, "the daemon closed the connection before ack");
  if (got <= 0) return 0;
  if (line_is(line, "ack")) return 1;
  reply_code(line, code, code_cap);
  snprintf(why, why_cap, "the daemon refused the handoff: %.900s", line);
  return 0;
}

/* Refusals that say "not yet": the orchestrator registers the migration with the source (or
 * starts a daemon) after this QEMU started. Retried until YABUSAME_ACK_TIMEOUT_MS runs out;
 * any other refusal ends QEMU at once. */
static int retryable(const char *code) {
  return strcmp(code, "UNKNOWN_MIGRATION") == 0 || strcmp(code, "SOURCE_UNREACHABLE") == 0 ||
         strcmp(code, "HANDOFF_BUSY") == 0;
}

static struct reader conn = {.fd = -1};

/* After ack: log replies; on a lost connection hand the uffd over again with "resume":true. */
static void *reply_thread(void *arg) {
  (void)arg;
  char line[MAX_LINE], why[1024];
  int backoff_ms = 100;
  for (;;) {
    int got = read_line(&conn, line, sizeof line, -1, why, sizeof why);
    if (got == 1) {
      if (line_is(line, "complete")) {
        note("complete: %s", line);
        close(conn.fd);
        conn.fd = -1;
        return NULL;
      }
      if (line_is(line, "error")) note("the daemon ended the session: %s", line);
      continue;
    }
    note("handoff connection lost (%s); handing the uffd over again with resume",
         got == 0 ? "closed" : why);
    close(conn.fd);
    conn.fd = -1;
    for (;;) {
      struct timespec ts = {.tv_sec = backoff_ms / 1000, .tv_nsec = (backoff_ms % 1000) * 1000000L};
      nanosleep(&ts, NULL);
      if (backoff_ms < 5000) backoff_ms *= 2;
      int s = send_handoff(1, why, sizeof why);
      if (s < 0) {
        note("resume: %s; retrying", why);
        continue;
      }
      conn.fd = s;
      conn.len = 0;
      char code[80];
      if (wait_ack(&conn, cfg.ack_timeout_ms, why, sizeof why, code, sizeof code)) {
        note("resume: ack");
        backoff_ms = 100;
        break;
      }
      note("resume: %s; retrying", why);
      close(s);
      conn.fd = -1;
    }
  }
}

static uint64_t page_size_of(int fd) {
  struct statfs fs;
  if (fstatfs(fd, &fs) == 0 && (uint64_t)fs.f_type == (uint64_t)HUGETLBFS_MAGIC)
    return (uint64_t)fs.f_bsize;
  return (uint64_t)sysconf(_SC_PAGESIZE);
}

static void hand_over(void *addr, size_t len, int fd, off_t off) {
  region.base = (uintptr_t)addr;
  region.size_bytes = len;
  region.offset = (uint64_t)off;
  region.page_size_bytes = page_size_of(fd);

  int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (uffd < 0) die("userfaultfd: %s", strerror(errno));
  struct uffdio_api api = {.api = UFFD_API,
                           .features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_THREAD_ID};
  if (region.page_size_bytes != (uint64_t)sysconf(_SC_PAGESIZE))
    api.features |= UFFD_FEATURE_MISSING_HUGETLBFS;
  if (cfg.event_remove) api.features |= UFFD_FEATURE_EVENT_REMOVE;
  if (ioctl(uffd, UFFDIO_API, &api) < 0) {
    die("UFFDIO_API (features 0x%llx): %s", (unsigned long long)api.features, strerror(errno));
  }
  struct uffdio_register reg = {.range = {.start = region.base, .len = len},
                                .mode = UFFDIO_REGISTER_MODE_MISSING};
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) die("UFFDIO_REGISTER: %s", strerror(errno));
  if (!(reg.ioctls & (1ull << _UFFDIO_COPY))) die("UFFDIO_REGISTER: no UFFDIO_COPY on the range");
  region.uffd = uffd;

  char why[1024], code[80];
  int64_t t0 = now_ms(), deadline = t0 + cfg.ack_timeout_ms;
  int delay_ms = 50, tries = 0;
  for (;;) {
    tries++;
    int left = (int)(deadline - now_ms());
    int s = left > 0 ? send_handoff(0, why, sizeof why) : -1;
    /* A daemon not listening yet (ENOENT, ECONNREFUSED) is "not yet" too. */
    int not_yet = s < 0 && (errno == ENOENT || errno == ECONNREFUSED);
    if (s >= 0) {
      conn.fd = s;
      conn.len = 0;
      if (wait_ack(&conn, left, why, sizeof why, code, sizeof code)) break;
      close(s);
      conn.fd = -1;
      not_yet = retryable(code);
    }
    if (left <= 0 || !not_yet || now_ms() + delay_ms >= deadline) {
      die("handoff to %s: %s%s", cfg.socket_path, left > 0 ? why : "no ack",
          tries > 1 ? " (retried until YABUSAME_ACK_TIMEOUT_MS ran out)" : "");
    }
    if (tries == 1) note("handoff: %s; retrying until it is accepted", why);
    struct timespec ts = {.tv_sec = delay_ms / 1000, .tv_nsec = (delay_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    if (delay_ms < 1000) delay_ms *= 2;
  }
  note("ack after %lld ms (%d tries): uffd %d serves %zu bytes at %p (file offset %lld, "
       "%llu-byte pages)",
       (long long)(now_ms() - t0), tries, uffd, len, addr, (long long)off,
       (unsigned long long)region.page_size_bytes);
  pthread_t th;
  int err = pthread_create(&th, NULL, reply_thread, NULL);
  if (err != 0) die("pthread_create: %s", strerror(err));
  pthread_detach(th);
}

static void *intercept(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
  if (in_resolve) return raw_mmap(addr, len, prot, flags, fd, off);
  mmap_fn next = real_mmap();
  if (fd < 0 || !fd_is_ram_file(fd)) return next(addr, len, prot, flags, fd, off);

  pthread_mutex_lock(&lock);
  unsigned nth = ++matching_mmaps;
  int type = flags & MAP_TYPE;
  note("mmap #%u of %s: addr hint %p, %zu bytes, file offset %lld, prot 0x%x, flags 0x%x", nth,
       cfg.ram_path, addr, len, (long long)off, prot, flags);
  /* Any other mapping of the file would read its holes and fill them with zeros (a shmem read
   * fault allocates), and those pages would never fault in the registered mapping. */
  if (type != MAP_SHARED && type != MAP_SHARED_VALIDATE)
    die("%s is mapped privately (memory-backend-file share=off?): need share=on", cfg.ram_path);
  if (region.uffd >= 0) die("%s is mapped a second time; only one mapping is supported",
                            cfg.ram_path);
  void *p = next(addr, len, prot, flags, fd, off);
  if (p == MAP_FAILED) {
    int e = errno;
    pthread_mutex_unlock(&lock);
    errno = e;
    return p;
  }
  hand_over(p, len, fd, off);
  pthread_mutex_unlock(&lock);
  return p;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
  return intercept(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
  return intercept(addr, len, prot, flags, fd, off);
}
