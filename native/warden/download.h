// The warden's DOWNLOAD request (issue 10): a fixed download helper (the worker executable running the
// configured --download-script) spawned into <NAME>/download/<id>/ — the cgroup whose egress allowlist a
// maintenance window fills — in the host's network namespace, as the fixed --download-uid, with its
// stdout being the caller's connection. See README.md ("DOWNLOAD").
#ifndef PHANTOMA_WARDEN_DOWNLOAD_H
#define PHANTOMA_WARDEN_DOWNLOAD_H
#include <stdbool.h>
#include <sys/types.h>

/* Command-line options; false when the value is not acceptable. */
bool download_set_script(const char *abspath);
bool download_set_uid(const char *decimal);
/* Checks the options against the rest of the command line: NULL when fine, else why not. */
const char *download_check(uid_t client_uid, unsigned long uid_lo, unsigned long uid_hi);
/* After the egress filter is attached: download_dir is <base>/<NAME>/download (v2). Kills and removes
 * leftover download/<id> cgroups of a crashed warden. 0 or -errno. */
int download_init(const char *download_dir, const char *exec, const char *const *pre_args, int n_pre_args);
/* A request "DOWNLOAD <id> [args...]"; the connection is kept (it is the helper's stdio) on success. */
void download_request(int cfd, uid_t peer, char **f, int n, bool *keep);
/* Called for every reaped child pid. */
void download_reaped(pid_t pid);
/* Periodic: removes the cgroups of ended downloads. */
void download_tick(void);
/* SIGTERM: kills every download and removes its cgroup. */
void download_shutdown(void);

#endif
