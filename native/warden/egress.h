// The warden's egress part (issue 9): loads the BPF programs of native/egress-bpf (embedded as a
// skeleton), attaches them to <NAME>/workers and <NAME>/download (and, on CONFINE, the socket hooks to
// the gateway's own cgroup), pins programs, links and maps, and answers the EGRESS_* / ALLOW / DENY /
// EVENTS / CONFINE requests. See README.md ("Egress").
#ifndef PHANTOMA_WARDEN_EGRESS_H
#define PHANTOMA_WARDEN_EGRESS_H
#include <stdbool.h>
#include <sys/types.h>

/* Loads, attaches and pins; parent is <base>/<NAME>, workers its workers/ dir (v2). 0 or -errno. */
int egress_init(const char *parent, const char *workers, uid_t client_uid);
/* The fd to poll for deny events (-1 when egress is off), and what to call when it is readable. */
int egress_event_fd(void);
void egress_drain(void);
/* Handles the request if it is one of ours (returns true); the connection is kept when *keep is set.
 * pid is the caller's (SO_PEERCRED): CONFINE filters the cgroup it is in. */
bool egress_request(int cfd, uid_t peer, pid_t pid, char **f, int n, bool *keep);
/* `--gateway-egress SPEC` (before egress_init): NULL, or why SPEC is wrong. */
const char *egress_gateway_option(const char *spec);
bool egress_gateway_enabled(void);
/* SIGTERM: before the warden removes its cgroups (removes download/), and after (unpins everything
 * when workers/ is gone; pins of a cgroup that still exists stay, so nothing fails open). */
void egress_before_rmdir(void);
void egress_after_rmdir(void);
/* `phantoma-warden --egress-tags`: loads the embedded object (no attach) and prints "<prog> <tag>". */
int egress_print_tags(void);

#endif
