// The warden's egress part (issue 9): loads the BPF programs of native/egress-bpf (embedded as a
// skeleton), attaches them to <NAME>/workers and <NAME>/download, pins programs, links and maps, and
// answers the EGRESS_* / ALLOW / DENY / EVENTS requests. See README.md ("Egress").
#ifndef PHANTOMA_WARDEN_EGRESS_H
#define PHANTOMA_WARDEN_EGRESS_H
#include <stdbool.h>
#include <sys/types.h>

/* Loads, attaches and pins; parent is <base>/<NAME>, workers its workers/ dir (v2). 0 or -errno. */
int egress_init(const char *parent, const char *workers, uid_t client_uid);
/* The fd to poll for deny events (-1 when egress is off), and what to call when it is readable. */
int egress_event_fd(void);
void egress_drain(void);
/* Handles the request if it is one of ours (returns true); the connection is kept when *keep is set. */
bool egress_request(int cfd, uid_t peer, char **f, int n, bool *keep);
/* SIGTERM: before the warden removes its cgroups (removes download/), and after (unpins everything
 * when workers/ is gone; pins of a cgroup that still exists stay, so nothing fails open). */
void egress_before_rmdir(void);
void egress_after_rmdir(void);
/* `phantoma-warden --egress-tags`: loads the embedded object (no attach) and prints "<prog> <tag>". */
int egress_print_tags(void);

#endif
