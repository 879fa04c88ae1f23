// The gateway's side of the warden's egress requests (native/warden/README.md, "Egress"): EGRESS_STATUS
// (the kernel's BPF_PROG_QUERY answer per cgroup, with program ids and tags), EGRESS_PROBE (a fixed live
// probe: a child of the warden in workers/probe, host network namespace, must be refused), ALLOW/DENY
// (download/ allowlist only), EVENTS (a stream of deny events, one line each) and CONFINE (the socket
// hooks attached to the caller's own cgroup, with the allowlist the warden was started with: issue 13).
// Same framing as src/ephemeral/warden-client.ts; its own reader, because a status line is longer than
// that client's reply bound and an event stream never ends.
import { connect, type Socket } from 'node:net';
import { createInterface } from 'node:readline';
import { encodeRequest, WardenError } from '../ephemeral/warden-client.ts';

const MAX_LINE = 64 * 1024;
export const HOOKS = ['connect4', 'connect6', 'sendmsg4', 'sendmsg6', 'egress'] as const;
export type Hook = (typeof HOOKS)[number];
/** The hooks of the gateway's set: connect/sendmsg only (an skb program would drop replies to clients). */
export const SOCK_HOOKS = ['connect4', 'connect6', 'sendmsg4', 'sendmsg6'] as const;
export type SockHook = (typeof SOCK_HOOKS)[number];
export const SETS = ['workers', 'download'] as const;
export type EgressSet = (typeof SETS)[number] | 'gateway';

export interface AttachedProgram {
  id: number;
  tag: string;
}

export interface EgressSetStatus {
  /** The cgroup's id (its inode number), as deny events name it. */
  cgroupId: number;
  /** Per hook, every program the kernel reports attached (BPF_PROG_QUERY); an error string if the query failed. */
  programs: Record<Hook, AttachedProgram[] | string>;
  denied: number;
  allowed: number;
  lost: number;
}

/** The gateway's own cgroup (issue 13): attached on CONFINE, allowlist fixed by the warden's command line. */
export interface GatewaySetStatus {
  /** 0 until a gateway asked (CONFINE). */
  cgroupId: number;
  programs: Record<SockHook, AttachedProgram[] | string>;
  /** "proto:addr/bits:port" entries (its control plane). */
  allow: string[];
  denied: number;
  allowed: number;
  lost: number;
}

export interface ConfineResult {
  cgroupId: number;
  /** The cgroup's path below the cgroup2 mount, as the warden read it from the caller's pid. */
  path: string;
  allow: string[];
  /** The cgroup was already confined (nothing attached anew). */
  already: boolean;
}

export interface EgressStatus {
  mode: 'enforce' | 'off';
  pins?: string;
  sets?: Record<(typeof SETS)[number], EgressSetStatus>;
  /** undefined: the warden runs without --gateway-egress. */
  gateway?: GatewaySetStatus;
  /** Entries in workers/' allowlist (must be 0) and download/'s entries as "proto:addr/bits:port". */
  workersAllowCount?: number;
  downloadAllow?: string[];
  eventsSent?: number;
  eventsDropped?: number;
  /** ptrace/process_vm detection attached, and how many it reported. */
  watch?: boolean;
  watchReported?: number;
}

export interface ProbeResult {
  refused: boolean;
  /** errno name (or "connected") per attempt: tcp4, mapped (::ffff:127.0.0.1), tcp6, udp4. */
  attempts: Record<string, string>;
  reached: number;
  ms: number;
  detail: string;
}

export interface DenyEvent {
  ts: bigint;
  set: EgressSet;
  hook: Hook;
  pid: number;
  comm: string;
  cgroupId: number;
  proto: string;
  dst: string;
  port: number;
  /** Caused by the warden's own live probe. */
  probe: boolean;
}

/** A ptrace / process_vm_readv / process_vm_writev call aimed at a worker or the gateway (detection). */
export interface WatchEvent {
  ts: bigint;
  kind: string;
  request: number;
  pid: number;
  comm: string;
  cgroupId: number;
  target: number;
  targetIs: 'worker' | 'gateway';
}

export interface EventStream {
  close(): void;
  readonly closed: Promise<void>;
}

export interface EgressClient {
  status(): Promise<EgressStatus>;
  probe(): Promise<ProbeResult>;
  allow(proto: 'tcp' | 'udp', cidr: string, port: number): Promise<void>;
  deny(proto: 'tcp' | 'udp', cidr: string, port: number): Promise<void>;
  /** Attaches the gateway set to the calling process's own cgroup (the caller must be a gateway). */
  confine(): Promise<ConfineResult>;
  /** Streams deny events (and ptrace/process_vm detections) until close() or the warden goes away. */
  events(onEvent: (e: DenyEvent) => void, onWatch?: (e: WatchEvent) => void): Promise<EventStream>;
}

function kv(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const part of text.split(' ')) {
    const eq = part.indexOf('=');
    if (eq > 0) out.set(part.slice(0, eq), part.slice(eq + 1));
  }
  return out;
}

/** A comma-separated list where "-" (or nothing) means none. */
function listOf(v: string | undefined): string[] {
  return v === undefined || v === '-' ? [] : v.split(',');
}

function parseLine(line: string): string {
  if (line.startsWith('OK')) return line.slice(3);
  const m = /^ERR ([a-z_]+) ?(.*)$/.exec(line);
  if (m) throw new WardenError(m[1]!, m[2] ?? '');
  throw new WardenError('warden_protocol', 'unexpected reply from the warden');
}

export function parseStatus(body: string): EgressStatus {
  const m = kv(body);
  if (m.get('mode') === 'off') return { mode: 'off' };
  if (m.get('mode') !== 'enforce') throw new WardenError('warden_protocol', 'the egress status names no mode');
  const num = (k: string): number => {
    const v = Number(m.get(k));
    if (!Number.isSafeInteger(v)) throw new WardenError('warden_protocol', `the egress status lacks ${k}`);
    return v;
  };
  const programsOf = <H extends Hook>(s: string, hooks: readonly H[]): Record<H, AttachedProgram[] | string> => {
    const programs = {} as Record<H, AttachedProgram[] | string>;
    for (const h of hooks) {
      const v = m.get(`${s}.${h}`);
      if (v === undefined) throw new WardenError('warden_protocol', `the egress status lacks ${s}.${h}`);
      programs[h] = v.startsWith('error:')
        ? v
        : v === '-'
          ? []
          : v.split('+').map((p) => {
              const [id, tag] = p.split(':');
              return { id: Number(id), tag: tag ?? '' };
            });
    }
    return programs;
  };
  const sets = {} as Record<(typeof SETS)[number], EgressSetStatus>;
  for (const s of SETS) {
    sets[s] = { cgroupId: num(`${s}.cgroup`), programs: programsOf(s, HOOKS), denied: num(`${s}.denied`), allowed: num(`${s}.allowed`), lost: num(`${s}.lost`) };
  }
  const gateway: GatewaySetStatus | undefined =
    m.get('gateway') === 'off'
      ? undefined
      : { cgroupId: num('gateway.cgroup'), programs: programsOf('gateway', SOCK_HOOKS), allow: listOf(m.get('gateway.allow')), denied: num('gateway.denied'), allowed: num('gateway.allowed'), lost: num('gateway.lost') };
  return {
    mode: 'enforce',
    pins: m.get('pins') ?? '',
    sets,
    ...(gateway ? { gateway } : {}),
    workersAllowCount: num('workers.allow'),
    downloadAllow: listOf(m.get('download.allow')),
    eventsSent: num('events.sent'),
    eventsDropped: num('events.dropped'),
    watch: m.get('watch') === 'on',
    watchReported: Number(m.get('watch.reported') ?? 0),
  };
}

export function parseProbe(body: string): ProbeResult {
  const m = kv(body);
  const attempts: Record<string, string> = {};
  for (const k of ['tcp4', 'mapped', 'tcp6', 'udp4']) attempts[k] = m.get(k) ?? 'none';
  return { refused: m.get('refused') === '1', attempts, reached: Number(m.get('reached') ?? NaN), ms: Number(m.get('ms') ?? NaN), detail: body };
}

export function parseWatch(line: string): WatchEvent | undefined {
  if (!line.startsWith('AUDIT ')) return undefined;
  const m = kv(line.slice(6));
  return {
    ts: BigInt(m.get('ts') ?? '0'),
    kind: m.get('kind') ?? '?',
    request: Number(m.get('request')),
    pid: Number(m.get('pid')),
    comm: m.get('comm') ?? '-',
    cgroupId: Number(m.get('cgroup')),
    target: Number(m.get('target')),
    targetIs: m.get('target_is') === 'gateway' ? 'gateway' : 'worker',
  };
}

export function parseEvent(line: string): DenyEvent | undefined {
  if (!line.startsWith('EVENT ')) return undefined;
  const m = kv(line.slice(6));
  return {
    ts: BigInt(m.get('ts') ?? '0'),
    set: (m.get('set') ?? 'workers') as EgressSet,
    hook: (m.get('hook') ?? 'egress') as Hook,
    pid: Number(m.get('pid')),
    comm: m.get('comm') ?? '-',
    cgroupId: Number(m.get('cgroup')),
    proto: m.get('proto') ?? '',
    dst: m.get('dst') ?? '',
    port: Number(m.get('port')),
    probe: m.get('probe') === '1',
  };
}

/** One request, one reply line (or, with keep, the socket stays open for what follows). */
function request(socketPath: string, fields: string[], timeoutMs: number): Promise<{ line: string; socket: Socket }> {
  return new Promise((resolve, reject) => {
    const socket = connect({ path: socketPath });
    let buf = '';
    let done = false;
    const finish = (err: Error | undefined, line?: string): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.off('data', onData);
      if (err) {
        socket.destroy();
        reject(err);
      } else {
        socket.pause();
        resolve({ line: line!, socket });
      }
    };
    const timer = setTimeout(() => finish(new WardenError('warden_timeout', `no reply from the warden within ${timeoutMs} ms`)), timeoutMs);
    const onData = (c: Buffer): void => {
      buf += c.toString('utf8');
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        const rest = buf.slice(nl + 1);
        if (rest) socket.unshift(Buffer.from(rest, 'utf8'));
        finish(undefined, buf.slice(0, nl));
      } else if (buf.length > MAX_LINE) finish(new WardenError('warden_protocol', 'the warden reply line is too long'));
    };
    socket.on('data', onData);
    socket.on('error', (err: NodeJS.ErrnoException) => finish(new WardenError('warden_unavailable', `cannot reach the warden at ${socketPath}: ${err.code ?? err.message}`)));
    socket.on('end', () => finish(new WardenError('warden_closed', 'the warden closed the connection without a reply')));
    socket.write(encodeRequest(fields));
  });
}

export function createEgressClient(opts: { socketPath: string; timeoutMs?: number }): EgressClient {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const once = async (fields: string[]): Promise<string> => {
    const { line, socket } = await request(opts.socketPath, fields, timeoutMs);
    socket.destroy();
    return parseLine(line);
  };
  return {
    status: async () => parseStatus(await once(['EGRESS_STATUS'])),
    async probe() {
      try {
        return parseProbe(await once(['EGRESS_PROBE']));
      } catch (err) {
        // A probe that connected is an answer, not a transport failure.
        if (err instanceof WardenError && err.code === 'probe_failed') return { ...parseProbe(err.message), refused: false };
        throw err;
      }
    },
    async allow(proto, cidr, port) {
      await once(['ALLOW', proto, cidr, String(port)]);
    },
    async deny(proto, cidr, port) {
      await once(['DENY', proto, cidr, String(port)]);
    },
    async confine() {
      const m = kv(await once(['CONFINE']));
      return { cgroupId: Number(m.get('cgroup')), path: m.get('path') ?? '', allow: listOf(m.get('allow')), already: m.get('already') === '1' };
    },
    async events(onEvent, onWatch) {
      const { line, socket } = await request(opts.socketPath, ['EVENTS'], timeoutMs);
      try {
        parseLine(line);
      } catch (e) {
        socket.destroy();
        throw e;
      }
      socket.on('error', () => undefined);
      const closed = new Promise<void>((r) => socket.once('close', () => r()));
      const rl = createInterface({ input: socket });
      rl.on('line', (l) => {
        const e = parseEvent(l);
        if (e) return onEvent(e);
        const w = parseWatch(l);
        if (w) onWatch?.(w);
      });
      socket.resume();
      return { close: () => socket.destroy(), closed };
    },
  };
}
