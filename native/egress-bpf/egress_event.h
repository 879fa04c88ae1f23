/* Shared between the BPF programs (egress.bpf.c) and the warden's loader (native/warden/egress.c).
 * Plain fixed-width types only: this header is included both after vmlinux.h and after <linux/types.h>. */
#ifndef PHANTOMA_EGRESS_EVENT_H
#define PHANTOMA_EGRESS_EVENT_H

/* Which hook denied (event.hook, and the index into the counters). */
#define EGRESS_HOOK_CONNECT4 0
#define EGRESS_HOOK_CONNECT6 1
#define EGRESS_HOOK_SENDMSG4 2
#define EGRESS_HOOK_SENDMSG6 3
#define EGRESS_HOOK_SKB 4
#define EGRESS_HOOK_COUNT 5

/* counts[] (a per-CPU array): hook * 2 + verdict, verdict 0 = allowed, 1 = denied; then one slot for
 * deny events lost because the ring buffer was full. */
#define EGRESS_COUNT_SLOTS (EGRESS_HOOK_COUNT * 2 + 1)
#define EGRESS_COUNT_LOST (EGRESS_HOOK_COUNT * 2)

#define EGRESS_ALLOW_MAX 32 /* entries per family and cgroup (only download/ ever has any) */

/* One deny. addr holds 4 bytes (family 2) or 16 (family 10), network order; port in host order. An
 * IPv4-mapped IPv6 destination is reported (and judged) as the IPv4 address it carries. */
struct egress_event {
  __u64 ts_ns;     /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
  __u64 cgroup_id; /* the cgroup's inode number: of the current task, or of the sending socket (skb) */
  __u32 pid;       /* tgid; 0 for the skb hook (packets may leave in softirq context) */
  __u16 port;
  __u8 hook;
  __u8 family;
  __u8 proto; /* IPPROTO_* of the socket or the packet */
  __u8 pad[3];
  __u8 addr[16];
  char comm[16]; /* empty for the skb hook */
};

/* Allowlist keys for the LPM tries: the data after prefixlen is proto, 0, port (network order), then
 * the address, so a key's prefixlen is 32 + the CIDR bits and lookups use proto+port exactly. Port 0
 * in an entry means any port (looked up second). */
struct egress_allow4 {
  __u32 prefixlen;
  __u8 proto;
  __u8 zero;
  __u16 port_be;
  __u8 addr[4];
};

struct egress_allow6 {
  __u32 prefixlen;
  __u8 proto;
  __u8 zero;
  __u16 port_be;
  __u8 addr[16];
};

/* watch.bpf.c: a ptrace or process_vm_readv/writev call (detection only; the warden reports those aimed
 * at a worker or the gateway). */
#define WATCH_PTRACE 1
#define WATCH_VM_READV 2
#define WATCH_VM_WRITEV 3

struct watch_event {
  __u64 ts_ns;
  __u64 cgroup_id; /* the caller's */
  __u64 request;   /* ptrace request; 0 for process_vm_* */
  __u32 pid;       /* the caller's tgid */
  __u32 target;    /* the pid argument */
  __u8 kind;
  __u8 pad[7];
  char comm[16];
};

#endif
