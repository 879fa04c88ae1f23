// phantoma_native: the few Linux calls Node has no API for, as a plain N-API addon (no node-addon-api).
//   setDumpable(on)      prctl(PR_SET_DUMPABLE)   — workers and the gateway make themselves non-dumpable
//   isDumpable()         prctl(PR_GET_DUMPABLE)
//   setNoNewPrivs()      prctl(PR_SET_NO_NEW_PRIVS, 1) (one-way)
//   getNoNewPrivs()      prctl(PR_GET_NO_NEW_PRIVS)
//   peerCredentials(fd)  getsockopt(SO_PEERCRED) on a connected unix socket: { pid, uid, gid }
//   peerPidfd(fd)        getsockopt(SO_PEERPIDFD) (Linux >= 6.5): a pidfd for the peer; the caller closes it
//   mallocTrim()         glibc malloc_trim(0): hands freed heap pages back to the kernel; true if any were
//   sdNotify(path, msg)  one datagram to systemd's $NOTIFY_SOCKET (a path, or "@name" in the abstract
//                        namespace), sent by the calling (main) process so NotifyAccess=main accepts it
// Every failure throws an Error whose `code` is the errno name (EBADF, ENOTSOCK, ...), with `errno` and
// `syscall` set, like Node's own system errors.
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <malloc.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

// Throws a system error for `err` and returns NULL, so call sites can `return throw_errno(...)`.
static napi_value throw_errno(napi_env env, int err, const char *syscall) {
  const char *name = strerrorname_np(err);
  char message[256];
  snprintf(message, sizeof message, "%s failed: %s (%s)", syscall, strerror(err), name ? name : "E?");
  napi_value code_v, message_v, error, errno_v, syscall_v;
  if (napi_create_string_utf8(env, name ? name : "EUNKNOWN", NAPI_AUTO_LENGTH, &code_v) != napi_ok ||
      napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &message_v) != napi_ok ||
      napi_create_error(env, code_v, message_v, &error) != napi_ok) {
    napi_throw_error(env, name, message);
    return NULL;
  }
  if (napi_create_int32(env, -err, &errno_v) == napi_ok) napi_set_named_property(env, error, "errno", errno_v);
  if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_v) == napi_ok)
    napi_set_named_property(env, error, "syscall", syscall_v);
  napi_throw(env, error);
  return NULL;
}

#define NAPI_CHECK(env, call)                                             \
  do {                                                                    \
    if ((call) != napi_ok) {                                              \
      bool pending = false;                                               \
      napi_is_exception_pending((env), &pending);                         \
      if (!pending) napi_throw_error((env), "EINTERNAL", "N-API call failed: " #call); \
      return NULL;                                                        \
    }                                                                     \
  } while (0)

static napi_value make_bool(napi_env env, bool value) {
  napi_value v;
  NAPI_CHECK(env, napi_get_boolean(env, value, &v));
  return v;
}

// Reads exactly `want` arguments.
static bool get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return false;
  if (argc < want) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS", "missing argument");
    return false;
  }
  return true;
}

// A file descriptor argument: an integer in [0, INT32_MAX].
static bool get_fd(napi_env env, napi_value value, int *fd) {
  napi_valuetype type;
  double d;
  if (napi_typeof(env, value, &type) != napi_ok || type != napi_number ||
      napi_get_value_double(env, value, &d) != napi_ok || d != (double)(int)d || d < 0) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "fd must be a non-negative integer");
    return false;
  }
  *fd = (int)d;
  return true;
}

static napi_value set_dumpable(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  napi_valuetype type;
  bool on;
  if (napi_typeof(env, argv[0], &type) != napi_ok || type != napi_boolean ||
      napi_get_value_bool(env, argv[0], &on) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "setDumpable takes a boolean");
    return NULL;
  }
  if (prctl(PR_SET_DUMPABLE, on ? 1UL : 0UL, 0UL, 0UL, 0UL) != 0) return throw_errno(env, errno, "prctl(PR_SET_DUMPABLE)");
  return NULL;
}

static napi_value is_dumpable(napi_env env, napi_callback_info info) {
  (void)info;
  int r = prctl(PR_GET_DUMPABLE, 0UL, 0UL, 0UL, 0UL);
  if (r < 0) return throw_errno(env, errno, "prctl(PR_GET_DUMPABLE)");
  return make_bool(env, r != 0);
}

static napi_value set_no_new_privs(napi_env env, napi_callback_info info) {
  (void)info;
  if (prctl(PR_SET_NO_NEW_PRIVS, 1UL, 0UL, 0UL, 0UL) != 0) return throw_errno(env, errno, "prctl(PR_SET_NO_NEW_PRIVS)");
  return NULL;
}

static napi_value get_no_new_privs(napi_env env, napi_callback_info info) {
  (void)info;
  int r = prctl(PR_GET_NO_NEW_PRIVS, 0UL, 0UL, 0UL, 0UL);
  if (r < 0) return throw_errno(env, errno, "prctl(PR_GET_NO_NEW_PRIVS)");
  return make_bool(env, r != 0);
}

static napi_value peer_credentials(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!get_args(env, info, 1, argv) || !get_fd(env, argv[0], &fd)) return NULL;
  struct ucred cred;
  socklen_t len = sizeof cred;
  memset(&cred, 0, sizeof cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return throw_errno(env, errno, "getsockopt(SO_PEERCRED)");
  if (len != sizeof cred) return throw_errno(env, EPROTO, "getsockopt(SO_PEERCRED)");
  // A socket with no peer (listening, or unconnected) reports pid 0 and uid/gid -1: not a credential.
  if (cred.pid <= 0) return throw_errno(env, ENOTCONN, "getsockopt(SO_PEERCRED)");
  napi_value result, pid, uid, gid;
  NAPI_CHECK(env, napi_create_object(env, &result));
  NAPI_CHECK(env, napi_create_int32(env, cred.pid, &pid));
  NAPI_CHECK(env, napi_create_uint32(env, cred.uid, &uid));
  NAPI_CHECK(env, napi_create_uint32(env, cred.gid, &gid));
  NAPI_CHECK(env, napi_set_named_property(env, result, "pid", pid));
  NAPI_CHECK(env, napi_set_named_property(env, result, "uid", uid));
  NAPI_CHECK(env, napi_set_named_property(env, result, "gid", gid));
  return result;
}

static napi_value peer_pidfd(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!get_args(env, info, 1, argv) || !get_fd(env, argv[0], &fd)) return NULL;
  int pidfd = -1;
  socklen_t len = sizeof pidfd;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) != 0) return throw_errno(env, errno, "getsockopt(SO_PEERPIDFD)");
  if (len != sizeof pidfd || pidfd < 0) return throw_errno(env, ENOTCONN, "getsockopt(SO_PEERPIDFD)");
  napi_value result;
  if (napi_create_int32(env, pidfd, &result) != napi_ok) {
    close(pidfd);
    napi_throw_error(env, "EINTERNAL", "napi_create_int32 failed");
    return NULL;
  }
  return result;
}

// A warm worker has freed its loading and warm-up scratch (GGUF parsing, graph planning, the throwaway
// generation) but glibc keeps those pages in its arenas; four idle workers would each hold ~10 MiB of them.
static napi_value malloc_trim_all(napi_env env, napi_callback_info info) {
  (void)info;
  return make_bool(env, malloc_trim(0) != 0);
}

// sd_notify(3) without libsystemd: a SOCK_DGRAM unix socket, one sendto() of the whole state string. The
// kernel attaches our credentials (systemd enables SO_PASSCRED), which is how NotifyAccess=main checks the
// sender. Non-blocking: a full socket buffer is EAGAIN for the caller, never a stalled event loop.
static napi_value sd_notify_send(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!get_args(env, info, 2, argv)) return NULL;
  char path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
  char msg[4096];
  size_t path_len = 0, msg_len = 0;
  if (napi_get_value_string_utf8(env, argv[0], path, sizeof path, &path_len) != napi_ok ||
      napi_get_value_string_utf8(env, argv[1], msg, sizeof msg, &msg_len) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "sdNotify(path, message) takes two strings");
    return NULL;
  }
  struct sockaddr_un addr;
  memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  if (path_len < 2 || path_len >= sizeof addr.sun_path || (path[0] != '/' && path[0] != '@') || msg_len == 0 || msg_len >= sizeof msg - 1)
    return throw_errno(env, EINVAL, "sdNotify");
  memcpy(addr.sun_path, path, path_len);
  if (path[0] == '@') addr.sun_path[0] = '\0';
  socklen_t addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len + (path[0] == '@' ? 0 : 1));
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return throw_errno(env, errno, "socket(AF_UNIX, SOCK_DGRAM)");
  ssize_t sent = sendto(fd, msg, msg_len, MSG_NOSIGNAL, (struct sockaddr *)&addr, addr_len);
  int err = errno;
  close(fd);
  if (sent < 0) return throw_errno(env, err, "sendto(NOTIFY_SOCKET)");
  if ((size_t)sent != msg_len) return throw_errno(env, EMSGSIZE, "sendto(NOTIFY_SOCKET)");
  return make_bool(env, true);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"mallocTrim", NULL, malloc_trim_all, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setDumpable", NULL, set_dumpable, NULL, NULL, NULL, napi_enumerable, NULL},
      {"isDumpable", NULL, is_dumpable, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setNoNewPrivs", NULL, set_no_new_privs, NULL, NULL, NULL, napi_enumerable, NULL},
      {"getNoNewPrivs", NULL, get_no_new_privs, NULL, NULL, NULL, napi_enumerable, NULL},
      {"peerCredentials", NULL, peer_credentials, NULL, NULL, NULL, napi_enumerable, NULL},
      {"peerPidfd", NULL, peer_pidfd, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sdNotify", NULL, sd_notify_send, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  NAPI_CHECK(env, napi_define_properties(env, exports, sizeof props / sizeof props[0], props));
  return exports;
}

NAPI_MODULE_INIT() { return init(env, exports); }
