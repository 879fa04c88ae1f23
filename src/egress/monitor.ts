// Keeps the gateway's belief about the egress filter honest: at start and every check interval it asks the
// warden for BPF_PROG_QUERY's answer (checkStatus), and at start, periodically and after every failure it
// runs the live probe. Anything wrong — a program missing or not ours, the probe connecting, the warden
// unreachable, (with egress.confineGateway) the gateway's own cgroup not confined — makes the node not
// verified until a full re-verification (status AND probe) succeeds.
// Deny events streamed by the warden go to the audit log and the metrics.
import { Counter, Gauge, type Registry } from 'prom-client';
import type { Logger } from '../logger.ts';
import type { AuditEvent } from '../audit/audit-events.ts';
import { checkGateway, checkStatus, egressPolicyHash, type ExpectedTags } from './policy.ts';
import type { DenyEvent, EgressClient, EgressStatus, EventStream, WatchEvent } from './warden-egress.ts';

export interface EgressMonitorOptions {
  mode: 'enforce' | 'off';
  client: EgressClient;
  /** Tags of the built programs; undefined when they could not be read (then nothing verifies). */
  expected: ExpectedTags | undefined;
  expectedError?: string;
  checkIntervalMs: number;
  probeIntervalMs: number;
  /**
   * egress.confineGateway (issue 13): the gateway's own cgroup must carry the warden's socket programs;
   * the monitor asks for them (CONFINE) whenever they are not on this cgroup, and is not verified
   * without them. ownCgroupId is read each check: a process does not change cgroups, but a test may.
   */
  confineGateway?: { ownCgroupId: () => number };
  logger: Logger;
  audit?: (e: AuditEvent) => void;
  registry?: Registry;
}

export interface EgressMonitor {
  readonly mode: 'enforce' | 'off';
  /** The filter is verified (or mode is off). */
  ok(): boolean;
  /** Why not, for /readyz and errors; undefined when ok. */
  reason(): string | undefined;
  /** Called on every change of ok(). */
  onChange(cb: (ok: boolean) => void): void;
  /** One verification now (status, plus the probe when due or after a failure). */
  check(forceProbe?: boolean): Promise<boolean>;
  lastStatus(): EgressStatus | undefined;
  /** The egress policy hash (mode, program tags, allowlists); see policy.ts. */
  policyHash(): string;
  start(): Promise<void>;
  close(): void;
}

/** Deny events written to the log and the audit log per cgroup and minute; the metrics count all. */
export const DENY_AUDIT_PER_MINUTE = 20;

export function createEgressMonitor(o: EgressMonitorOptions): EgressMonitor {
  const log = o.logger.child({ component: 'egress' });
  let verified = o.mode === 'off';
  let why: string | undefined = o.mode === 'off' ? undefined : 'egress filter not verified yet';
  let status: EgressStatus | undefined;
  let lastProbe = 0;
  let needProbe = true;
  let timer: NodeJS.Timeout | undefined;
  let stream: EventStream | undefined;
  let subscribing = false;
  let closed = false;
  let running: Promise<boolean> | undefined;
  const listeners: Array<(ok: boolean) => void> = [];
  const denied = o.registry
    ? new Counter({ name: 'phantoma_egress_denied_total', help: 'Connections and packets the egress filter refused, by cgroup set and hook (probe excluded)', labelNames: ['set', 'hook'] as const, registers: [o.registry] })
    : undefined;
  const verifiedGauge = o.registry ? new Gauge({ name: 'phantoma_egress_verified', help: '1 when the egress filter is verified by the kernel word and the live probe', registers: [o.registry] }) : undefined;
  const probes = o.registry ? new Counter({ name: 'phantoma_egress_probes_total', help: 'Live egress probes by result', labelNames: ['result'] as const, registers: [o.registry] }) : undefined;
  verifiedGauge?.set(verified ? 1 : 0);

  const set = (ok: boolean, reason: string | undefined): void => {
    const changed = ok !== verified;
    verified = ok;
    why = ok ? undefined : reason;
    verifiedGauge?.set(ok ? 1 : 0);
    if (!changed) return;
    if (ok) log.info({ policyHash: hash() }, 'egress filter verified (kernel program tags and live probe)');
    else log.error({ reason }, 'egress filter NOT verified: no worker starts');
    o.audit?.({ type: 'egress_state', verified: ok, policyHash: hash(), ...(ok ? {} : { code: codeOf(reason) }) });
    for (const l of listeners) l(ok);
  };

  const hash = (): string =>
    egressPolicyHash({
      mode: o.mode,
      ...(o.expected ? { expected: o.expected } : {}),
      downloadAllow: status?.downloadAllow ?? [],
      ...(o.confineGateway ? { gatewayAllow: status?.gateway?.allow ?? [] } : {}),
    });

  // A hostile worker can spin on refused connects: every deny is counted in the metrics, but the log and
  // the audit log take at most DENY_AUDIT_PER_MINUTE per cgroup per minute (then one warning), so a
  // flood cannot fill the disk or rotate the audit history away.
  let window = Math.floor(Date.now() / 60_000);
  const perCgroup = new Map<number, number>();
  const onDeny = (e: DenyEvent): void => {
    if (!e.probe) denied?.inc({ set: e.set, hook: e.hook });
    if (e.probe) return log.debug({ hook: e.hook, dst: e.dst, port: e.port }, 'egress probe denied (expected)');
    const now = Math.floor(Date.now() / 60_000);
    if (now !== window) {
      window = now;
      perCgroup.clear();
    }
    const seen = (perCgroup.get(e.cgroupId) ?? 0) + 1;
    if (perCgroup.size < 10_000 || perCgroup.has(e.cgroupId)) perCgroup.set(e.cgroupId, seen);
    if (seen > DENY_AUDIT_PER_MINUTE) {
      if (seen === DENY_AUDIT_PER_MINUTE + 1) log.warn({ cgroupId: e.cgroupId, set: e.set }, `more than ${DENY_AUDIT_PER_MINUTE} egress denies from one cgroup this minute: further ones are only counted in the metrics`);
      return;
    }
    log.warn({ set: e.set, hook: e.hook, pid: e.pid, comm: e.comm, cgroupId: e.cgroupId, proto: e.proto, dst: e.dst, port: e.port }, 'egress denied');
    o.audit?.({ type: 'egress_denied', set: e.set, hook: e.hook, pid: e.pid, cgroupId: e.cgroupId, proto: e.proto, dst: e.dst === '-' ? 'none' : e.dst, port: e.port, probe: e.probe });
  };

  const watched = o.registry
    ? new Counter({ name: 'phantoma_ptrace_detected_total', help: 'ptrace / process_vm_* calls aimed at a worker or the gateway (detected by tracepoints)', labelNames: ['kind', 'target'] as const, registers: [o.registry] })
    : undefined;
  const onWatch = (e: WatchEvent): void => {
    watched?.inc({ kind: e.kind, target: e.targetIs });
    log.warn({ kind: e.kind, request: e.request, pid: e.pid, comm: e.comm, cgroupId: e.cgroupId, target: e.target, targetIs: e.targetIs }, 'ptrace/process_vm call aimed at a protected process');
    o.audit?.({ type: 'ptrace_detected', kind: e.kind, request: e.request, pid: e.pid, callerCgroupId: e.cgroupId, target: e.target, targetIs: e.targetIs });
  };

  const subscribe = async (): Promise<void> => {
    if (stream || subscribing || closed) return;
    subscribing = true;
    try {
      const s = await o.client.events(onDeny, onWatch);
      if (closed) return s.close();
      stream = s;
      void s.closed.then(() => {
        if (stream === s) stream = undefined;
      });
    } catch (err) {
      log.warn({ err: (err as Error).message }, 'cannot subscribe to egress deny events');
    } finally {
      subscribing = false;
    }
  };

  // Not on our cgroup (first start, a restarted gateway, a restarted warden that does not know us yet):
  // ask, then believe only the kernel's word in a fresh status.
  const ensureConfined = async (ownCgroupId: () => number): Promise<string[]> => {
    try {
      const own = ownCgroupId();
      let reasons = checkGateway(status!, o.expected!, own);
      if (reasons.length === 0 || !status!.gateway) return reasons;
      const r = await o.client.confine();
      log.info({ cgroupId: r.cgroupId, path: r.path, allow: r.allow }, "the gateway's own connections are now limited to the warden's --gateway-egress allowlist");
      status = await o.client.status();
      reasons = checkGateway(status, o.expected!, own);
      return reasons;
    } catch (err) {
      const code = (err as { code?: unknown }).code;
      return [`CONFINE failed${typeof code === 'string' ? ` (${code})` : ''}: ${(err as Error).message}`];
    }
  };

  const once = async (forceProbe: boolean): Promise<boolean> => {
    if (o.mode === 'off') return true;
    if (!o.expected) {
      set(false, `egress_tags_missing: ${o.expectedError ?? 'the built program tags are unknown'}`);
      return false;
    }
    try {
      status = await o.client.status();
    } catch (err) {
      needProbe = true;
      set(false, `warden_unreachable: the warden did not answer the egress status (${(err as Error).message})`);
      return false;
    }
    const reasons = checkStatus(status, o.expected);
    if (reasons.length) {
      needProbe = true;
      set(false, `egress_programs: ${reasons.join('; ')}`);
      return false;
    }
    if (o.confineGateway) {
      const confined = await ensureConfined(o.confineGateway.ownCgroupId);
      if (confined.length) {
        set(false, `gateway_unconfined: ${confined.join('; ')}`);
        return false;
      }
    }
    if (forceProbe || needProbe || Date.now() - lastProbe >= o.probeIntervalMs) {
      try {
        const p = await o.client.probe();
        lastProbe = Date.now();
        probes?.inc({ result: p.refused ? 'refused' : 'reached' });
        if (!p.refused) {
          needProbe = true;
          set(false, `egress_probe: the live probe was not refused (${p.detail})`);
          return false;
        }
        needProbe = false;
      } catch (err) {
        needProbe = true;
        set(false, `egress_probe: the live probe failed (${(err as Error).message})`);
        return false;
      }
    }
    set(true, undefined);
    void subscribe();
    return true;
  };

  const check = (forceProbe = false): Promise<boolean> => {
    running ??= once(forceProbe).finally(() => {
      running = undefined;
    });
    return running;
  };

  return {
    mode: o.mode,
    ok: () => verified,
    reason: () => why,
    onChange: (cb) => void listeners.push(cb),
    check,
    lastStatus: () => status,
    policyHash: hash,
    async start() {
      if (o.mode === 'off') {
        log.warn('!!! egress.mode is "off": workers are NOT behind the kernel egress filter (development only; the policy hash says so) !!!');
        o.audit?.({ type: 'egress_state', verified: false, policyHash: hash(), code: 'egress_off' });
        return;
      }
      await check(true);
      timer = setInterval(() => void check(), o.checkIntervalMs);
      timer.unref();
    },
    close() {
      closed = true;
      clearInterval(timer);
      stream?.close();
    },
  };
}

function codeOf(reason: string | undefined): string {
  return /^([a-z_]+):/.exec(reason ?? '')?.[1] ?? 'egress_unverified';
}
