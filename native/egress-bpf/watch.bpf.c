// Detection, not prevention (this kernel refuses kprobes, fentry and BPF LSM; tracepoints work): every
// ptrace() (except PTRACE_TRACEME) and process_vm_readv()/writev() call on the host, with caller and target
// pid, goes to a ring buffer; the warden reports those whose target is a worker or the gateway as audit
// events. Attached by the warden through tracefs (it mounts /sys/kernel/tracing when needed).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "egress_event.h"

struct {
  __uint(type, BPF_MAP_TYPE_RINGBUF);
  __uint(max_entries, 64 * 1024);
} watch_events SEC(".maps");

static __always_inline int emit(__u8 kind, __u32 target, __u64 request) {
  __u32 self = bpf_get_current_pid_tgid() >> 32;
  if (target == self) return 0; /* a process reading itself */
  struct watch_event *e = bpf_ringbuf_reserve(&watch_events, sizeof(*e), 0);
  if (!e) return 0;
  __builtin_memset(e, 0, sizeof(*e));
  e->ts_ns = bpf_ktime_get_ns();
  e->cgroup_id = bpf_get_current_cgroup_id();
  e->request = request;
  e->pid = self;
  e->target = target;
  e->kind = kind;
  bpf_get_current_comm(e->comm, sizeof(e->comm));
  bpf_ringbuf_submit(e, 0);
  return 0;
}

SEC("tracepoint/syscalls/sys_enter_ptrace")
int watch_ptrace(struct trace_event_raw_sys_enter *ctx) {
  __u64 request = ctx->args[0];
  if (request == 0) return 0; /* PTRACE_TRACEME names no target */
  return emit(WATCH_PTRACE, (__u32)ctx->args[1], request);
}

SEC("tracepoint/syscalls/sys_enter_process_vm_readv")
int watch_vm_readv(struct trace_event_raw_sys_enter *ctx) { return emit(WATCH_VM_READV, (__u32)ctx->args[0], 0); }

SEC("tracepoint/syscalls/sys_enter_process_vm_writev")
int watch_vm_writev(struct trace_event_raw_sys_enter *ctx) { return emit(WATCH_VM_WRITEV, (__u32)ctx->args[0], 0); }

char LICENSE[] SEC("license") = "Dual MIT/GPL";
