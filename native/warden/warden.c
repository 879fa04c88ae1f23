// phantoma-warden: the only privileged process of a Phantoma node.
//
// It owns a cgroup subtree `<NAME>/workers/` and does exactly three things for exactly one client uid
// (the gateway's): spawn an isolated one-shot worker, end one (cgroup.kill, reap, verify, rmdir), and
// answer a status ping. Everything the client sends is validated against the command line: the exec
// path, the script, the uid range and the worker id (which names its cgroup) are not the client's choice.
//
// Transport (see README.md): a unix stream socket, ONE request per connection. A request is a list of
// non-empty NUL-terminated fields ending with an empty field ("F1\0F2\0...\0\0"), at most 64 KiB. The
// reply is one line, "OK ...\n" or "ERR <code> <text>\n". For SPAWN the connection itself then becomes
// the worker's stdin and stdout (the warden dup2()s it onto fds 0 and 1 and closes its own copy), and a
// connection announced before with "STDERR <id>" becomes its stderr. So the worker's stdio reaches the
// gateway as file descriptors without SCM_RIGHTS, which Node cannot receive on a plain unix socket.
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/mount.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include "egress.h" /* issue 9: the egress BPF programs (egress.c) */
#include "download.h" /* issue 10: DOWNLOAD, the model-pull helper in download/ */

#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442 /* x86_64; glibc 2.36 has the number but no wrapper */
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

#define MAX_MSG (64 * 1024)    /* a request never needs more; bigger is refused */
#define MAX_FIELDS 24          /* SPAWN id uid gid nice exec script + up to 17 more args */
#define MAX_ARG 16384          /* per passed-through argument */
#define MAX_WORKERS 256        /* live workers at once */
#define MAX_PENDING 32         /* STDERR connections waiting for their SPAWN */
#define PENDING_TTL_MS 10000   /* ...for at most this long */
#define IO_TIMEOUT_MS 2000     /* a client that stalls mid-request is dropped */
#define END_TIMEOUT_MS 2000    /* bound on kill + verify */
#define CHILD_SETUP_MS 5000    /* bound on a child's isolation set-up */

static const char *WORKER_ENV[] = {"PATH=/usr/bin:/bin", "HOME=/tmp", "TMPDIR=/tmp", "LANG=C.UTF-8",
                                   "NODE_LLAMA_CPP_SKIP_DOWNLOAD=true", NULL /* LD_PRELOAD= when configured */, NULL};
#define MAX_PRE_ARGS 8
#define MAX_EXPOSE 8

/* ---------- configuration ---------- */
static struct {
  const char *socket_path;
  uid_t client_uid;
  const char *cg_name;
  const char *worker_exec;
  const char *worker_script;
  unsigned long uid_lo, uid_hi;
  unsigned long long memory_max, tmpfs_size;
  unsigned long pids_max;
  char socket_dir[PATH_MAX];
  /* Fixed by the warden's own command line, never by a request: interpreter flags placed between the
   * executable and the script (e.g. V8 heap sizes), and one library to preload (the threadpool shim). */
  const char *pre_args[MAX_PRE_ARGS];
  int n_pre_args;
  char preload_env[PATH_MAX + 16];
  /* Directories the worker must see (read-only) even when they lie under a path its view masks, e.g. a
   * project checked out under /tmp or /root: the runtime, the compiled worker, the models. */
  const char *expose[MAX_EXPOSE];
  int n_expose;
  /* keyd's socket, bind-mounted into every worker's view at KEYD_SOCKET_IN_WORKER (issue 7). */
  const char *keyd_socket;
} cfg = {.memory_max = 2ULL << 30, .tmpfs_size = 64ULL << 20, .pids_max = 256};

/* One entry per cgroup hierarchy the warden uses: v2 always; v1 memory/pids only where v2 lacks them. */
enum { H_V2, H_MEM, H_PIDS, H_COUNT };
static struct {
  bool used;
  char base[PATH_MAX];    /* <mount><own cgroup>, where <NAME> is created */
  char workers[PATH_MAX]; /* <base>/<NAME>/workers */
} hier[H_COUNT];
static bool v2_memory, v2_pids, have_noswap;
static int cap_last = 40;

struct worker {
  bool used, reaped;
  char id[17];
  pid_t pid;
  int status;
};
static struct worker workers[MAX_WORKERS];

struct pending {
  bool used;
  char id[17];
  int fd;
  struct timespec expires;
};
static struct pending pendings[MAX_PENDING];

/* ---------- small helpers ---------- */
static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "phantoma-warden: %s\n", buf);
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void sleep_us(long us) {
  struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
  while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
  }
}

static int write_file(const char *path, const char *s) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  size_t len = strlen(s);
  ssize_t n = write(fd, s, len);
  int err = n < 0 ? errno : (size_t)n != len ? EIO : 0;
  close(fd);
  return -err;
}

/* Reads a small file into buf (NUL-terminated); returns bytes read or -errno. */
static ssize_t read_file(const char *path, char *buf, size_t size) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  size_t len = 0;
  while (len + 1 < size) {
    ssize_t n = read(fd, buf + len, size - 1 - len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      close(fd);
      return -err;
    }
    if (n == 0) break;
    len += (size_t)n;
  }
  buf[len] = 0;
  close(fd);
  return (ssize_t)len;
}

static bool has_token(const char *list, const char *tok, char sep) {
  size_t tl = strlen(tok);
  for (const char *p = list; p && *p;) {
    const char *e = strchr(p, sep);
    size_t l = e ? (size_t)(e - p) : strlen(p);
    if (l == tl && !strncmp(p, tok, tl)) return true;
    p = e ? e + 1 : NULL;
  }
  return false;
}

static bool valid_id(const char *s) {
  if (strlen(s) != 16) return false;
  for (int i = 0; i < 16; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
  return true;
}

/* Strict unsigned decimal: digits only, no sign, no leading zeros, bounded. */
static bool parse_ulong(const char *s, unsigned long max, unsigned long *out) {
  size_t l = strlen(s);
  if (l == 0 || l > 20 || (l > 1 && s[0] == '0')) return false;
  for (size_t i = 0; i < l; i++)
    if (!isdigit((unsigned char)s[i])) return false;
  errno = 0;
  unsigned long long v = strtoull(s, NULL, 10);
  if (errno || v > max) return false;
  *out = (unsigned long)v;
  return true;
}

static bool send_all(int fd, const char *buf, size_t len) {
  while (len) {
    ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    buf += n;
    len -= (size_t)n;
  }
  return true;
}

static void reply(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void reply(int fd, const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n > sizeof buf - 2) n = sizeof buf - 2;
  buf[n++] = '\n';
  (void)send_all(fd, buf, (size_t)n);
}

static void refuse(int fd, uid_t peer, const char *code, const char *msg) {
  logf_("refused code=%s peer_uid=%u: %s", code, (unsigned)peer, msg);
  reply(fd, "ERR %s %s", code, msg);
}

/* sd_notify(3) READY=1 when systemd runs us as a Type=notify unit ($NOTIFY_SOCKET set; issue 13): the
   gateway's unit is ordered after ours, so it never races the socket. No libsystemd: one datagram. */
static void sd_notify_ready(void) {
  const char *path = getenv("NOTIFY_SOCKET");
  if (!path || (path[0] != '/' && path[0] != '@') || strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) return;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  size_t n = strlen(path);
  memcpy(sa.sun_path, path, n);
  if (sa.sun_path[0] == '@') sa.sun_path[0] = '\0';
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  static const char msg[] = "READY=1\nSTATUS=serving";
  if (fd < 0 || sendto(fd, msg, sizeof msg - 1, MSG_NOSIGNAL, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (path[0] == '@' ? 0 : 1))) < 0)
    logf_("sd_notify READY=1 failed: %s", strerror(errno));
  if (fd >= 0) close(fd);
  unsetenv("NOTIFY_SOCKET");
}

/* ---------- cgroups ---------- */
static int cg_file(char *out, int h, const char *id, const char *file) {
  int n = snprintf(out, PATH_MAX, "%s/%s%s%s", hier[h].workers, id, file ? "/" : "", file ? file : "");
  return n > 0 && n < PATH_MAX ? 0 : -ENAMETOOLONG;
}

/* SIGKILLs every pid listed in a cgroup.procs file (v1 has no cgroup.kill). */
static void kill_listed(const char *procs) {
  char buf[8192];
  if (read_file(procs, buf, sizeof buf) <= 0) return;
  for (char *p = buf, *e; *p; p = e) {
    long pid = strtol(p, &e, 10);
    if (e == p) break;
    if (pid > 1 && pid != getpid()) kill((pid_t)pid, SIGKILL);
    while (*e == '\n') e++;
  }
}

/* Kills all processes of workers/<id> in every hierarchy (no waiting). */
static void kill_cgroup(const char *id) {
  char p[PATH_MAX];
  for (int h = 0; h < H_COUNT; h++) {
    if (!hier[h].used) continue;
    if (h == H_V2 && cg_file(p, h, id, "cgroup.kill") == 0) (void)write_file(p, "1");
    if (cg_file(p, h, id, "cgroup.procs") == 0) kill_listed(p);
  }
}

static struct worker *find_worker(const char *id) {
  for (int i = 0; i < MAX_WORKERS; i++)
    if (workers[i].used && !strcmp(workers[i].id, id)) return &workers[i];
  return NULL;
}

/* Reaps every exited child (workers, and orphans reparented to us as subreaper). When a worker's main
 * process exits, the rest of its cgroup is killed at once: a worker lives exactly as long as its main
 * process, so a daemon it forked cannot keep its stdio connection (or anything else) alive. */
static void reap_children(void) {
  int st;
  pid_t pid;
  while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
    for (int i = 0; i < MAX_WORKERS; i++) {
      if (workers[i].used && !workers[i].reaped && workers[i].pid == pid) {
        workers[i].reaped = true;
        workers[i].status = st;
        kill_cgroup(workers[i].id);
      }
    }
    download_reaped(pid);
  }
}

/* Ends workers/<id>: kill, reap, rmdir in every hierarchy, until nothing is left or the bound passes.
 * rmdir succeeding is the proof: the kernel refuses to remove a populated cgroup. */
static bool end_cgroups(const char *id, struct worker *w) {
  double deadline = now_ms() + END_TIMEOUT_MS;
  long pause = 50;
  for (;;) {
    int left = 0;
    if (w && !w->reaped) kill(w->pid, SIGKILL); /* safe: an unreaped child's pid cannot be reused */
    for (int h = 0; h < H_COUNT; h++) {
      char dir[PATH_MAX];
      if (!hier[h].used || cg_file(dir, h, id, NULL)) continue;
      if (rmdir(dir) == 0 || errno == ENOENT) continue;
      left++;
    }
    if (left) kill_cgroup(id);
    reap_children();
    if (!left && (!w || w->reaped)) return true;
    if (now_ms() > deadline) return false;
    sleep_us(pause);
    if (pause < 1000) pause *= 2;
  }
}

/* mkdir -p of <base>/<rel>, where rel was validated as safe segments. */
static int mkdirs(const char *base, const char *rel) {
  char p[PATH_MAX];
  int n = snprintf(p, sizeof p, "%s/%s", base, rel);
  if (n < 0 || n >= (int)sizeof p) return -ENAMETOOLONG;
  for (char *s = p + strlen(base) + 1;; s++) {
    if (*s == '/' || *s == 0) {
      char c = *s;
      *s = 0;
      if (mkdir(p, 0755) < 0 && errno != EEXIST) return -errno;
      *s = c;
      if (!c) break;
    }
  }
  return 0;
}

/* Enables a v2 controller for workers/<id>: every level from our own cgroup down to workers/ must
 * delegate it. Fails (and we fall back to v1) when the host does not offer it, as on this hybrid host. */
static bool v2_enable(const char *ctrl) {
  char p[PATH_MAX], f[PATH_MAX + 32], buf[512], tok[32];
  snprintf(p, sizeof p, "%s/cgroup.controllers", hier[H_V2].base);
  if (read_file(p, buf, sizeof buf) < 0) return false;
  buf[strcspn(buf, "\n")] = 0;
  if (!has_token(buf, ctrl, ' ')) return false;
  snprintf(tok, sizeof tok, "+%s", ctrl);
  snprintf(p, sizeof p, "%s/%s/workers", hier[H_V2].base, cfg.cg_name);
  /* top-down: <base>, each <NAME> prefix, workers/ */
  for (size_t i = strlen(hier[H_V2].base);; i++) {
    if (p[i] != '/' && p[i] != 0) continue;
    char c = p[i];
    p[i] = 0;
    snprintf(f, sizeof f, "%s/cgroup.subtree_control", p);
    if (write_file(f, tok) < 0) return false;
    p[i] = c;
    if (!c) return true;
  }
}

/* Finds the mounts in /proc/self/mountinfo and our own cgroup in each from /proc/self/cgroup. */
static int find_cgroups(void) {
  char mnt[H_COUNT][PATH_MAX] = {{0}}, own[H_COUNT][PATH_MAX] = {{0}};
  FILE *f = fopen("/proc/self/mountinfo", "re");
  if (!f) return -errno;
  char *line = NULL;
  size_t cap = 0;
  while (getline(&line, &cap, f) > 0) {
    char mp[PATH_MAX], fstype[64], super[1024];
    char *sep = strstr(line, " - ");
    if (!sep || sscanf(line, "%*s %*s %*s %*s %4095s", mp) != 1) continue;
    if (sscanf(sep + 3, "%63s %*s %1023s", fstype, super) != 2) continue;
    if (strchr(mp, '\\')) continue; /* escaped (unusual) mount points are not ours */
    if (!strcmp(fstype, "cgroup2") && !mnt[H_V2][0]) snprintf(mnt[H_V2], PATH_MAX, "%s", mp);
    if (!strcmp(fstype, "cgroup") && has_token(super, "memory", ',') && !mnt[H_MEM][0]) snprintf(mnt[H_MEM], PATH_MAX, "%s", mp);
    if (!strcmp(fstype, "cgroup") && has_token(super, "pids", ',') && !mnt[H_PIDS][0]) snprintf(mnt[H_PIDS], PATH_MAX, "%s", mp);
  }
  free(line);
  fclose(f);
  if (!mnt[H_V2][0]) return -ENOENT;
  f = fopen("/proc/self/cgroup", "re");
  if (!f) return -errno;
  line = NULL;
  while (getline(&line, &cap, f) > 0) {
    line[strcspn(line, "\n")] = 0;
    char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!c2) continue;
    *c1 = 0; /* "0::/path": the hierarchy id alone, so the v2 line is recognised (it was not before issue 13,
                which put the v2 subtree at the hierarchy's root instead of under a systemd unit's cgroup) */
    *c2 = 0;
    const char *ctrls = c1 + 1, *path = c2 + 1;
    int h = -1;
    if (!strcmp(line, "0") && !*ctrls) h = H_V2;
    else if (has_token(ctrls, "memory", ',')) h = H_MEM;
    else if (has_token(ctrls, "pids", ',')) h = H_PIDS;
    if (h >= 0) snprintf(own[h], PATH_MAX, "%s", strcmp(path, "/") ? path : "");
  }
  free(line);
  fclose(f);
  /* The subtree lives under the warden's own cgroup in each hierarchy: the delegated part under
   * systemd, and here it keeps the workers inside whatever accounting the warden itself is under. */
  for (int h = 0; h < H_COUNT; h++) {
    if (!mnt[h][0]) continue;
    int n = snprintf(hier[h].base, PATH_MAX, "%s%s", mnt[h], own[h]);
    int m = snprintf(hier[h].workers, PATH_MAX, "%s%s/%s/workers", mnt[h], own[h], cfg.cg_name);
    if (n < 0 || m < 0 || m >= PATH_MAX - 64) return -ENAMETOOLONG; /* room for /<id>/<file> */
  }
  hier[H_V2].used = true;
  if (mkdirs(hier[H_V2].base, cfg.cg_name) < 0) return -errno;
  char rel[PATH_MAX];
  snprintf(rel, sizeof rel, "%s/workers", cfg.cg_name);
  int r = mkdirs(hier[H_V2].base, rel);
  if (r < 0) return r;
  /* Where v2 offers memory/pids (a standard systemd host), our own cgroup may not both hold a process
   * and delegate controllers ("no internal processes"): move the warden into the leaf <NAME>/warden. */
  char ctrls[512], p[PATH_MAX];
  snprintf(p, sizeof p, "%s/cgroup.controllers", hier[H_V2].base);
  if (read_file(p, ctrls, sizeof ctrls) > 0 && (strstr(ctrls, "memory") || strstr(ctrls, "pids"))) {
    snprintf(rel, sizeof rel, "%s/warden", cfg.cg_name);
    snprintf(p, sizeof p, "%s/%s/cgroup.procs", hier[H_V2].base, rel);
    if ((r = mkdirs(hier[H_V2].base, rel)) < 0 || (r = write_file(p, "0")) < 0) return r;
    snprintf(rel, sizeof rel, "%s/workers", cfg.cg_name);
  }
  v2_memory = v2_enable("memory");
  v2_pids = v2_enable("pids");
  hier[H_MEM].used = !v2_memory && mnt[H_MEM][0];
  hier[H_PIDS].used = !v2_pids && mnt[H_PIDS][0];
  /* A worker without a memory or pids limit is out of policy: refuse to serve rather than run one. */
  if (!v2_memory && !hier[H_MEM].used) return logf_("no memory controller (v2 or v1) for the workers"), -ENOTSUP;
  if (!v2_pids && !hier[H_PIDS].used) return logf_("no pids controller (v2 or v1) for the workers"), -ENOTSUP;
  for (int h = H_MEM; h < H_COUNT; h++)
    if (hier[h].used && (r = mkdirs(hier[h].base, rel)) < 0) return r;
  return 0;
}

/* Kills and removes every workers/<x> cgroup left by a crashed warden, before serving. */
static int clean_leftovers(void) {
  int failed = 0;
  for (int h = 0; h < H_COUNT; h++) {
    if (!hier[h].used) continue;
    DIR *d = opendir(hier[h].workers);
    if (!d) return -errno;
    struct dirent *e;
    char names[MAX_WORKERS][NAME_MAX + 1];
    int n = 0;
    while ((e = readdir(d)) && n < MAX_WORKERS)
      if (e->d_type == DT_DIR && strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) snprintf(names[n++], NAME_MAX + 1, "%s", e->d_name);
    closedir(d);
    for (int i = 0; i < n; i++) {
      logf_("removing leftover worker cgroup %s/%s", hier[h].workers, names[i]);
      if (!end_cgroups(names[i], NULL)) failed++;
    }
  }
  return failed ? -EBUSY : 0;
}

/* Probes once whether tmpfs takes `noswap` (Linux >= 6.4), in a throwaway mount namespace. */
static bool probe_noswap(void) {
  pid_t pid = fork();
  if (pid == 0) {
    if (unshare(CLONE_NEWNS) || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) _exit(2);
    _exit(mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,noswap") ? 1 : 0);
  }
  int st;
  if (pid < 0 || waitpid(pid, &st, 0) != pid) return false;
  return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

/* ---------- the worker child (runs between fork and execve, never returns) ---------- */
static void child_fail(int sync, const char *stage) {
  char b[160];
  int n = snprintf(b, sizeof b, "E%s: %s", stage, strerror(errno));
  if (n > 0) (void)send(sync, b, (size_t)n, MSG_NOSIGNAL);
  _exit(126);
}

/* Covers a host directory with an empty read-only tmpfs. Only real directories: /var/run is a symlink
 * to /run on Debian and is hidden through it. A directory that stays visible is a set-up failure. */
static int hide(const char *path) {
  struct stat st;
  if (lstat(path, &st) || !S_ISDIR(st.st_mode)) return 0;
  /* Writable for now: an exposed directory below may need its mount point created; made read-only
   * again (seal_hidden) before the worker runs. */
  return mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755");
}

static int seal_hidden(const char *path) {
  struct stat st, up;
  if (lstat(path, &st) || !S_ISDIR(st.st_mode)) return 0;
  /* Only a mask that hide() mounted is remounted: a directory made later inside another mask (the keyd
   * socket's /run/phantoma when the warden's own socket dir is /run/phantoma too) is sealed with it. */
  char parent[PATH_MAX];
  snprintf(parent, sizeof parent, "%s/..", path);
  if (stat(parent, &up) == 0 && up.st_dev == st.st_dev) return 0;
  return mount(NULL, path, NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755");
}

static int mkdir_p(const char *path) {
  char b[PATH_MAX];
  if (snprintf(b, sizeof b, "%s", path) >= (int)sizeof b) return -1;
  for (char *q = b + 1; *q; q++) {
    if (*q != '/') continue;
    *q = 0;
    if (mkdir(b, 0755) && errno != EEXIST) return -1;
    *q = '/';
  }
  return mkdir(b, 0755) && errno != EEXIST ? -1 : 0;
}

/* Re-exposes a directory that a mask now covers: bind the original (held open since before the masks)
 * onto the same path, read-only. A directory that is still visible as itself is left alone. */
/* Where a worker finds keyd: a fixed path inside its view, whatever the host path (README.md). */
#define KEYD_SOCKET_IN_WORKER "/run/phantoma/keyd.sock"

/* Binds keyd's socket (held open as an O_PATH fd since before the masks) onto a fresh file in the masked,
 * still writable /run: the worker reaches keyd and nothing else of the host's /run. keyd itself decides
 * who may do what, by the caller's cgroup (SO_PEERCRED/SO_PEERPIDFD). */
static int bind_keyd_socket(int fd) {
  struct stat st;
  if (fstat(fd, &st) || !S_ISSOCK(st.st_mode)) return errno = ENOTSOCK, -1;
  if (mkdir_p("/run/phantoma")) return -1;
  int f = open(KEYD_SOCKET_IN_WORKER, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (f < 0) return -1;
  close(f);
  char src[64];
  snprintf(src, sizeof src, "/proc/self/fd/%d", fd);
  return mount(src, KEYD_SOCKET_IN_WORKER, NULL, MS_BIND, NULL);
}

static int expose(const char *path, int fd) {
  struct stat orig, now;
  if (fstat(fd, &orig)) return -1;
  if (stat(path, &now) == 0 && now.st_dev == orig.st_dev && now.st_ino == orig.st_ino) return 0;
  char src[64];
  snprintf(src, sizeof src, "/proc/self/fd/%d", fd);
  if (mkdir_p(path) || mount(src, path, NULL, MS_BIND | MS_REC, NULL)) return -1;
  struct mount_attr ro = {.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID};
  return (int)syscall(SYS_mount_setattr, AT_FDCWD, path, AT_RECURSIVE, &ro, sizeof ro);
}

static void __attribute__((noreturn))
child_main(const char *id, uid_t uid, gid_t gid, int nice_, char **argv, int conn, int errfd, int sync) {
  char p[PATH_MAX];
  sigset_t none;
  sigemptyset(&none);
  signal(SIGPIPE, SIG_DFL); /* the warden ignores it; an ignored disposition would survive execve */
  if (sigprocmask(SIG_SETMASK, &none, NULL)) child_fail(sync, "sigmask");

  /* 1. Into the worker's cgroups first, so everything after is accounted and killable as one. */
  for (int h = 0; h < H_COUNT; h++)
    if (hier[h].used && (cg_file(p, h, id, "cgroup.procs") || write_file(p, "0") < 0)) child_fail(sync, "cgroup join");
  if (setsid() < 0) child_fail(sync, "setsid");
  if (setpriority(PRIO_PROCESS, 0, nice_)) child_fail(sync, "setpriority");

  /* 2. Own network (only lo), mount and IPC namespaces. */
  if (unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC)) child_fail(sync, "unshare");
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  struct ifreq ifr = {0};
  snprintf(ifr.ifr_name, IFNAMSIZ, "lo");
  if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr)) child_fail(sync, "lo flags");
  ifr.ifr_flags |= IFF_UP;
  if (ioctl(s, SIOCSIFFLAGS, &ifr)) child_fail(sync, "lo up");
  close(s);

  /* 3. The mount view: private (nothing propagates back to the host), then everything read-only. */
  if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) child_fail(sync, "mount private");
  struct mount_attr attr = {.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID};
  if (syscall(SYS_mount_setattr, AT_FDCWD, "/", AT_RECURSIVE, &attr, sizeof attr)) child_fail(sync, "mount_setattr rdonly");
  /* Hold the exposed directories before anything masks them (opened in this namespace, so they can be
   * bind-mounted back below). */
  int xfd[MAX_EXPOSE];
  for (int i = 0; i < cfg.n_expose; i++)
    if ((xfd[i] = open(cfg.expose[i], O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0) child_fail(sync, "open exposed dir");
  int keyd_fd = -1;
  if (cfg.keyd_socket && (keyd_fd = open(cfg.keyd_socket, O_PATH | O_CLOEXEC)) < 0) child_fail(sync, "open keyd socket");
  /* A fresh sysfs: the host's one shows the host's interfaces (sysfs follows the netns of its mounter)
   * and the whole cgroup tree. */
  if (mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL)) child_fail(sync, "mount sysfs");
  /* A fresh procfs with hidepid=invisible (per-mount since Linux 5.8): the worker sees only its own
   * processes, not the gateway's or other workers' pids, cmdlines or environments. */
  if (mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")) child_fail(sync, "mount proc");
  /* Hide host runtime directories and sockets (keyd's socket is passed by path later, by design). */
  const char *hidden[] = {"/run", "/var/run", "/root", "/home", "/var/lib/phantoma", cfg.socket_dir};
  for (size_t i = 0; i < sizeof hidden / sizeof *hidden; i++)
    if (hide(hidden[i])) child_fail(sync, "hide");
  /* 4. The only writable place: a fresh size-capped tmpfs on /tmp (noswap where the kernel has it),
   * shared with /dev/shm by a bind mount so one cap covers both. It vanishes with the namespace. */
  char opts[128];
  snprintf(opts, sizeof opts, "size=%llu,mode=1777%s", cfg.tmpfs_size, have_noswap ? ",noswap" : "");
  if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)) child_fail(sync, "mount tmpfs");
  struct stat st;
  if (lstat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode)) {
    if (mkdir("/tmp/.shm", 01777) || chmod("/tmp/.shm", 01777)) child_fail(sync, "mkdir shm");
    if (mount("/tmp/.shm", "/dev/shm", NULL, MS_BIND, NULL)) child_fail(sync, "bind shm");
  }
  for (int i = 0; i < cfg.n_expose; i++)
    if (expose(cfg.expose[i], xfd[i])) child_fail(sync, "expose dir");
  if (keyd_fd >= 0 && bind_keyd_socket(keyd_fd)) child_fail(sync, "bind keyd socket");
  for (size_t i = 0; i < sizeof hidden / sizeof *hidden; i++)
    if (seal_hidden(hidden[i])) child_fail(sync, "seal hidden");

  /* 5. Limits. Memory and pids are the cgroup's; no core file may ever hold a prompt. */
  struct rlimit core = {0, 0}, nofile = {1024, 4096};
  if (setrlimit(RLIMIT_CORE, &core) || setrlimit(RLIMIT_NOFILE, &nofile)) child_fail(sync, "rlimit");
  umask(077);

  /* 6. Drop privilege: bounding set while still privileged, then groups, gid, uid. Moving every uid
   * away from 0 without SECBIT_KEEP_CAPS clears the permitted/effective sets; we verify, not assume. */
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)) child_fail(sync, "ambient");
  for (int c = 0; c <= cap_last; c++)
    if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0)) child_fail(sync, "capbset");
  if (setgroups(0, NULL) || setresgid(gid, gid, gid) || setresuid(uid, uid, uid)) child_fail(sync, "setuid");
  struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2];
  if (syscall(SYS_capget, &hdr, data)) child_fail(sync, "capget");
  for (int i = 0; i < 2; i++)
    if (data[i].effective || data[i].permitted || data[i].inheritable) {
      errno = EPERM;
      child_fail(sync, "capabilities remain");
    }
  if (getuid() != uid || geteuid() != uid || getgid() != gid || setuid(0) == 0) {
    errno = EPERM;
    child_fail(sync, "uid switch");
  }
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) child_fail(sync, "no_new_privs");
  if (chdir("/tmp")) child_fail(sync, "chdir");

  /* 7. stdio: the connection is stdin and stdout, the announced stderr connection (or /dev/null) fd 2.
   * Every other fd is closed at execve; the sync socket stays until then. */
  int null = errfd < 0 ? open("/dev/null", O_WRONLY | O_CLOEXEC) : errfd;
  if (null < 0 || dup2(conn, 0) < 0 || dup2(conn, 1) < 0 || dup2(null, 2) < 0) child_fail(sync, "stdio");
  if (close_range(3, ~0U, CLOSE_RANGE_CLOEXEC)) child_fail(sync, "close_range");

  /* 8. Ready; wait until the warden has written our reply header on the connection, so the worker's
   * first byte can never precede it, then become the worker. */
  char go;
  if (send(sync, "R", 1, MSG_NOSIGNAL) != 1 || recv(sync, &go, 1, 0) != 1 || go != 'G') _exit(125);
  execve(argv[0], argv, (char **)WORKER_ENV);
  _exit(127);
}

/* ---------- requests ---------- */
static struct worker *alloc_worker(void) {
  for (int i = 0; i < MAX_WORKERS; i++)
    if (!workers[i].used) return &workers[i];
  return NULL;
}

static int live_workers(void) {
  int n = 0;
  for (int i = 0; i < MAX_WORKERS; i++) n += workers[i].used;
  return n;
}

static void drop_pending(struct pending *pe) {
  if (pe->used) close(pe->fd);
  pe->used = false;
}

static struct pending *find_pending(const char *id) {
  for (int i = 0; i < MAX_PENDING; i++)
    if (pendings[i].used && !strcmp(pendings[i].id, id)) return &pendings[i];
  return NULL;
}

static const char *mode_name(int h, bool v2) {
  return v2 ? "v2" : hier[h].used ? "v1" : "none";
}

/* Creates workers/<id> in every hierarchy and sets its limits. */
static int make_cgroups(const char *id) {
  char p[PATH_MAX], v[32];
  for (int h = 0; h < H_COUNT; h++) {
    if (!hier[h].used) continue;
    if (cg_file(p, h, id, NULL) || mkdir(p, 0755)) return -errno;
  }
  snprintf(v, sizeof v, "%llu", cfg.memory_max);
  if (v2_memory) {
    if (cg_file(p, H_V2, id, "memory.max") || write_file(p, v)) return -EIO;
    if (cg_file(p, H_V2, id, "memory.swap.max") || write_file(p, "0") == -EIO) return -EIO; /* absent without swap accounting */
  } else if (hier[H_MEM].used) {
    if (cg_file(p, H_MEM, id, "memory.limit_in_bytes") || write_file(p, v)) return -EIO;
    /* memsw = mem means no swap for this cgroup; the file exists only with swap accounting */
    if (!cg_file(p, H_MEM, id, "memory.memsw.limit_in_bytes") && access(p, F_OK) == 0 && write_file(p, v)) return -EIO;
  }
  snprintf(v, sizeof v, "%lu", cfg.pids_max);
  if (v2_pids) {
    if (cg_file(p, H_V2, id, "pids.max") || write_file(p, v)) return -EIO;
  } else if (hier[H_PIDS].used) {
    if (cg_file(p, H_PIDS, id, "pids.max") || write_file(p, v)) return -EIO;
  }
  return 0;
}

static void do_spawn(int cfd, uid_t peer, char **f, int n) {
  unsigned long uid, gid, nice_;
  if (n < 7) return refuse(cfd, peer, "bad_request", "SPAWN needs id uid gid nice exec script [args]");
  if (!valid_id(f[1])) return refuse(cfd, peer, "cgroup_not_allowed", "the worker id must be 16 lowercase hex digits");
  if (!parse_ulong(f[2], UINT32_MAX, &uid) || !parse_ulong(f[3], UINT32_MAX, &gid) || !parse_ulong(f[4], 19, &nice_))
    return refuse(cfd, peer, "bad_request", "uid, gid and nice must be decimal numbers (nice 0-19)");
  if (uid < cfg.uid_lo || uid > cfg.uid_hi || gid < cfg.uid_lo || gid > cfg.uid_hi)
    return refuse(cfd, peer, "uid_out_of_range", "uid and gid must be inside the configured range");
  if (strcmp(f[5], cfg.worker_exec)) return refuse(cfd, peer, "exec_not_allowed", "only the configured worker executable may run");
  if (strcmp(f[6], cfg.worker_script)) return refuse(cfd, peer, "script_not_allowed", "argv[1] must be the configured worker script");
  for (int i = 7; i < n; i++) {
    size_t l = strlen(f[i]);
    if (l > MAX_ARG) return refuse(cfd, peer, "bad_request", "an argument is too long");
    for (size_t j = 0; j < l; j++)
      if ((unsigned char)f[i][j] < 0x20 || f[i][j] == 0x7f) return refuse(cfd, peer, "bad_request", "an argument has a control character");
  }
  const char *id = f[1];
  if (find_worker(id)) return refuse(cfd, peer, "id_in_use", "a worker with this id exists");
  struct worker *w = alloc_worker();
  if (!w) return refuse(cfd, peer, "too_many_workers", "the worker table is full");
  int r = make_cgroups(id);
  if (r) {
    /* EEXIST: a cgroup with this name exists without a record here; never adopt it */
    end_cgroups(id, NULL);
    return refuse(cfd, peer, r == -EEXIST ? "id_in_use" : "spawn_failed", r == -EEXIST ? "a cgroup with this id exists" : "could not create the worker cgroup");
  }
  struct pending *pe = find_pending(id);
  int errfd = pe ? pe->fd : -1;
  /* The connection becomes the worker's stdio: clear our I/O timeouts on it first (they belong to the
   * shared socket, and the worker must be able to wait for a job indefinitely). */
  struct timeval tv0 = {0, 0};
  int sync[2];
  if (setsockopt(cfd, SOL_SOCKET, SO_RCVTIMEO, &tv0, sizeof tv0) || setsockopt(cfd, SOL_SOCKET, SO_SNDTIMEO, &tv0, sizeof tv0) ||
      socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sync)) {
    end_cgroups(id, NULL);
    return refuse(cfd, peer, "spawn_failed", "socket set-up failed");
  }
  char *argv[MAX_FIELDS + MAX_PRE_ARGS];
  int a = 0;
  argv[a++] = f[5];
  for (int i = 0; i < cfg.n_pre_args; i++) argv[a++] = (char *)cfg.pre_args[i];
  for (int i = 6; i < n; i++) argv[a++] = f[i];
  argv[a] = NULL;
  pid_t pid = fork();
  if (pid == 0) {
    close(sync[0]);
    child_main(id, (uid_t)uid, (gid_t)gid, (int)nice_, argv, cfd, errfd, sync[1]);
  }
  close(sync[1]);
  if (pid < 0) {
    close(sync[0]);
    end_cgroups(id, NULL);
    return refuse(cfd, peer, "spawn_failed", "fork failed");
  }
  *w = (struct worker){.used = true, .pid = pid};
  snprintf(w->id, sizeof w->id, "%s", id);
  if (pe) drop_pending(pe); /* the worker holds its own copy now */
  char msg[160] = {0};
  struct pollfd pfd = {sync[0], POLLIN, 0};
  ssize_t got = poll(&pfd, 1, CHILD_SETUP_MS) == 1 ? recv(sync[0], msg, sizeof msg - 1, 0) : -1;
  if (got == 1 && msg[0] == 'R') {
    char hdr[64];
    int hl = snprintf(hdr, sizeof hdr, "OK %d\n", (int)pid);
    bool sent = send_all(cfd, hdr, (size_t)hl);
    /* Header first, then release the child: nothing the worker writes can precede the header. */
    if (sent && send(sync[0], "G", 1, MSG_NOSIGNAL) == 1) {
      logf_("spawned id=%s pid=%d uid=%lu", id, (int)pid, uid);
      close(sync[0]);
      return;
    }
    snprintf(msg, sizeof msg, "Eclient gone");
  }
  close(sync[0]);
  bool ok = end_cgroups(id, w);
  w->used = false;
  char why[256];
  snprintf(why, sizeof why, "worker set-up failed (%s)%s", got > 1 ? msg + 1 : "no answer", ok ? "" : "; its cgroup could not be removed");
  refuse(cfd, peer, "spawn_failed", why);
}

/* How many times the kernel's OOM killer fired in a worker's memory cgroup (read before it is removed):
 * the gateway reports such an end as out of memory rather than as an unexplained crash. */
static long oom_kills(const char *id) {
  char p[PATH_MAX], buf[1024];
  int h = v2_memory ? H_V2 : H_MEM;
  if (!hier[h].used || cg_file(p, h, id, v2_memory ? "memory.events" : "memory.oom_control")) return 0;
  if (read_file(p, buf, sizeof buf) <= 0) return 0;
  const char *k = strstr(buf, "oom_kill ");
  return k ? strtol(k + 9, NULL, 10) : 0;
}

static void do_end(int cfd, uid_t peer, char **f, int n) {
  if (n != 2) return refuse(cfd, peer, "bad_request", "END needs an id");
  if (!valid_id(f[1])) return refuse(cfd, peer, "cgroup_not_allowed", "the worker id must be 16 lowercase hex digits");
  struct worker *w = find_worker(f[1]);
  if (!w) return refuse(cfd, peer, "unknown_worker", "no live worker has this id");
  double t0 = now_ms();
  long ooms = oom_kills(w->id);
  bool ok = end_cgroups(w->id, w);
  double ms = now_ms() - t0;
  char exit_[32] = "exit=unknown";
  if (w->reaped && WIFEXITED(w->status)) snprintf(exit_, sizeof exit_, "code=%d", WEXITSTATUS(w->status));
  else if (w->reaped && WIFSIGNALED(w->status)) snprintf(exit_, sizeof exit_, "signal=%d", WTERMSIG(w->status));
  logf_("ended id=%s pid=%d verified=%d ms=%.3f %s oom_kills=%ld", w->id, (int)w->pid, ok, ms, exit_, ooms);
  if (!ok) return reply(cfd, "ERR end_failed the worker cgroup is not empty or not removed after %d ms", END_TIMEOUT_MS);
  w->used = false;
  reply(cfd, "OK ended verified=1 ms=%.3f %s oom_kills=%ld", ms, exit_, ooms);
}

static void do_stderr(int cfd, uid_t peer, char **f, int n, bool *keep) {
  if (n != 2) return refuse(cfd, peer, "bad_request", "STDERR needs an id");
  if (!valid_id(f[1])) return refuse(cfd, peer, "cgroup_not_allowed", "the worker id must be 16 lowercase hex digits");
  if (find_worker(f[1])) return refuse(cfd, peer, "id_in_use", "a worker with this id exists");
  struct pending *pe = find_pending(f[1]);
  if (pe) drop_pending(pe);
  for (int i = 0; !pe && i < MAX_PENDING; i++)
    if (!pendings[i].used) pe = &pendings[i];
  if (!pe) return refuse(cfd, peer, "too_many_workers", "too many pending stderr connections");
  struct timeval tv0 = {0, 0};
  if (setsockopt(cfd, SOL_SOCKET, SO_SNDTIMEO, &tv0, sizeof tv0)) return refuse(cfd, peer, "bad_request", "socket set-up failed");
  reply(cfd, "OK");
  *pe = (struct pending){.used = true, .fd = cfd};
  snprintf(pe->id, sizeof pe->id, "%s", f[1]);
  clock_gettime(CLOCK_MONOTONIC, &pe->expires);
  pe->expires.tv_sec += PENDING_TTL_MS / 1000;
  *keep = true;
}

/* Reads one request: fields ending with an empty field, nothing after it, at most MAX_MSG bytes. */
static void handle_conn(int cfd) {
  struct ucred cred;
  socklen_t cl = sizeof cred;
  if (getsockopt(cfd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) || cl != sizeof cred) {
    close(cfd);
    return;
  }
  if (cred.uid != cfg.client_uid) {
    refuse(cfd, cred.uid, "not_authorized", "this uid may not use the warden");
    close(cfd);
    return;
  }
  struct timeval tv = {IO_TIMEOUT_MS / 1000, (IO_TIMEOUT_MS % 1000) * 1000};
  if (setsockopt(cfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) || setsockopt(cfd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv)) {
    close(cfd);
    return;
  }
  char *buf = malloc(MAX_MSG + 1);
  if (!buf) {
    close(cfd);
    return;
  }
  size_t len = 0;
  char *end = NULL;
  for (;;) {
    ssize_t r = recv(cfd, buf + len, MAX_MSG - len, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) refuse(cfd, cred.uid, "bad_request", "timed out reading the request");
      goto out;
    }
    len += (size_t)r;
    end = memmem(buf, len, "\0\0", 2); /* fields are non-empty, so the first "\0\0" is the end */
    if (end || buf[0] == 0) break;
    if (len == MAX_MSG) {
      refuse(cfd, cred.uid, "too_large", "the request exceeds 64 KiB");
      /* Drain a little so the client reads our reply instead of a reset. */
      shutdown(cfd, SHUT_WR);
      char sink[4096];
      for (int i = 0; i < 256 && recv(cfd, sink, sizeof sink, 0) > 0; i++) {
      }
      goto out;
    }
  }
  if (buf[0] == 0 || (size_t)(end - buf) + 2 != len) {
    refuse(cfd, cred.uid, "bad_request", "malformed request (empty field or bytes after the end)");
    goto out;
  }
  char *f[MAX_FIELDS];
  int n = 0;
  for (char *p = buf; *p; p += strlen(p) + 1) {
    if (n == MAX_FIELDS) {
      refuse(cfd, cred.uid, "bad_request", "too many fields");
      goto out;
    }
    f[n++] = p;
  }
  bool keep = false;
  if (!strcmp(f[0], "PING") && n == 1) {
    reply(cfd, "OK pong pid=%d workers=%d memory=%s pids=%s noswap=%d cgroup=%s", (int)getpid(), live_workers(),
          mode_name(H_MEM, v2_memory), mode_name(H_PIDS, v2_pids), have_noswap, hier[H_V2].workers);
  } else if (!strcmp(f[0], "SPAWN")) {
    do_spawn(cfd, cred.uid, f, n);
  } else if (!strcmp(f[0], "END")) {
    do_end(cfd, cred.uid, f, n);
  } else if (!strcmp(f[0], "STDERR")) {
    do_stderr(cfd, cred.uid, f, n, &keep);
  } else if (!strcmp(f[0], "DOWNLOAD")) {
    download_request(cfd, cred.uid, f, n, &keep);
  } else if (egress_request(cfd, cred.uid, cred.pid, f, n, &keep)) { /* EGRESS_STATUS, EGRESS_PROBE, ALLOW, DENY, EVENTS, CONFINE */
  } else {
    refuse(cfd, cred.uid, "bad_request", "unknown request");
  }
  if (keep) {
    free(buf);
    return;
  }
out:
  free(buf);
  close(cfd);
}

static void expire_pending(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  for (int i = 0; i < MAX_PENDING; i++)
    if (pendings[i].used && (now.tv_sec > pendings[i].expires.tv_sec)) drop_pending(&pendings[i]);
}

/* SIGTERM: end every worker (kill + verify), remove the socket and our empty subtree, exit. */
static int shutdown_all(void) {
  int failed = 0;
  for (int i = 0; i < MAX_WORKERS; i++) {
    if (!workers[i].used) continue;
    if (!end_cgroups(workers[i].id, &workers[i])) failed++;
    workers[i].used = false;
  }
  for (int i = 0; i < MAX_PENDING; i++) drop_pending(&pendings[i]);
  unlink(cfg.socket_path);
  download_shutdown();
  egress_before_rmdir();
  for (int h = 0; h < H_COUNT; h++) {
    if (!hier[h].used) continue;
    /* rmdir only succeeds on empty cgroups: workers/ then each NAME segment, deepest first */
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s", hier[h].workers);
    size_t stop = strlen(hier[h].base);
    while (strlen(p) > stop && rmdir(p) == 0) *strrchr(p, '/') = 0;
  }
  egress_after_rmdir();
  logf_("stopped; %d worker(s) could not be verified as ended", failed);
  return failed ? 1 : 0;
}

static bool valid_cg_name(const char *s) {
  size_t l = strlen(s);
  if (l == 0 || l > 128 || s[0] == '/' || s[l - 1] == '/') return false;
  for (const char *seg = s; seg;) {
    const char *e = strchr(seg, '/');
    size_t sl = e ? (size_t)(e - seg) : strlen(seg);
    if (sl == 0 || (sl == 1 && seg[0] == '.') || (sl == 2 && !strncmp(seg, "..", 2))) return false;
    for (size_t i = 0; i < sl; i++)
      if (!isalnum((unsigned char)seg[i]) && !strchr("._-", seg[i])) return false;
    seg = e ? e + 1 : NULL;
  }
  return true;
}

static void usage(const char *why) {
  fprintf(stderr,
          "phantoma-warden: %s\nusage: phantoma-warden --socket PATH --client-uid UID --cgroup-name NAME --worker-exec ABSPATH "
          "--worker-script ABSPATH --uid-range FROM-TO [--memory-max BYTES] [--pids-max N] [--tmpfs-size BYTES] [--worker-arg ARG]... "
          "[--worker-preload ABSPATH] [--expose ABSDIR]... [--keyd-socket ABSPATH] [--egress enforce|off] [--gateway-egress tcp|udp,ADDR/BITS,PORT|none]... [--download-script ABSPATH --download-uid UID] [--exit-with-parent]\n",
          why);
  exit(2);
}

int main(int argc, char **argv) {
  unsigned long v;
  bool exit_with_parent = false, egress_on = false;
  for (int i = 1; i < argc; i += 2) {
    const char *k = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(k, "--exit-with-parent")) { /* tests: a killed test run must not leave a warden behind */
      exit_with_parent = true;
      i--;
      continue;
    }
    if (!strcmp(k, "--egress-tags")) return geteuid() == 0 ? egress_print_tags() : (usage("must run as root"), 2);
    if (!strcmp(k, "--egress") && val && (!strcmp(val, "enforce") || !strcmp(val, "off"))) {
      egress_on = !strcmp(val, "enforce");
      continue;
    }
    if (!val) usage("an option lacks its value");
    if (!strcmp(k, "--gateway-egress")) {
      const char *why = egress_gateway_option(val);
      if (why) usage(why);
    } else if (!strcmp(k, "--socket")) cfg.socket_path = val;
    else if (!strcmp(k, "--client-uid") && parse_ulong(val, UINT32_MAX - 1, &v)) cfg.client_uid = (uid_t)v;
    else if (!strcmp(k, "--cgroup-name")) cfg.cg_name = val;
    else if (!strcmp(k, "--worker-exec")) cfg.worker_exec = val;
    else if (!strcmp(k, "--worker-script")) cfg.worker_script = val;
    else if (!strcmp(k, "--worker-arg") && cfg.n_pre_args < MAX_PRE_ARGS && val[0] == '-' && strlen(val) < 256) cfg.pre_args[cfg.n_pre_args++] = val;
    else if (!strcmp(k, "--download-script") && download_set_script(val)) {
    } else if (!strcmp(k, "--download-uid") && download_set_uid(val)) {
    } else if (!strcmp(k, "--keyd-socket") && val[0] == '/' && strlen(val) < PATH_MAX) cfg.keyd_socket = val;
    else if (!strcmp(k, "--expose") && cfg.n_expose < MAX_EXPOSE && val[0] == '/' && strlen(val) < PATH_MAX - 1 && !strstr(val, "/../") && strcmp(val, "/"))
      cfg.expose[cfg.n_expose++] = val;
    else if (!strcmp(k, "--worker-preload") && val[0] == '/' && strlen(val) < PATH_MAX && !strchr(val, ':') && !strchr(val, ' ')) {
      snprintf(cfg.preload_env, sizeof cfg.preload_env, "LD_PRELOAD=%s", val);
      WORKER_ENV[5] = cfg.preload_env;
    }
    else if (!strcmp(k, "--memory-max") && parse_ulong(val, ULONG_MAX, &v) && v >= (4UL << 20)) cfg.memory_max = v;
    else if (!strcmp(k, "--tmpfs-size") && parse_ulong(val, ULONG_MAX, &v) && v >= 4096) cfg.tmpfs_size = v;
    else if (!strcmp(k, "--pids-max") && parse_ulong(val, 1UL << 22, &v) && v >= 1) cfg.pids_max = v;
    else if (!strcmp(k, "--uid-range")) {
      char lo[16] = {0}, hi[16] = {0};
      const char *dash = strchr(val, '-');
      if (!dash || dash - val >= 16 || strlen(dash + 1) >= 16) usage("bad --uid-range");
      memcpy(lo, val, (size_t)(dash - val));
      snprintf(hi, sizeof hi, "%s", dash + 1);
      /* never root, never the client: a worker must not share a uid with anything else */
      if (!parse_ulong(lo, UINT32_MAX - 1, &cfg.uid_lo) || !parse_ulong(hi, UINT32_MAX - 1, &cfg.uid_hi) || cfg.uid_lo == 0 || cfg.uid_lo > cfg.uid_hi)
        usage("bad --uid-range");
    } else usage("unknown or invalid option");
  }
  if (!cfg.socket_path || !cfg.cg_name || !cfg.worker_exec || !cfg.worker_script || !cfg.uid_hi) usage("missing a required option");
  if (egress_gateway_enabled() && !egress_on) usage("--gateway-egress needs --egress enforce");
  if (cfg.client_uid >= cfg.uid_lo && cfg.client_uid <= cfg.uid_hi) usage("the client uid is inside the worker uid range");
  if (cfg.worker_exec[0] != '/' || cfg.worker_script[0] != '/' || cfg.socket_path[0] != '/') usage("paths must be absolute");
  if (!valid_cg_name(cfg.cg_name)) usage("bad --cgroup-name (segments of [A-Za-z0-9._-])");
  const char *dl_bad = download_check(cfg.client_uid, cfg.uid_lo, cfg.uid_hi);
  if (dl_bad) usage(dl_bad);
  if (strlen(cfg.socket_path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) usage("socket path too long");
  snprintf(cfg.socket_dir, sizeof cfg.socket_dir, "%s", cfg.socket_path);
  *strrchr(cfg.socket_dir, '/') = 0;
  if (!cfg.socket_dir[0]) usage("the socket must not be directly in /");
  if (geteuid() != 0) usage("must run as root");

  /* Make sure fds 0-2 exist so no accepted connection can land on them. */
  for (int fd = open("/dev/null", O_RDWR); fd >= 0 && fd <= 2; fd = open("/dev/null", O_RDWR)) {
  }
  char buf[32];
  if (read_file("/proc/sys/kernel/cap_last_cap", buf, sizeof buf) > 0) cap_last = atoi(buf);
  /* Orphans of workers (double-forked daemons) come back to us, so we reap them, not init. */
  if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) perror("phantoma-warden: subreaper");
  signal(SIGPIPE, SIG_IGN);
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGCHLD);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  if (sigprocmask(SIG_BLOCK, &mask, NULL)) return perror("sigprocmask"), 1;
  int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) return perror("signalfd"), 1;
  /* SIGTERM (handled as a normal stop: workers ended and verified) when the parent dies. */
  if (exit_with_parent && (prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0) || getppid() == 1)) return logf_("parent gone"), 1;

  int r = find_cgroups();
  if (r) return logf_("cgroup set-up failed: %s", strerror(-r)), 1;
  if ((r = clean_leftovers())) return logf_("leftover worker cgroups could not be removed: %s", strerror(-r)), 1;
  have_noswap = probe_noswap();
  if (egress_on) {
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", hier[H_V2].workers);
    *strrchr(parent, '/') = 0;
    if ((r = egress_init(parent, hier[H_V2].workers, cfg.client_uid))) return logf_("egress filter set-up failed: %s", strerror(-r)), 1;
    char dl[PATH_MAX + 16];
    snprintf(dl, sizeof dl, "%s/download", parent);
    if ((r = download_init(dl, cfg.worker_exec, cfg.pre_args, cfg.n_pre_args))) return logf_("download set-up failed: %s", strerror(-r)), 1;
  } else {
    logf_("egress filter OFF (--egress off): workers rely on their empty network namespace alone");
  }

  int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", cfg.socket_path);
  struct stat st;
  if (lstat(cfg.socket_path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(cfg.socket_path); /* stale, from a crash */
  mode_t old = umask(0177);                                                              /* born 0600: no window */
  if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof sa)) return perror("bind"), 1;
  umask(old);
  /* chmod before chown: once the gateway owns it, changing the mode would need CAP_FOWNER, which the
     warden's unit does not grant (deploy/systemd/phantoma-warden.service). */
  if (chmod(cfg.socket_path, 0600) || chown(cfg.socket_path, cfg.client_uid, (gid_t)-1) || listen(lfd, 64))
    return perror("socket"), 1;
  logf_("serving on %s; workers in %s (memory %s, pids %s, noswap %d)", cfg.socket_path, hier[H_V2].workers, mode_name(H_MEM, v2_memory),
        mode_name(H_PIDS, v2_pids), have_noswap);
  printf("ready\n");
  fflush(stdout);
  sd_notify_ready(); /* under systemd (Type=notify): the socket exists and the filter is attached */

  for (;;) {
    struct pollfd pf[3] = {{lfd, POLLIN, 0}, {sfd, POLLIN, 0}, {egress_event_fd(), POLLIN, 0}};
    int pr = poll(pf, pf[2].fd >= 0 ? 3 : 2, 1000);
    if (pr > 0 && pf[2].fd >= 0 && (pf[2].revents & POLLIN)) egress_drain();
    if (pr < 0 && errno != EINTR) return perror("poll"), 1;
    if (pf[1].revents & POLLIN) {
      struct signalfd_siginfo si;
      bool term = false;
      while (read(sfd, &si, sizeof si) == sizeof si)
        if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT) term = true;
      reap_children();
      if (term) return shutdown_all();
    }
    if (pf[0].revents & POLLIN) {
      int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
      if (cfd >= 0) handle_conn(cfd);
    }
    expire_pending();
    download_tick();
  }
}
