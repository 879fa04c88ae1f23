// The warden's DOWNLOAD request (issue 10; README.md "DOWNLOAD"). A model pull needs the network, so its
// process runs in the host's network namespace; the wall is the egress filter on <NAME>/download/, whose
// allowlist is empty except during a maintenance window. Everything about the process is fixed by the
// warden's command line, never by the request: the executable (--worker-exec), its interpreter flags
// (--worker-arg), the script (--download-script) and the uid/gid (--download-uid, outside the worker range,
// never 0 or the client). The request names only a fresh cgroup id and the helper's arguments.
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/mount.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sched.h>
#include <unistd.h>

#include "download.h"

#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

#define MAX_DOWNLOADS 4 /* at once */
#define MAX_DL_ARGS 8   /* helper arguments after the script */
#define MAX_DL_ARG 4096
#define DL_SETUP_MS 5000

static const char *DL_ENV[] = {"PATH=/usr/bin:/bin", "HOME=/tmp", "TMPDIR=/tmp", "LANG=C.UTF-8", NULL};

static const char *dl_script, *dl_exec;
static const char *const *dl_pre;
static int dl_npre;
static unsigned long dl_uid; /* 0 = DOWNLOAD disabled */
static char dl_dir[PATH_MAX];
static bool dl_ready;

static struct {
  bool used, reaped;
  char id[17];
  pid_t pid;
} dls[MAX_DOWNLOADS];

static void dlog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void dlog(const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "phantoma-warden: download: %s\n", buf);
}

static void dsay(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void dsay(int fd, const char *fmt, ...) {
  char buf[512];
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

static void drefuse(int fd, uid_t peer, const char *code, const char *msg) {
  dlog("refused code=%s peer_uid=%u: %s", code, (unsigned)peer, msg);
  dsay(fd, "ERR %s %s", code, msg);
}

bool download_set_script(const char *abspath) {
  if (abspath[0] != '/' || strlen(abspath) >= PATH_MAX || strstr(abspath, "/../")) return false;
  dl_script = abspath;
  return true;
}

bool download_set_uid(const char *s) {
  size_t l = strlen(s);
  if (l == 0 || l > 10 || s[0] == '0') return false;
  for (size_t i = 0; i < l; i++)
    if (!isdigit((unsigned char)s[i])) return false;
  unsigned long long v = strtoull(s, NULL, 10);
  if (v == 0 || v >= UINT32_MAX) return false;
  dl_uid = (unsigned long)v;
  return true;
}

const char *download_check(uid_t client_uid, unsigned long uid_lo, unsigned long uid_hi) {
  if (!dl_script && !dl_uid) return NULL;
  if (!dl_script || !dl_uid) return "--download-script and --download-uid go together";
  if (dl_uid == client_uid) return "--download-uid must not be the client uid";
  if (dl_uid >= uid_lo && dl_uid <= uid_hi) return "--download-uid must be outside the worker uid range";
  return NULL;
}

static int dl_path(char *out, const char *id, const char *file) {
  int n = snprintf(out, PATH_MAX, "%s/%s%s%s", dl_dir, id, file ? "/" : "", file ? file : "");
  return n > 0 && n < PATH_MAX ? 0 : -ENAMETOOLONG;
}

/* Kills everything in download/<id> and removes it; true when it is gone. */
static bool dl_remove(const char *id) {
  char p[PATH_MAX];
  if (dl_path(p, id, NULL)) return false;
  if (rmdir(p) == 0 || errno == ENOENT) return true;
  char k[PATH_MAX];
  if (!dl_path(k, id, "cgroup.kill")) {
    int fd = open(k, O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
      (void)!write(fd, "1", 1);
      close(fd);
    }
  }
  return rmdir(p) == 0 || errno == ENOENT;
}

int download_init(const char *download_dir, const char *exec, const char *const *pre_args, int n_pre_args) {
  if (!dl_uid) return 0;
  snprintf(dl_dir, sizeof dl_dir, "%s", download_dir);
  dl_exec = exec;
  dl_pre = pre_args;
  dl_npre = n_pre_args;
  DIR *d = opendir(dl_dir);
  if (!d) return -errno;
  struct dirent *e;
  char names[64][NAME_MAX + 1];
  int n = 0;
  while ((e = readdir(d)) && n < 64)
    if (e->d_type == DT_DIR && strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) snprintf(names[n++], NAME_MAX + 1, "%s", e->d_name);
  closedir(d);
  for (int i = 0; i < n; i++) {
    dlog("removing leftover download cgroup %s/%s", dl_dir, names[i]);
    bool gone = false;
    for (int t = 0; t < 100 && !(gone = dl_remove(names[i])); t++) usleep(20000);
    if (!gone) return -EBUSY;
  }
  dl_ready = true;
  return 0;
}

static void dl_fail(int sync, const char *stage) {
  char b[160];
  int n = snprintf(b, sizeof b, "E%s: %s", stage, strerror(errno));
  if (n > 0) (void)send(sync, b, (size_t)n, MSG_NOSIGNAL);
  _exit(126);
}

static void __attribute__((noreturn)) dl_child(const char *id, char **argv, int conn, int sync) {
  char p[PATH_MAX];
  sigset_t none;
  sigemptyset(&none);
  signal(SIGPIPE, SIG_DFL);
  if (sigprocmask(SIG_SETMASK, &none, NULL)) dl_fail(sync, "sigmask");
  /* 1. Into download/<id> before anything else: every socket this process or its children ever create is
   * born under the download filter. The network namespace stays the host's (by design). */
  int fd = dl_path(p, id, "cgroup.procs") ? -1 : open(p, O_WRONLY | O_CLOEXEC);
  if (fd < 0 || write(fd, "0", 1) != 1) dl_fail(sync, "cgroup join");
  close(fd);
  if (setsid() < 0) dl_fail(sync, "setsid");
  /* 2. Own mount and IPC namespaces: everything read-only, a fresh procfs showing only its own processes,
   * a small private /tmp. The helper writes nothing: the bytes go to stdout, the caller stores them. */
  if (unshare(CLONE_NEWNS | CLONE_NEWIPC)) dl_fail(sync, "unshare");
  if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) dl_fail(sync, "mount private");
  struct mount_attr attr = {.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID};
  if (syscall(SYS_mount_setattr, AT_FDCWD, "/", AT_RECURSIVE, &attr, sizeof attr)) dl_fail(sync, "mount_setattr rdonly");
  if (mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")) dl_fail(sync, "mount proc");
  if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1m,mode=1777")) dl_fail(sync, "mount tmpfs");
  /* 3. Limits, then drop privilege for good (same steps and checks as a worker's). */
  struct rlimit core = {0, 0}, nofile = {256, 256};
  if (setrlimit(RLIMIT_CORE, &core) || setrlimit(RLIMIT_NOFILE, &nofile)) dl_fail(sync, "rlimit");
  umask(077);
  int cap_last = 40;
  {
    char b[16] = {0};
    int c = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
    if (c >= 0 && read(c, b, sizeof b - 1) > 0) cap_last = atoi(b);
    if (c >= 0) close(c);
  }
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)) dl_fail(sync, "ambient");
  for (int c = 0; c <= cap_last; c++)
    if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0)) dl_fail(sync, "capbset");
  uid_t uid = (uid_t)dl_uid;
  gid_t gid = (gid_t)dl_uid;
  if (setgroups(0, NULL) || setresgid(gid, gid, gid) || setresuid(uid, uid, uid)) dl_fail(sync, "setuid");
  struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2];
  if (syscall(SYS_capget, &hdr, data)) dl_fail(sync, "capget");
  for (int i = 0; i < 2; i++)
    if (data[i].effective || data[i].permitted || data[i].inheritable) {
      errno = EPERM;
      dl_fail(sync, "capabilities remain");
    }
  if (getuid() != uid || geteuid() != uid || setuid(0) == 0) {
    errno = EPERM;
    dl_fail(sync, "uid switch");
  }
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) dl_fail(sync, "no_new_privs");
  if (chdir("/tmp")) dl_fail(sync, "chdir");
  /* 4. stdio: the connection is stdin and stdout; stderr is /dev/null. */
  int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
  if (null < 0 || dup2(conn, 0) < 0 || dup2(conn, 1) < 0 || dup2(null, 2) < 0) dl_fail(sync, "stdio");
  if (close_range(3, ~0U, CLOSE_RANGE_CLOEXEC)) dl_fail(sync, "close_range");
  char go;
  if (send(sync, "R", 1, MSG_NOSIGNAL) != 1 || recv(sync, &go, 1, 0) != 1 || go != 'G') _exit(125);
  execve(argv[0], argv, (char **)DL_ENV);
  _exit(127);
}

static bool valid_hex16(const char *s) {
  if (strlen(s) != 16) return false;
  for (int i = 0; i < 16; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
  return true;
}

void download_request(int cfd, uid_t peer, char **f, int n, bool *keep) {
  if (!dl_uid) return drefuse(cfd, peer, "download_off", "the warden runs without --download-script/--download-uid");
  if (!dl_ready) return drefuse(cfd, peer, "egress_off", "downloads need the egress filter (--egress enforce)");
  if (n < 2) return drefuse(cfd, peer, "bad_request", "DOWNLOAD needs an id [args...]");
  if (!valid_hex16(f[1])) return drefuse(cfd, peer, "cgroup_not_allowed", "the download id must be 16 lowercase hex digits");
  if (n - 2 > MAX_DL_ARGS) return drefuse(cfd, peer, "bad_request", "too many arguments");
  for (int i = 2; i < n; i++) {
    size_t l = strlen(f[i]);
    if (l > MAX_DL_ARG) return drefuse(cfd, peer, "bad_request", "an argument is too long");
    for (size_t j = 0; j < l; j++)
      if ((unsigned char)f[i][j] < 0x20 || f[i][j] == 0x7f) return drefuse(cfd, peer, "bad_request", "an argument has a control character");
  }
  int slot = -1;
  for (int i = 0; i < MAX_DOWNLOADS; i++) {
    if (dls[i].used && !strcmp(dls[i].id, f[1])) return drefuse(cfd, peer, "id_in_use", "a download with this id exists");
    if (!dls[i].used && slot < 0) slot = i;
  }
  if (slot < 0) return drefuse(cfd, peer, "too_many_downloads", "at most 4 downloads at once");
  char p[PATH_MAX];
  if (dl_path(p, f[1], NULL) || mkdir(p, 0755)) return drefuse(cfd, peer, errno == EEXIST ? "id_in_use" : "spawn_failed", "could not create the download cgroup");
  struct timeval tv0 = {0, 0};
  int sync[2];
  if (setsockopt(cfd, SOL_SOCKET, SO_RCVTIMEO, &tv0, sizeof tv0) || setsockopt(cfd, SOL_SOCKET, SO_SNDTIMEO, &tv0, sizeof tv0) ||
      socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sync)) {
    (void)dl_remove(f[1]);
    return drefuse(cfd, peer, "spawn_failed", "socket set-up failed");
  }
  char *argv[2 + 8 + MAX_DL_ARGS + 1];
  int a = 0;
  argv[a++] = (char *)dl_exec;
  for (int i = 0; i < dl_npre && i < 8; i++) argv[a++] = (char *)dl_pre[i];
  argv[a++] = (char *)dl_script;
  for (int i = 2; i < n; i++) argv[a++] = f[i];
  argv[a] = NULL;
  pid_t pid = fork();
  if (pid == 0) {
    close(sync[0]);
    dl_child(f[1], argv, cfd, sync[1]);
  }
  close(sync[1]);
  if (pid < 0) {
    close(sync[0]);
    (void)dl_remove(f[1]);
    return drefuse(cfd, peer, "spawn_failed", "fork failed");
  }
  dls[slot].used = true;
  dls[slot].reaped = false;
  dls[slot].pid = pid;
  snprintf(dls[slot].id, sizeof dls[slot].id, "%s", f[1]);
  char msg[160] = {0};
  struct pollfd pfd = {sync[0], POLLIN, 0};
  ssize_t got = poll(&pfd, 1, DL_SETUP_MS) == 1 ? recv(sync[0], msg, sizeof msg - 1, 0) : -1;
  if (got == 1 && msg[0] == 'R') {
    char h[64];
    int hl = snprintf(h, sizeof h, "OK %d\n", (int)pid);
    if (send(cfd, h, (size_t)hl, MSG_NOSIGNAL) == hl && send(sync[0], "G", 1, MSG_NOSIGNAL) == 1) {
      dlog("spawned id=%s pid=%d uid=%lu", f[1], (int)pid, dl_uid);
      close(sync[0]);
      /* The helper holds its own copy of the connection; ours is closed by the caller of handle_conn. */
      (void)keep;
      return;
    }
  }
  close(sync[0]);
  kill(pid, SIGKILL);
  char why[256];
  snprintf(why, sizeof why, "download helper set-up failed (%s)", got > 1 ? msg + 1 : "no answer");
  drefuse(cfd, peer, "spawn_failed", why);
}

void download_reaped(pid_t pid) {
  for (int i = 0; i < MAX_DOWNLOADS; i++) {
    if (!dls[i].used || dls[i].reaped || dls[i].pid != pid) continue;
    dls[i].reaped = true;
    /* The helper lives exactly as long as its main process: the rest of its cgroup goes with it. */
    if (dl_remove(dls[i].id)) dls[i].used = false;
  }
}

void download_tick(void) {
  for (int i = 0; i < MAX_DOWNLOADS; i++)
    if (dls[i].used && dls[i].reaped && dl_remove(dls[i].id)) dls[i].used = false;
}

void download_shutdown(void) {
  for (int i = 0; i < MAX_DOWNLOADS; i++) {
    if (!dls[i].used) continue;
    if (!dls[i].reaped) kill(dls[i].pid, SIGKILL);
    for (int t = 0; t < 100 && !dl_remove(dls[i].id); t++) usleep(20000);
    dls[i].used = false;
  }
}
