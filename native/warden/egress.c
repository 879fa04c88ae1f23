// The warden's egress filter (issue 9). One instance of the embedded BPF object per cgroup:
// <NAME>/workers (allowlist always empty: no request can change it), <NAME>/download (allowlist
// changed only by ALLOW/DENY) and, with --gateway-egress, the gateway's own cgroup (issue 13: its
// allowlist fixed by the warden's command line, the socket hooks only — the skb hook would drop replies
// to clients; attached when the gateway asks with CONFINE). Programs, links and maps are pinned under
// /sys/fs/bpf/phantoma/<NAME>-<hash>/<workers|download|gateway>/, so the filter stays attached when the
// warden dies; a restarting warden attaches its new links BEFORE it detaches the old ones (no window).
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/bpf.h>
#include <linux/magic.h>
#include <libgen.h>
#include <linux/types.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "egress.h"
#include "egress_event.h"
#include "egress.skel.h"
#include "watch.skel.h"

#define BPFFS "/sys/fs/bpf"
#define N_PROGS 5
#define MAX_SUBSCRIBERS 8
#define PROBE_TIMEOUT_MS 2000

enum { S_WORKERS, S_DOWNLOAD, S_GATEWAY, S_COUNT };
static const char *SET_NAME[S_COUNT] = {"workers", "download", "gateway"};
/* The gateway set attaches the first four programs only (connect/sendmsg): a cgroup_skb/egress program
 * sees every packet, replies to the gateway's clients too, and would drop them. */
#define N_SOCK_PROGS 4
static int progs_of(int k) { return k == S_GATEWAY ? N_SOCK_PROGS : N_PROGS; }
/* Program order = hook order of egress_event.h. */
static const char *PROG_NAME[N_PROGS] = {"connect4", "connect6", "sendmsg4", "sendmsg6", "egress"};
static const enum bpf_attach_type ATTACH[N_PROGS] = {BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_UDP4_SENDMSG,
                                                     BPF_CGROUP_UDP6_SENDMSG, BPF_CGROUP_INET_EGRESS};

struct eset {
  struct egress_bpf *skel;
  int cg_fd;
  unsigned long long cg_id;
  char cg[PATH_MAX];
  char pins[PATH_MAX];
};
static struct eset sets[S_COUNT];
static bool enabled;
static char pin_root[PATH_MAX], workers_dir[PATH_MAX];
/* One allowlist entry as the maps key it (address already masked to its prefix). */
struct allow_entry {
  int family;
  unsigned proto, bits, port;
  unsigned char addr[16];
};
/* --gateway-egress: the gateway's allowlist (its control plane), fixed for the warden's lifetime, so a
 * compromised gateway cannot widen it; gateway_on says the option was given (possibly as "none"). */
static struct allow_entry gateway_allow[EGRESS_ALLOW_MAX];
static int n_gateway_allow;
static bool gateway_on;
static char cg2_root[PATH_MAX];                /* the cgroup2 mount the warden's subtree lives in */
static char own_rel[PATH_MAX];                 /* the warden's own cgroup, relative to that mount */
static char workers_rel[PATH_MAX];             /* workers/ relative to it, as /proc/<pid>/cgroup says */
static char subtree_rel[PATH_MAX];             /* <NAME>/, the parent of workers/ and download/, likewise */
static struct ring_buffer *rb;
static int subscribers[MAX_SUBSCRIBERS];
static unsigned long long events_sent, events_dropped;
static unsigned long long probe_cg_ids[4];
static int probe_l4 = -1, probe_l6 = -1, probe_u4 = -1;
static unsigned short probe_p4, probe_p6, probe_pu4;
/* ptrace / process_vm_* detection (watch.bpf.c): reported when the target is a worker or the gateway. */
static struct watch_bpf *watch;
static uid_t client_uid;
static unsigned long long watch_reported;

static void elog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void elog(const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "phantoma-warden: egress: %s\n", buf);
}

static int libbpf_log(enum libbpf_print_level level, const char *fmt, va_list ap) {
  if (level == LIBBPF_DEBUG) return 0;
  fprintf(stderr, "phantoma-warden: libbpf: ");
  return vfprintf(stderr, fmt, ap);
}

/* Sends a whole reply line; longer than reply() in warden.c allows (status lists every program). */
static void say(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(int fd, const char *fmt, ...) {
  char buf[8192];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n > sizeof buf - 2) n = sizeof buf - 2;
  buf[n++] = '\n';
  for (char *p = buf; n > 0;) {
    ssize_t w = send(fd, p, (size_t)n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    p += w;
    n -= (int)w;
  }
}

static void refuse_(int fd, uid_t peer, const char *code, const char *msg) {
  elog("refused code=%s peer_uid=%u: %s", code, (unsigned)peer, msg);
  say(fd, "ERR %s %s", code, msg);
}

static const char *errname(int e) {
  const char *n = e ? strerrorname_np(e) : "connected";
  return n ? n : "unknown";
}

static int mkdir_p(const char *path, mode_t mode) {
  char b[PATH_MAX];
  if (snprintf(b, sizeof b, "%s", path) >= (int)sizeof b) return -ENAMETOOLONG;
  for (char *q = b + 1; *q; q++) {
    if (*q != '/') continue;
    *q = 0;
    if (mkdir(b, mode) && errno != EEXIST) return -errno;
    *q = '/';
  }
  return mkdir(b, mode) && errno != EEXIST ? -errno : 0;
}

static int ensure_bpffs(void) {
  struct statfs sf;
  if (statfs(BPFFS, &sf) == 0 && sf.f_type == BPF_FS_MAGIC) return 0;
  if (mount("bpf", BPFFS, "bpf", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0700")) return -errno;
  elog("mounted bpffs on %s", BPFFS);
  return 0;
}

static struct bpf_program *prog_of(struct egress_bpf *s, int i) {
  struct bpf_program *p[N_PROGS] = {s->progs.egress_connect4, s->progs.egress_connect6, s->progs.egress_sendmsg4, s->progs.egress_sendmsg6,
                                    s->progs.egress_skb};
  return p[i];
}

static int prog_tag(int prog_fd, char out[17], unsigned *id) {
  struct bpf_prog_info info;
  __u32 len = sizeof info;
  memset(&info, 0, sizeof info);
  if (bpf_obj_get_info_by_fd(prog_fd, &info, &len)) return -errno;
  for (int i = 0; i < 8; i++) snprintf(out + 2 * i, 3, "%02x", info.tag[i]);
  if (id) *id = info.id;
  return 0;
}

/* Re-pins an object: unlink whatever is at the path, pin fd there. */
static int repin(int fd, const char *dir, const char *name) {
  char p[PATH_MAX];
  snprintf(p, sizeof p, "%s/%s", dir, name);
  if (unlink(p) && errno != ENOENT) return -errno;
  return bpf_obj_pin(fd, p) ? -errno : 0;
}

/* Attaches program i of a set, pins the link, and only then detaches a previous warden's link for the
 * same hook: at every moment at least one of our programs is attached (cgroup links are multi-attach,
 * and with several programs every one must allow). bpffs refuses rename(), so a link lives in one of two
 * slots, link_<prog>_a and link_<prog>_b (bpffs refuses dots in names): the new link is pinned into the free one, then the old goes. */
static int attach_one(struct eset *s, int i) {
  char slot[2][PATH_MAX];
  int fd[2];
  for (int k = 0; k < 2; k++) {
    snprintf(slot[k], sizeof slot[k], "%s/link_%s_%c", s->pins, PROG_NAME[i], 'a' + k);
    fd[k] = bpf_obj_get(slot[k]);
  }
  struct bpf_link *l = bpf_program__attach_cgroup(prog_of(s->skel, i), s->cg_fd);
  if (!l) {
    int r = -errno;
    elog("attach %s to %s: %s", PROG_NAME[i], s->cg, strerror(-r));
    for (int k = 0; k < 2; k++)
      if (fd[k] >= 0) close(fd[k]);
    return r;
  }
  /* Both slots taken (a swap cut short by a crash): free slot a; slot b stays attached meanwhile, and so
   * does our new link (held by our fd). */
  if (fd[0] >= 0 && fd[1] >= 0) {
    (void)bpf_link_detach(fd[0]);
    unlink(slot[0]);
    close(fd[0]);
    fd[0] = -1;
  }
  int target = fd[0] >= 0 ? 1 : 0, old = 1 - target;
  int r = 0;
  if (bpf_obj_pin(bpf_link__fd(l), slot[target])) {
    r = -errno;
    elog("pin link %s: %s", slot[target], strerror(-r));
  } else if (fd[old] >= 0) {
    (void)bpf_link_detach(fd[old]); /* may already be defunct: its cgroup was removed */
    unlink(slot[old]);
  }
  for (int k = 0; k < 2; k++)
    if (fd[k] >= 0) close(fd[k]);
  /* The link stays referenced by its pin; our own fd goes with the process. */
  return r;
}

/* Loads a set's own instance of the object and pins it; attaches it to cg unless cg is NULL (the
 * gateway set: its cgroup is known only when the gateway asks, do_confine()). */
static int load_set(int k, const char *cg) {
  struct eset *s = &sets[k];
  s->cg_fd = -1;
  snprintf(s->cg, sizeof s->cg, "%s", cg ? cg : "");
  snprintf(s->pins, sizeof s->pins, "%s/%s", pin_root, SET_NAME[k]);
  int r = mkdir_p(s->pins, 0700);
  if (r) return elog("mkdir %s: %s", s->pins, strerror(-r)), r;
  struct stat st;
  if (cg) {
    s->cg_fd = open(cg, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (s->cg_fd < 0 || fstat(s->cg_fd, &st)) return r = -errno, elog("open %s: %s", cg, strerror(-r)), r;
    s->cg_id = (unsigned long long)st.st_ino; /* a cgroup's id is its kernfs inode number */
  }
  s->skel = egress_bpf__open_and_load();
  if (!s->skel) return r = -errno, elog("load the BPF object: %s", strerror(-r)), r ? r : -EINVAL;
  for (int i = 0; i < N_PROGS; i++) {
    char name[32];
    snprintf(name, sizeof name, "prog_%s", PROG_NAME[i]);
    if ((r = repin(bpf_program__fd(prog_of(s->skel, i)), s->pins, name))) return elog("pin %s: %s", name, strerror(-r)), r;
  }
  struct bpf_map *maps[] = {s->skel->maps.allow4, s->skel->maps.allow6, s->skel->maps.events, s->skel->maps.counts};
  for (size_t i = 0; i < sizeof maps / sizeof *maps; i++)
    if ((r = repin(bpf_map__fd(maps[i]), s->pins, bpf_map__name(maps[i])))) return elog("pin map: %s", strerror(-r)), r;
  for (int i = 0; cg && i < progs_of(k); i++)
    if ((r = attach_one(s, i))) return r;
  return 0;
}

static int listen_on(int family, int type, unsigned short *port) {
  int fd = socket(family, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -1;
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  socklen_t len;
  if (family == AF_INET) {
    struct sockaddr_in *a = (struct sockaddr_in *)&ss;
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    len = sizeof *a;
  } else {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
    a->sin6_family = AF_INET6;
    a->sin6_addr = in6addr_loopback;
    int one = 1;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    len = sizeof *a;
  }
  if (bind(fd, (struct sockaddr *)&ss, len) || (type == SOCK_STREAM && listen(fd, 16)) || getsockname(fd, (struct sockaddr *)&ss, &len)) {
    close(fd);
    return -1;
  }
  *port = ntohs(family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port : ((struct sockaddr_in6 *)&ss)->sin6_port);
  return fd;
}

/* ---------- cgroups of processes ---------- */
/* Reads a small /proc file (NUL-terminated); the byte count or -1. */
static ssize_t read_proc(unsigned pid, const char *what, char *buf, size_t cap) {
  char p[64];
  if (pid) snprintf(p, sizeof p, "/proc/%u/%s", pid, what);
  else snprintf(p, sizeof p, "/proc/self/%s", what);
  int fd = open(p, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = read(fd, buf, cap - 1);
  close(fd);
  if (n <= 0) return -1;
  buf[n] = 0;
  return n;
}

/* The process's cgroup2 path relative to the cgroup2 mount ("0::" line; "/" for the root); pid 0 = self. */
static int cgroup_of(unsigned pid, char *out, size_t n) {
  char buf[4096];
  if (read_proc(pid, "cgroup", buf, sizeof buf) < 0) return -1;
  for (char *line = buf; line && *line;) {
    char *nl = strchr(line, '\n');
    if (nl) *nl = 0;
    if (!strncmp(line, "0::", 3)) return snprintf(out, n, "%s", line + 3) < (int)n ? 0 : -1;
    line = nl ? nl + 1 : NULL;
  }
  return -1;
}

/* The real uid of a process, or -1 when it is gone. */
static long real_uid_of(unsigned pid) {
  char buf[4096];
  if (read_proc(pid, "status", buf, sizeof buf) < 0) return -1;
  char *u = strstr(buf, "\nUid:");
  unsigned ruid;
  return u && sscanf(u + 5, "%u", &ruid) == 1 ? (long)ruid : -1;
}

/* path is dir itself or below it (both relative cgroup paths). */
static bool under(const char *path, const char *dir) {
  size_t l = strlen(dir);
  if (l == 1 && dir[0] == '/') return true;
  return !strncmp(path, dir, l) && (path[l] == '/' || path[l] == 0);
}

/* Splits the workers/ path into the cgroup2 mount (the shortest prefix that is one) and the rest. */
static int find_cg2_root(void) {
  struct statfs top;
  char mp[PATH_MAX];
  snprintf(mp, sizeof mp, "%s", workers_dir);
  for (size_t i = 1; mp[i]; i++) {
    if (mp[i] != '/') continue;
    mp[i] = 0;
    if (statfs(mp, &top) == 0 && top.f_type == CGROUP2_SUPER_MAGIC) {
      snprintf(cg2_root, sizeof cg2_root, "%s", mp);
      snprintf(workers_rel, sizeof workers_rel, "%s", workers_dir + i);
      snprintf(subtree_rel, sizeof subtree_rel, "%s", workers_rel);
      char *slash = strrchr(subtree_rel, '/');
      if (slash && slash != subtree_rel) *slash = 0;
      return 0;
    }
    mp[i] = '/';
  }
  return -ENOENT;
}

static int on_event(void *ctx, void *data, size_t size);
static int on_watch(void *ctx, void *data, size_t size);
static int map_entry(struct eset *s, const struct allow_entry *e, bool add);
static size_t list_allow(struct eset *s, char *out, size_t cap);

/* The tracepoints need tracefs (libbpf reads the event ids there); mount it where it is missing. Detection
 * only: a failure here is logged and shown in EGRESS_STATUS (watch=off), it does not stop the warden. */
static void watch_start(void) {
  struct statfs sf;
  if (statfs("/sys/kernel/tracing/events", &sf) != 0 && mount("tracefs", "/sys/kernel/tracing", "tracefs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
    elog("cannot mount tracefs on /sys/kernel/tracing: %s", strerror(errno));
  watch = watch_bpf__open_and_load();
  if (!watch || watch_bpf__attach(watch) || ring_buffer__add(rb, bpf_map__fd(watch->maps.watch_events), on_watch, NULL)) {
    elog("ptrace/process_vm detection NOT active: %s", strerror(errno));
    if (watch) watch_bpf__destroy(watch);
    watch = NULL;
    return;
  }
  elog("ptrace/process_vm detection active for targets in %s and uid %u", workers_rel[0] ? workers_rel : "?", (unsigned)client_uid);
}

/* "worker", "gateway" (a process of the client uid) or NULL for anything else. */
static const char *watched_target(unsigned pid) {
  char rel[PATH_MAX];
  if (cgroup_of(pid, rel, sizeof rel) == 0 && workers_rel[0] && under(rel, workers_rel)) return "worker";
  long uid = real_uid_of(pid);
  return uid >= 0 && (uid_t)uid == client_uid ? "gateway" : NULL;
}

static void broadcast(const char *line, int n);

static int on_watch(void *ctx, void *data, size_t size) {
  (void)ctx;
  const struct watch_event *e = data;
  if (size < sizeof *e) return 0;
  const char *what = watched_target(e->target);
  if (!what) return 0;
  static const char *KIND[] = {"?", "ptrace", "process_vm_readv", "process_vm_writev"};
  char comm[17];
  size_t j = 0;
  for (size_t i = 0; i < sizeof e->comm && e->comm[i]; i++)
    comm[j++] = (e->comm[i] > 0x20 && e->comm[i] < 0x7f && e->comm[i] != '=') ? e->comm[i] : '_';
  comm[j] = 0;
  char line[384];
  int n = snprintf(line, sizeof line, "AUDIT ts=%llu kind=%s request=%llu pid=%u comm=%s cgroup=%llu target=%u target_is=%s\n", (unsigned long long)e->ts_ns,
                   KIND[e->kind < 4 ? e->kind : 0], (unsigned long long)e->request, e->pid, j ? comm : "-", (unsigned long long)e->cgroup_id, e->target, what);
  watch_reported++;
  elog("%.*s", n - 1, line);
  broadcast(line, n);
  return 0;
}

int egress_init(const char *parent, const char *workers, uid_t client) {
  client_uid = client;
  libbpf_set_print(libbpf_log);
  for (int i = 0; i < MAX_SUBSCRIBERS; i++) subscribers[i] = -1;
  snprintf(workers_dir, sizeof workers_dir, "%s", workers);
  int r = ensure_bpffs();
  if (r) return elog("bpffs: %s", strerror(-r)), r;
  /* Pins per warden subtree: the last path segment for humans, a hash of the whole path for uniqueness. */
  unsigned long long h = 1469598103934665603ULL;
  for (const char *p = parent; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ULL;
  const char *last = strrchr(parent, '/');
  snprintf(pin_root, sizeof pin_root, "%s/phantoma/%.64s-%08llx", BPFFS, last ? last + 1 : parent, h & 0xffffffffULL);
  if ((r = find_cg2_root()) || cgroup_of(0, own_rel, sizeof own_rel)) return elog("cannot place %s and the warden in a cgroup2 mount", workers), r ? r : -ENOENT;
  char download[PATH_MAX];
  snprintf(download, sizeof download, "%s/download", parent);
  if (mkdir(download, 0755) && errno != EEXIST) return r = -errno, elog("mkdir %s: %s", download, strerror(-r)), r;
  if ((r = load_set(S_WORKERS, workers)) || (r = load_set(S_DOWNLOAD, download))) return r;
  rb = ring_buffer__new(bpf_map__fd(sets[S_WORKERS].skel->maps.events), on_event, &sets[S_WORKERS], NULL);
  if (!rb || ring_buffer__add(rb, bpf_map__fd(sets[S_DOWNLOAD].skel->maps.events), on_event, &sets[S_DOWNLOAD]))
    return elog("ring buffer set-up failed"), -EIO;
  if (gateway_on) {
    if ((r = load_set(S_GATEWAY, NULL))) return r;
    for (int i = 0; i < n_gateway_allow; i++)
      if ((r = map_entry(&sets[S_GATEWAY], &gateway_allow[i], true))) return elog("gateway allowlist: %s", strerror(-r)), r;
    if (ring_buffer__add(rb, bpf_map__fd(sets[S_GATEWAY].skel->maps.events), on_event, &sets[S_GATEWAY])) return elog("ring buffer set-up failed"), -EIO;
  }
  probe_l4 = listen_on(AF_INET, SOCK_STREAM, &probe_p4);
  probe_u4 = listen_on(AF_INET, SOCK_DGRAM, &probe_pu4);
  probe_l6 = listen_on(AF_INET6, SOCK_STREAM, &probe_p6); /* absent where IPv6 is off */
  if (probe_l4 < 0 || probe_u4 < 0) return elog("probe listeners: %s", strerror(errno)), -EIO;
  enabled = true;
  watch_start();
  elog("attached to %s (cgroup %llu) and %s (cgroup %llu); pinned under %s", sets[0].cg, sets[0].cg_id, sets[1].cg, sets[1].cg_id, pin_root);
  return 0;
}

int egress_event_fd(void) { return enabled ? ring_buffer__epoll_fd(rb) : -1; }

void egress_drain(void) {
  if (enabled) ring_buffer__consume(rb);
}

/* ---------- deny events ---------- */
static const char *proto_name(unsigned p, char *buf, size_t n) {
  if (p == IPPROTO_TCP) return "tcp";
  if (p == IPPROTO_UDP) return "udp";
  if (p == IPPROTO_ICMP) return "icmp";
  if (p == IPPROTO_ICMPV6) return "icmpv6";
  snprintf(buf, n, "%u", p);
  return buf;
}

static int on_event(void *ctx, void *data, size_t size) {
  const struct eset *s = ctx;
  const struct egress_event *e = data;
  if (size < sizeof *e) return 0;
  char addr[INET6_ADDRSTRLEN] = "-", comm[17], pb[8];
  if (e->family == AF_INET || e->family == AF_INET6) inet_ntop(e->family, e->addr, addr, sizeof addr);
  size_t j = 0;
  for (size_t i = 0; i < sizeof e->comm && e->comm[i]; i++)
    comm[j++] = (e->comm[i] > 0x20 && e->comm[i] < 0x7f && e->comm[i] != '=') ? e->comm[i] : '_';
  comm[j] = 0;
  if (!j) snprintf(comm, sizeof comm, "-");
  bool probe = false;
  for (size_t i = 0; i < sizeof probe_cg_ids / sizeof *probe_cg_ids; i++) probe |= probe_cg_ids[i] && probe_cg_ids[i] == e->cgroup_id;
  const char *hook = e->hook < N_PROGS ? PROG_NAME[e->hook] : "unknown";
  char line[512];
  int n = snprintf(line, sizeof line, "EVENT ts=%llu set=%s hook=%s pid=%u comm=%s cgroup=%llu proto=%s dst=%s port=%u probe=%d\n",
                   (unsigned long long)e->ts_ns, SET_NAME[s - sets], hook, e->pid, comm, (unsigned long long)e->cgroup_id,
                   proto_name(e->proto, pb, sizeof pb), addr, e->port, probe);
  broadcast(line, n);
  return 0;
}

static void broadcast(const char *line, int n) {
  for (int i = 0; i < MAX_SUBSCRIBERS; i++) {
    if (subscribers[i] < 0) continue;
    ssize_t w = send(subscribers[i], line, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w == n) {
      events_sent++;
    } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      events_dropped++; /* a slow reader loses events, the warden never blocks */
    } else {
      close(subscribers[i]);
      subscribers[i] = -1;
    }
  }
}

static void do_events(int cfd, uid_t peer, bool *keep) {
  int slot = -1;
  for (int i = 0; i < MAX_SUBSCRIBERS; i++) {
    if (subscribers[i] >= 0) {
      struct pollfd p = {subscribers[i], POLLRDHUP, 0};
      if (poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR))) {
        close(subscribers[i]);
        subscribers[i] = -1;
      }
    }
    if (subscribers[i] < 0 && slot < 0) slot = i;
  }
  if (slot < 0) return refuse_(cfd, peer, "too_many_subscribers", "at most 8 event streams at once");
  say(cfd, "OK events");
  subscribers[slot] = cfd;
  *keep = true;
}

/* ---------- status ---------- */
static unsigned long long counter(struct eset *s, unsigned slot) {
  int ncpu = libbpf_num_possible_cpus();
  if (ncpu <= 0 || ncpu > 4096) return 0;
  __u64 vals[ncpu];
  __u32 key = slot;
  if (bpf_map_lookup_elem(bpf_map__fd(s->skel->maps.counts), &key, vals)) return 0;
  unsigned long long sum = 0;
  for (int i = 0; i < ncpu; i++) sum += vals[i];
  return sum;
}

/* Appends "<set>.<prog>=<id>:<tag>[+<id>:<tag>...]" as the kernel reports it (BPF_PROG_QUERY). */
static size_t query_set(struct eset *s, char *out, size_t cap) {
  size_t len = 0;
  len += (size_t)snprintf(out + len, cap - len, " %s.cgroup=%llu", SET_NAME[s - sets], s->cg_id);
  for (int i = 0; i < progs_of((int)(s - sets)) && len < cap; i++) {
    __u32 ids[16], cnt = 16, flags = 0;
    len += (size_t)snprintf(out + len, cap - len, " %s.%s=", SET_NAME[s - sets], PROG_NAME[i]);
    if (len >= cap) break;
    if (s->cg_fd < 0) { /* the gateway set before its first CONFINE */
      len += (size_t)snprintf(out + len, cap - len, "-");
      continue;
    }
    if (bpf_prog_query(s->cg_fd, ATTACH[i], 0, &flags, ids, &cnt)) {
      len += (size_t)snprintf(out + len, cap - len, "error:%s", errname(errno));
      continue;
    }
    if (cnt == 0) len += (size_t)snprintf(out + len, cap - len, "-");
    for (__u32 j = 0; j < cnt && len < cap; j++) {
      char tag[17] = "unknown";
      int fd = bpf_prog_get_fd_by_id(ids[j]);
      if (fd >= 0) {
        (void)prog_tag(fd, tag, NULL);
        close(fd);
      }
      len += (size_t)snprintf(out + len, cap - len, "%s%u:%s", j ? "+" : "", ids[j], tag);
    }
  }
  return len < cap ? len : cap - 1;
}

static size_t list_allow(struct eset *s, char *out, size_t cap) {
  size_t len = 0;
  int n = 0;
  struct egress_allow4 k4, *p4 = NULL;
  while (len < cap && bpf_map_get_next_key(bpf_map__fd(s->skel->maps.allow4), p4, &k4) == 0) {
    char a[INET_ADDRSTRLEN], pb[8];
    inet_ntop(AF_INET, k4.addr, a, sizeof a);
    len += (size_t)snprintf(out + len, cap - len, "%s%s:%s/%u:%u", n++ ? "," : "", proto_name(k4.proto, pb, sizeof pb), a, k4.prefixlen - 32, ntohs(k4.port_be));
    p4 = &k4;
  }
  struct egress_allow6 k6, *p6 = NULL;
  while (len < cap && bpf_map_get_next_key(bpf_map__fd(s->skel->maps.allow6), p6, &k6) == 0) {
    char a[INET6_ADDRSTRLEN], pb[8];
    inet_ntop(AF_INET6, k6.addr, a, sizeof a);
    len += (size_t)snprintf(out + len, cap - len, "%s%s:[%s]/%u:%u", n++ ? "," : "", proto_name(k6.proto, pb, sizeof pb), a, k6.prefixlen - 32, ntohs(k6.port_be));
    p6 = &k6;
  }
  if (!n && cap > 1) len = (size_t)snprintf(out, cap, "-");
  return len < cap ? len : cap - 1;
}

static int count_entries(int map_fd, size_t key_size) {
  char k[64], prev[64];
  int n = 0;
  void *p = NULL;
  while (n < 1000 && bpf_map_get_next_key(map_fd, p, k) == 0) {
    memcpy(prev, k, key_size);
    p = prev;
    n++;
  }
  return n;
}

static void do_status(int cfd) {
  if (!enabled) return say(cfd, "OK egress mode=off");
  char buf[7800];
  int n_sets = gateway_on ? S_COUNT : S_GATEWAY;
  size_t len = (size_t)snprintf(buf, sizeof buf, "OK egress mode=enforce pins=%s", pin_root);
  for (int k = 0; k < n_sets; k++) len += query_set(&sets[k], buf + len, sizeof buf - len);
  /* workers/ has no allowlist by construction; its entry count is reported so that is checkable. */
  int w4 = count_entries(bpf_map__fd(sets[S_WORKERS].skel->maps.allow4), sizeof(struct egress_allow4));
  int w6 = count_entries(bpf_map__fd(sets[S_WORKERS].skel->maps.allow6), sizeof(struct egress_allow6));
  len += (size_t)snprintf(buf + len, sizeof buf - len, " workers.allow=%d download.allow=", w4 + w6);
  if (len < sizeof buf) len += list_allow(&sets[S_DOWNLOAD], buf + len, sizeof buf - len);
  if (len < sizeof buf && !gateway_on) len += (size_t)snprintf(buf + len, sizeof buf - len, " gateway=off");
  else if (len < sizeof buf) {
    len += (size_t)snprintf(buf + len, sizeof buf - len, " gateway.allow=");
    if (len < sizeof buf) len += list_allow(&sets[S_GATEWAY], buf + len, sizeof buf - len);
  }
  for (int k = 0; k < n_sets && len < sizeof buf; k++) {
    unsigned long long denied = 0, allowed = 0;
    for (unsigned hk = 0; hk < EGRESS_HOOK_COUNT; hk++) {
      allowed += counter(&sets[k], hk * 2);
      denied += counter(&sets[k], hk * 2 + 1);
    }
    len += (size_t)snprintf(buf + len, sizeof buf - len, " %s.denied=%llu %s.allowed=%llu %s.lost=%llu", SET_NAME[k], denied, SET_NAME[k], allowed,
                            SET_NAME[k], counter(&sets[k], EGRESS_COUNT_LOST));
  }
  if (len < sizeof buf)
    snprintf(buf + len, sizeof buf - len, " events.sent=%llu events.dropped=%llu watch=%s watch.reported=%llu", events_sent, events_dropped, watch ? "on" : "off",
             watch_reported);
  say(cfd, "%s", buf);
}

/* ---------- allowlist (download/ only) ---------- */
static bool parse_port(const char *s, unsigned *out) {
  size_t l = strlen(s);
  if (l == 0 || l > 5 || (l > 1 && s[0] == '0')) return false;
  unsigned v = 0;
  for (size_t i = 0; i < l; i++) {
    if (s[i] < '0' || s[i] > '9') return false;
    v = v * 10 + (unsigned)(s[i] - '0');
  }
  if (v > 65535) return false;
  *out = v;
  return true;
}

/* Parses "tcp|udp", "ADDRESS/BITS", "PORT" into an entry (host bits zeroed); NULL or why not. */
static const char *parse_entry(const char *proto_s, const char *cidr, const char *port_s, struct allow_entry *e) {
  static const char *usage_ = "need: tcp|udp ADDRESS/BITS PORT (0 = any port)";
  memset(e, 0, sizeof *e);
  e->proto = !strcmp(proto_s, "tcp") ? IPPROTO_TCP : !strcmp(proto_s, "udp") ? IPPROTO_UDP : 0;
  char addr[INET6_ADDRSTRLEN + 1];
  const char *slash = strchr(cidr, '/');
  if (!e->proto || !parse_port(port_s, &e->port) || !slash || (size_t)(slash - cidr) >= sizeof addr || !parse_port(slash + 1, &e->bits)) return usage_;
  memcpy(addr, cidr, (size_t)(slash - cidr));
  addr[slash - cidr] = 0;
  e->family = inet_pton(AF_INET, addr, e->addr) == 1 ? AF_INET : inet_pton(AF_INET6, addr, e->addr) == 1 ? AF_INET6 : 0;
  unsigned maxbits = e->family == AF_INET ? 32 : 128;
  if (!e->family || e->bits > maxbits) return "not an IPv4 or IPv6 prefix";
  static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (e->family == AF_INET6 && !memcmp(e->addr, mapped, 12)) return "write an IPv4-mapped address as IPv4";
  for (unsigned i = e->bits; i < maxbits; i++) e->addr[i / 8] &= (unsigned char)~(0x80u >> (i % 8)); /* canonical: host bits zero */
  return NULL;
}

/* Adds or removes an entry in a set's allowlist map; 0 or -errno. */
static int map_entry(struct eset *s, const struct allow_entry *e, bool add) {
  __u8 one = 1;
  int r;
  if (e->family == AF_INET) {
    struct egress_allow4 k = {.prefixlen = 32 + e->bits, .proto = (__u8)e->proto, .port_be = htons((unsigned short)e->port)};
    memcpy(k.addr, e->addr, 4);
    r = add ? bpf_map_update_elem(bpf_map__fd(s->skel->maps.allow4), &k, &one, BPF_ANY) : bpf_map_delete_elem(bpf_map__fd(s->skel->maps.allow4), &k);
  } else {
    struct egress_allow6 k = {.prefixlen = 32 + e->bits, .proto = (__u8)e->proto, .port_be = htons((unsigned short)e->port)};
    memcpy(k.addr, e->addr, 16);
    r = add ? bpf_map_update_elem(bpf_map__fd(s->skel->maps.allow6), &k, &one, BPF_ANY) : bpf_map_delete_elem(bpf_map__fd(s->skel->maps.allow6), &k);
  }
  return r ? -errno : 0;
}

static void do_allow(int cfd, uid_t peer, char **f, int n, bool add) {
  if (n != 4) return refuse_(cfd, peer, "bad_request", "ALLOW/DENY need: tcp|udp ADDRESS/BITS PORT (0 = any port)");
  struct allow_entry e;
  const char *why = parse_entry(f[1], f[2], f[3], &e);
  if (why) return refuse_(cfd, peer, "bad_request", why);
  int r = map_entry(&sets[S_DOWNLOAD], &e, add);
  if (r == -ENOENT) return refuse_(cfd, peer, "unknown_entry", "no such allowlist entry");
  if (r == -ENOSPC) return refuse_(cfd, peer, "allowlist_full", "the download allowlist is full (32 entries per family)");
  if (r) return refuse_(cfd, peer, "egress_failed", "the allowlist map refused the change");
  char a[INET6_ADDRSTRLEN];
  inet_ntop(e.family, e.addr, a, sizeof a);
  elog("download allowlist: %s %s %s/%u %u", add ? "allow" : "deny", f[1], a, e.bits, e.port);
  say(cfd, "OK %s %s %s/%u %u", add ? "allowed" : "removed", f[1], a, e.bits, e.port);
}

/* `--gateway-egress tcp|udp,ADDRESS/BITS,PORT` (repeatable) or `--gateway-egress none`: turns the gateway
 * set on. NULL or why the value is wrong. */
const char *egress_gateway_option(const char *spec) {
  gateway_on = true;
  if (!strcmp(spec, "none")) return NULL;
  char b[128], *f[3];
  if (snprintf(b, sizeof b, "%s", spec) >= (int)sizeof b) return "--gateway-egress: too long";
  static const char *shape = "--gateway-egress: want tcp|udp,ADDRESS/BITS,PORT or none";
  char *save = NULL;
  int n = 0;
  for (char *t = strtok_r(b, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
    if (n == 3) return shape;
    f[n++] = t;
  }
  if (n != 3) return shape;
  if (n_gateway_allow == EGRESS_ALLOW_MAX) return "--gateway-egress: at most 32 entries";
  const char *why = parse_entry(f[0], f[1], f[2], &gateway_allow[n_gateway_allow]);
  if (why) return why;
  n_gateway_allow++;
  return NULL;
}

bool egress_gateway_enabled(void) { return gateway_on; }

/* ---------- the gateway's own cgroup (issue 13) ---------- */
/* CONFINE: attach the gateway set to the caller's cgroup. The caller is a process of the client uid
 * (handle_conn checked it) and names nothing: the cgroup is read from its pid, the allowlist is ours. A
 * restarted gateway (new cgroup, same path) asks again and the set moves there; the same cgroup again is
 * a no-op. Refused for the root cgroup, the warden's own cgroup and its ancestors (the filter would
 * apply to the warden's subtree, the download helper among it) and anything inside <NAME>/. */
static void do_confine(int cfd, uid_t peer, pid_t pid) {
  if (!enabled) return refuse_(cfd, peer, "egress_off", "the warden runs with --egress off");
  if (!gateway_on) return refuse_(cfd, peer, "gateway_egress_off", "the warden was started without --gateway-egress");
  char rel[PATH_MAX];
  if (pid <= 0 || cgroup_of((unsigned)pid, rel, sizeof rel)) return refuse_(cfd, peer, "peer_gone", "cannot read the caller's cgroup");
  /* The pid was the caller's when it connected; make sure it still is (not a reused pid). */
  if (real_uid_of((unsigned)pid) != (long)peer) return refuse_(cfd, peer, "peer_gone", "the caller's pid changed hands");
  if (!strcmp(rel, "/") || under(own_rel, rel) || under(rel, subtree_rel))
    return refuse_(cfd, peer, "cgroup_refused", "the caller's cgroup is the root, the warden's own or an ancestor, or in the warden's subtree");
  struct eset *s = &sets[S_GATEWAY];
  char path[PATH_MAX];
  if (snprintf(path, sizeof path, "%s%s", cg2_root, rel) >= (int)sizeof path) return refuse_(cfd, peer, "cgroup_refused", "cgroup path too long");
  int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  struct stat st;
  if (fd < 0 || fstat(fd, &st)) {
    if (fd >= 0) close(fd);
    return refuse_(cfd, peer, "peer_gone", "cannot open the caller's cgroup");
  }
  char allow[2048];
  list_allow(s, allow, sizeof allow);
  if (s->cg_fd >= 0 && s->cg_id == (unsigned long long)st.st_ino) {
    close(fd);
    return say(cfd, "OK confined cgroup=%llu path=%s allow=%s already=1", s->cg_id, rel, allow);
  }
  if (s->cg_fd >= 0) close(s->cg_fd);
  s->cg_fd = fd;
  s->cg_id = (unsigned long long)st.st_ino;
  snprintf(s->cg, sizeof s->cg, "%s", path);
  for (int i = 0; i < N_SOCK_PROGS; i++) {
    int r = attach_one(s, i);
    if (r) {
      close(s->cg_fd);
      s->cg_fd = -1;
      s->cg_id = 0;
      s->cg[0] = 0;
      return refuse_(cfd, peer, "confine_failed", "attaching the gateway's programs failed");
    }
  }
  elog("gateway confined: %s (cgroup %llu), allowed: %s", rel, s->cg_id, allow);
  say(cfd, "OK confined cgroup=%llu path=%s allow=%s already=0", s->cg_id, rel, allow);
}

/* ---------- the live probe ---------- */
static void probe_child(const char *procs, int out) {
  int res[4] = {EINVAL, EINVAL, EINVAL, EINVAL};
  int fd = open(procs, O_WRONLY | O_CLOEXEC);
  /* Into the probe cgroup before any socket exists; then no privilege for the attempts themselves. */
  if (fd < 0 || write(fd, "0", 1) != 1 || setgroups(0, NULL) || setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534)) {
    res[0] = -1;
    (void)!write(out, res, sizeof res);
    _exit(1);
  }
  struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(probe_p4), .sin_addr = {htonl(INADDR_LOOPBACK)}};
  int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  res[0] = s < 0 ? errno : connect(s, (struct sockaddr *)&a4, sizeof a4) ? errno : 0;
  struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(probe_p4)};
  a6.sin6_addr.s6_addr[10] = a6.sin6_addr.s6_addr[11] = 0xff; /* ::ffff:127.0.0.1 */
  a6.sin6_addr.s6_addr[12] = 127;
  a6.sin6_addr.s6_addr[15] = 1;
  s = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  res[1] = s < 0 ? errno : connect(s, (struct sockaddr *)&a6, sizeof a6) ? errno : 0;
  if (probe_l6 >= 0) {
    struct sockaddr_in6 l6 = {.sin6_family = AF_INET6, .sin6_port = htons(probe_p6), .sin6_addr = in6addr_loopback};
    s = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    res[2] = s < 0 ? errno : connect(s, (struct sockaddr *)&l6, sizeof l6) ? errno : 0;
  } else {
    res[2] = EPERM; /* no IPv6 loopback on this host: nothing to reach */
  }
  struct sockaddr_in u4 = {.sin_family = AF_INET, .sin_port = htons(probe_pu4), .sin_addr = {htonl(INADDR_LOOPBACK)}};
  s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  res[3] = s < 0 ? errno : sendto(s, "probe", 5, 0, (struct sockaddr *)&u4, sizeof u4) < 0 ? errno : 0;
  (void)!write(out, res, sizeof res);
  _exit(0);
}

static int reached_listeners(void) {
  int n = 0, c;
  char b[16];
  while ((c = accept4(probe_l4, NULL, NULL, SOCK_CLOEXEC)) >= 0) n++, close(c);
  while (probe_l6 >= 0 && (c = accept4(probe_l6, NULL, NULL, SOCK_CLOEXEC)) >= 0) n++, close(c);
  while (recv(probe_u4, b, sizeof b, MSG_DONTWAIT) >= 0) n++;
  return n;
}

static void do_probe(int cfd, uid_t peer) {
  if (!enabled) return refuse_(cfd, peer, "egress_off", "the warden runs with --egress off");
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  (void)reached_listeners(); /* nothing should be queued; clear it so only this probe counts */
  char cg[PATH_MAX], procs[PATH_MAX + 16];
  snprintf(cg, sizeof cg, "%s/probe", workers_dir);
  snprintf(procs, sizeof procs, "%s/cgroup.procs", cg);
  (void)rmdir(cg);
  struct stat st;
  if ((mkdir(cg, 0755) && errno != EEXIST) || stat(cg, &st)) return refuse_(cfd, peer, "probe_failed", "cannot create the probe cgroup");
  memmove(probe_cg_ids + 1, probe_cg_ids, sizeof probe_cg_ids - sizeof *probe_cg_ids);
  probe_cg_ids[0] = (unsigned long long)st.st_ino;
  int p[2];
  if (pipe2(p, O_CLOEXEC)) return refuse_(cfd, peer, "probe_failed", "pipe failed");
  pid_t pid = fork();
  if (pid == 0) {
    close(p[0]);
    probe_child(procs, p[1]);
  }
  close(p[1]);
  int res[4] = {-1, -1, -1, -1};
  struct pollfd pf = {p[0], POLLIN, 0};
  bool got = pid > 0 && poll(&pf, 1, PROBE_TIMEOUT_MS) == 1 && read(p[0], res, sizeof res) == sizeof res;
  close(p[0]);
  if (pid > 0) {
    kill(pid, SIGKILL);
    (void)waitpid(pid, NULL, 0);
  }
  int reached = reached_listeners();
  for (int i = 0; i < 100 && rmdir(cg) && errno == EBUSY; i++) usleep(10000);
  egress_drain(); /* the probe's own deny events are marked probe=1 while its cgroup id is known */
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
  bool ok = got && reached == 0 && res[0] == EPERM && res[1] == EPERM && res[2] == EPERM && res[3] == EPERM;
  char detail[256];
  snprintf(detail, sizeof detail, "tcp4=%s mapped=%s tcp6=%s udp4=%s reached=%d ms=%.3f", got ? errname(res[0]) : "none", got ? errname(res[1]) : "none",
           got ? errname(res[2]) : "none", got ? errname(res[3]) : "none", reached, ms);
  elog("probe %s: %s", ok ? "refused" : "FAILED", detail);
  if (!ok) return say(cfd, "ERR probe_failed %s", detail);
  say(cfd, "OK probe refused=1 %s", detail);
}

bool egress_request(int cfd, uid_t peer, pid_t pid, char **f, int n, bool *keep) {
  if (!strcmp(f[0], "EGRESS_STATUS") && n == 1) do_status(cfd);
  else if (!strcmp(f[0], "CONFINE") && n == 1) do_confine(cfd, peer, pid);
  else if (!strcmp(f[0], "EGRESS_PROBE") && n == 1) do_probe(cfd, peer);
  else if (!strcmp(f[0], "EVENTS") && n == 1) enabled ? do_events(cfd, peer, keep) : refuse_(cfd, peer, "egress_off", "the warden runs with --egress off");
  else if (!strcmp(f[0], "ALLOW") || !strcmp(f[0], "DENY")) {
    if (!enabled) refuse_(cfd, peer, "egress_off", "the warden runs with --egress off");
    else do_allow(cfd, peer, f, n, !strcmp(f[0], "ALLOW"));
  } else return false;
  return true;
}

void egress_before_rmdir(void) {
  if (!enabled) return;
  char probe[PATH_MAX];
  snprintf(probe, sizeof probe, "%s/probe", workers_dir);
  (void)rmdir(probe);
  (void)rmdir(sets[S_DOWNLOAD].cg);
}

static void rm_pins(const char *dir) {
  for (int i = 0; i < N_PROGS; i++) {
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/link_%s_a", dir, PROG_NAME[i]);
    unlink(p);
    snprintf(p, sizeof p, "%s/link_%s_b", dir, PROG_NAME[i]);
    unlink(p);
    snprintf(p, sizeof p, "%s/prog_%s", dir, PROG_NAME[i]);
    unlink(p);
  }
  const char *maps[] = {"allow4", "allow6", "events", "counts"};
  for (size_t i = 0; i < sizeof maps / sizeof *maps; i++) {
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/%s", dir, maps[i]);
    unlink(p);
  }
  rmdir(dir);
}

void egress_after_rmdir(void) {
  if (!enabled) return;
  struct stat st;
  for (int k = 0; k < S_COUNT; k++) {
    if (!sets[k].pins[0]) continue; /* the gateway set without --gateway-egress */
    /* Unpinned only once the cgroup itself is gone: a live cgroup keeps its filter (the gateway's too). */
    if (sets[k].cg[0] && stat(sets[k].cg, &st) == 0) {
      elog("%s still exists: its programs stay attached and pinned", sets[k].cg);
      continue;
    }
    rm_pins(sets[k].pins);
  }
  rmdir(pin_root);
}

int egress_print_tags(void) {
  libbpf_set_print(libbpf_log);
  struct egress_bpf *s = egress_bpf__open_and_load();
  if (!s) return fprintf(stderr, "phantoma-warden: cannot load the embedded BPF object: %s\n", strerror(errno)), 1;
  for (int i = 0; i < N_PROGS; i++) {
    char tag[17];
    if (prog_tag(bpf_program__fd(prog_of(s, i)), tag, NULL)) return egress_bpf__destroy(s), 1;
    printf("%s %s\n", PROG_NAME[i], tag);
  }
  egress_bpf__destroy(s);
  return 0;
}
