// Phantoma's egress filter: cgroup BPF programs the warden attaches to <NAME>/workers/ (allowlist always
// empty) and <NAME>/download/ (allowlist filled only during a maintenance window). Every destination not
// in the allowlist is refused: at connect() and sendmsg() time (the caller gets EPERM), and again for
// every packet leaving a socket of the cgroup (cgroup_skb/egress: raw sockets, ping sockets and whatever
// else the socket hooks do not see). Each deny goes to a ring buffer the warden streams to the gateway.
//
// Each cgroup gets its own instance of this object (own maps); the program tags are identical, so the
// gateway compares both against the tags of the object we built.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "egress_event.h"

#define AF_INET_ 2
#define AF_INET6_ 10
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17

struct {
  __uint(type, BPF_MAP_TYPE_LPM_TRIE);
  __uint(map_flags, BPF_F_NO_PREALLOC);
  __uint(max_entries, EGRESS_ALLOW_MAX);
  __type(key, struct egress_allow4);
  __type(value, __u8);
} allow4 SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_LPM_TRIE);
  __uint(map_flags, BPF_F_NO_PREALLOC);
  __uint(max_entries, EGRESS_ALLOW_MAX);
  __type(key, struct egress_allow6);
  __type(value, __u8);
} allow6 SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_RINGBUF);
  __uint(max_entries, 256 * 1024);
} events SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, EGRESS_COUNT_SLOTS);
  __type(key, __u32);
  __type(value, __u64);
} counts SEC(".maps");

static __always_inline void count(__u32 slot) {
  __u64 *c = bpf_map_lookup_elem(&counts, &slot);
  if (c) *c += 1;
}

static __always_inline int allowed4(__u8 proto, __u32 addr_be, __u16 port) {
  struct egress_allow4 k = {.prefixlen = 64, .proto = proto, .port_be = bpf_htons(port)};
  __builtin_memcpy(k.addr, &addr_be, 4);
  if (bpf_map_lookup_elem(&allow4, &k)) return 1;
  k.port_be = 0; /* an entry for any port */
  return bpf_map_lookup_elem(&allow4, &k) != 0;
}

static __always_inline int allowed6(__u8 proto, const __u32 *a, __u16 port) {
  struct egress_allow6 k = {.prefixlen = 160, .proto = proto, .port_be = bpf_htons(port)};
  __builtin_memcpy(k.addr, a, 16);
  if (bpf_map_lookup_elem(&allow6, &k)) return 1;
  k.port_be = 0;
  return bpf_map_lookup_elem(&allow6, &k) != 0;
}

/* ::ffff:a.b.c.d is judged (and reported) as a.b.c.d. */
static __always_inline int is_v4_mapped(const __u32 *a) {
  return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline void report(__u8 hook, __u8 family, __u8 proto, const void *addr, __u16 port, __u64 cgroup_id, int with_task) {
  count(hook * 2 + 1);
  struct egress_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
  if (!e) {
    count(EGRESS_COUNT_LOST);
    return;
  }
  __builtin_memset(e, 0, sizeof(*e));
  e->ts_ns = bpf_ktime_get_ns();
  e->cgroup_id = cgroup_id;
  e->hook = hook;
  e->family = family;
  e->proto = proto;
  e->port = port;
  if (family == AF_INET_) __builtin_memcpy(e->addr, addr, 4);
  else __builtin_memcpy(e->addr, addr, 16);
  if (with_task) {
    e->pid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
  }
  bpf_ringbuf_submit(e, 0);
}

/* Returns 1 (let it through) or 0 (the syscall fails with EPERM). */
static __always_inline int judge4(struct bpf_sock_addr *ctx, __u8 hook) {
  __u8 proto = (__u8)ctx->protocol;
  __u32 addr = ctx->user_ip4;
  __u16 port = bpf_ntohs((__u16)ctx->user_port);
  if (allowed4(proto, addr, port)) {
    count(hook * 2);
    return 1;
  }
  report(hook, AF_INET_, proto, &addr, port, bpf_get_current_cgroup_id(), 1);
  return 0;
}

static __always_inline int judge6(struct bpf_sock_addr *ctx, __u8 hook) {
  __u8 proto = (__u8)ctx->protocol;
  __u32 a[4];
  a[0] = ctx->user_ip6[0];
  a[1] = ctx->user_ip6[1];
  a[2] = ctx->user_ip6[2];
  a[3] = ctx->user_ip6[3];
  __u16 port = bpf_ntohs((__u16)ctx->user_port);
  int ok = is_v4_mapped(a) ? allowed4(proto, a[3], port) : allowed6(proto, a, port);
  if (ok) {
    count(hook * 2);
    return 1;
  }
  if (is_v4_mapped(a)) report(hook, AF_INET_, proto, &a[3], port, bpf_get_current_cgroup_id(), 1);
  else report(hook, AF_INET6_, proto, a, port, bpf_get_current_cgroup_id(), 1);
  return 0;
}

SEC("cgroup/connect4")
int egress_connect4(struct bpf_sock_addr *ctx) { return judge4(ctx, EGRESS_HOOK_CONNECT4); }

SEC("cgroup/connect6")
int egress_connect6(struct bpf_sock_addr *ctx) { return judge6(ctx, EGRESS_HOOK_CONNECT6); }

SEC("cgroup/sendmsg4")
int egress_sendmsg4(struct bpf_sock_addr *ctx) { return judge4(ctx, EGRESS_HOOK_SENDMSG4); }

SEC("cgroup/sendmsg6")
int egress_sendmsg6(struct bpf_sock_addr *ctx) { return judge6(ctx, EGRESS_HOOK_SENDMSG6); }

/* The second layer: every packet a socket of this cgroup sends. TCP and UDP are judged by destination
 * and port; any other protocol (ICMP, raw IP, an IPv6 extension header before the transport header) has
 * port 0 and passes only an any-port entry for that protocol, which ALLOW never creates. */
SEC("cgroup_skb/egress")
int egress_skb(struct __sk_buff *skb) {
  __u8 proto = 0;
  __u16 port = 0;
  if (skb->protocol == bpf_htons(0x0800)) {
    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip))) goto drop_unknown;
    proto = ip.protocol;
    __u32 off = (__u32)ip.ihl * 4;
    __u16 dport_be = 0;
    /* A fragment after the first carries no transport header: judged with port 0. */
    int first = (ip.frag_off & bpf_htons(0x1fff)) == 0;
    if (first && (proto == IPPROTO_TCP_ || proto == IPPROTO_UDP_) && off >= 20 && off <= 60 &&
        bpf_skb_load_bytes(skb, off + 2, &dport_be, 2) == 0)
      port = bpf_ntohs(dport_be);
    if (allowed4(proto, ip.daddr, port)) {
      count(EGRESS_HOOK_SKB * 2);
      return 1;
    }
    report(EGRESS_HOOK_SKB, AF_INET_, proto, &ip.daddr, port, bpf_skb_cgroup_id(skb), 0);
    return 0;
  }
  if (skb->protocol == bpf_htons(0x86DD)) {
    struct ipv6hdr ip6;
    if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6))) goto drop_unknown;
    proto = ip6.nexthdr;
    __u16 dport_be = 0;
    if ((proto == IPPROTO_TCP_ || proto == IPPROTO_UDP_) && bpf_skb_load_bytes(skb, 40 + 2, &dport_be, 2) == 0) port = bpf_ntohs(dport_be);
    __u32 a[4];
    __builtin_memcpy(a, &ip6.daddr, 16);
    if (allowed6(proto, a, port)) {
      count(EGRESS_HOOK_SKB * 2);
      return 1;
    }
    report(EGRESS_HOOK_SKB, AF_INET6_, proto, a, port, bpf_skb_cgroup_id(skb), 0);
    return 0;
  }
drop_unknown : {
  __u8 none[16] = {};
  report(EGRESS_HOOK_SKB, 0, 0, none, 0, bpf_skb_cgroup_id(skb), 0);
  return 0;
}
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
