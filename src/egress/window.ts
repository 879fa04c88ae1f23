// Maintenance windows (issue 10): the only time the download/ cgroup's egress allowlist is not empty.
// `phantoma egress window open --for 30m --allow host:port...` resolves each host HERE (the CLI or the
// gateway: outside any worker cgroup), pins the addresses it got, writes the window (deadline included)
// atomically into the node's state directory BEFORE it asks the warden to allow anything, then sends one
// ALLOW per pinned address. Closing removes every entry of the download allowlist (not only the window's:
// outside a window the list must be empty) and then the file.
// The gateway runs a keeper: at start, before anything else, it closes an expired window (and removes
// stray entries when no window is open); afterwards it checks every second and closes the window at its
// deadline. So a window closes by itself even if the daemon was down when its deadline passed. The keeper
// is the audit writer for windows (the audit log has one writer, the gateway): it records each window's
// opening once (who, what, until) and its closing with the reason.
import { randomBytes } from 'node:crypto';
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { existsSync, readFileSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { writeFileAtomic } from '../util/atomic-file.ts';
import { ERRORS, PhantomaError } from '../errors.ts';
import type { AuditEvent } from '../audit/audit-events.ts';
import type { EgressClient } from './warden-egress.ts';

export const WINDOW_FILE = 'egress-window.json';
/** The longest window one command may open. */
export const MAX_WINDOW_MS = 24 * 3600_000;

export interface AllowEntry {
  proto: 'tcp' | 'udp';
  /** Pinned address as a host prefix: a.b.c.d/32 or x::y/128. */
  cidr: string;
  port: number;
}

export interface WindowTarget {
  /** As given: host:port ([v6]:port). */
  spec: string;
  host: string;
  port: number;
  /** The addresses the host resolved to at window open (the pins). */
  addresses: string[];
}

export interface WindowState {
  v: 1;
  id: string;
  by: string;
  openedAt: number;
  until: number;
  targets: WindowTarget[];
  entries: AllowEntry[];
}

export function windowPath(stateDir: string): string {
  return join(stateDir, WINDOW_FILE);
}

export function readWindow(stateDir: string): WindowState | undefined {
  const p = windowPath(stateDir);
  if (!existsSync(p)) return undefined;
  try {
    const w = JSON.parse(readFileSync(p, 'utf8')) as WindowState;
    if (w.v !== 1 || typeof w.until !== 'number' || !Array.isArray(w.entries)) throw new Error('bad shape');
    return w;
  } catch {
    // Unreadable: treat as expired at once (closing removes every allowlist entry anyway).
    return { v: 1, id: 'unreadable', by: 'unknown', openedAt: 0, until: 0, targets: [], entries: [] };
  }
}

/** "30m", "90s", "2h", "1500ms" -> milliseconds. */
export function parseDuration(s: string): number {
  const m = /^([1-9][0-9]{0,6})(ms|s|m|h)$/.exec(s.trim());
  if (!m) throw new PhantomaError(ERRORS.CLI_USAGE, `"${s.slice(0, 32)}" is not a duration (e.g. 30m, 90s, 2h)`);
  const n = Number(m[1]);
  return n * ({ ms: 1, s: 1000, m: 60_000, h: 3600_000 } as const)[m[2] as 'ms' | 's' | 'm' | 'h'];
}

/** "host:port" or "[v6]:port". */
export function parseTarget(spec: string): { host: string; port: number } {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):([1-9][0-9]{0,4})$/.exec(spec);
  const port = m ? Number(m[3]) : 0;
  if (!m || port > 65535) throw new PhantomaError(ERRORS.CLI_USAGE, `--allow wants host:port or [ipv6]:port, not "${spec.slice(0, 64)}"`);
  const host = m[1] ?? m[2]!;
  if (m[1] && isIP(host) !== 6) throw new PhantomaError(ERRORS.CLI_USAGE, `"${host}" is not an IPv6 address`);
  return { host, port };
}

export type Resolver = (host: string) => Promise<string[]>;

/** The system resolver (honours /etc/hosts), run in the calling process: never inside a worker cgroup. */
export const systemResolver: Resolver = async (host) => (await lookup(host, { all: true, verbatim: true })).map((a) => a.address);

function entryKey(e: AllowEntry): string {
  return `${e.proto}:${e.cidr}:${e.port}`;
}

/** "tcp:10.0.0.2/32:443" (the warden's EGRESS_STATUS form; IPv6 addresses contain colons). */
export function parseAllowEntry(s: string): AllowEntry | undefined {
  const first = s.indexOf(':');
  const last = s.lastIndexOf(':');
  if (first < 0 || last <= first) return undefined;
  const proto = s.slice(0, first);
  const port = Number(s.slice(last + 1));
  if ((proto !== 'tcp' && proto !== 'udp') || !Number.isInteger(port)) return undefined;
  // IPv6 entries come as [addr]/bits
  const cidr = s.slice(first + 1, last).replace(/^\[([^\]]+)\]/, '$1');
  return { proto, cidr, port };
}

export interface OpenWindowOptions {
  egress: EgressClient;
  stateDir: string;
  forMs: number;
  allow: readonly string[];
  by: string;
  resolve?: Resolver;
  now?: () => number;
}

export async function openWindow(o: OpenWindowOptions): Promise<WindowState> {
  const now = o.now ?? Date.now;
  if (!Number.isInteger(o.forMs) || o.forMs < 1000 || o.forMs > MAX_WINDOW_MS) {
    throw new PhantomaError(ERRORS.CLI_USAGE, `a window lasts between 1s and 24h (asked: ${o.forMs} ms)`);
  }
  if (o.allow.length === 0 || o.allow.length > 16) throw new PhantomaError(ERRORS.CLI_USAGE, 'a window needs 1 to 16 --allow host:port');
  const resolve = o.resolve ?? systemResolver;
  const targets: WindowTarget[] = [];
  for (const spec of o.allow) {
    const { host, port } = parseTarget(spec);
    let addresses: string[];
    if (isIP(host)) addresses = [host];
    else {
      try {
        addresses = [...new Set(await resolve(host))].filter((a) => isIP(a) !== 0);
      } catch (err) {
        throw new PhantomaError(ERRORS.EGRESS_WINDOW_RESOLVE, `cannot resolve ${host}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
      }
      if (addresses.length === 0) throw new PhantomaError(ERRORS.EGRESS_WINDOW_RESOLVE, `${host} resolved to no address`);
    }
    targets.push({ spec, host, port, addresses });
  }
  const entries = new Map<string, AllowEntry>();
  for (const t of targets) {
    for (const a of t.addresses) {
      const e: AllowEntry = { proto: 'tcp', cidr: `${a}/${isIP(a) === 6 ? 128 : 32}`, port: t.port };
      entries.set(entryKey(e), e);
    }
  }
  // A window already open is closed first: one window at a time, one deadline.
  if (readWindow(o.stateDir)) await closeWindow({ egress: o.egress, stateDir: o.stateDir });
  const state: WindowState = { v: 1, id: randomBytes(8).toString('hex'), by: o.by, openedAt: now(), until: now() + o.forMs, targets, entries: [...entries.values()] };
  // The deadline is on disk before the first entry is in the kernel: a crash in between leaves a window
  // the keeper will close, never an entry without a deadline.
  writeFileAtomic(windowPath(o.stateDir), JSON.stringify(state, null, 2) + '\n', 0o600);
  try {
    for (const e of state.entries) await o.egress.allow(e.proto, e.cidr, e.port);
  } catch (err) {
    await closeWindow({ egress: o.egress, stateDir: o.stateDir }).catch(() => undefined);
    throw new PhantomaError(ERRORS.EGRESS_WINDOW_FAILED, `the warden refused the window: ${(err as Error).message}`, { cause: err });
  }
  return state;
}

export interface CloseResult {
  /** The window that was open (undefined when none was). */
  window: WindowState | undefined;
  /** Allowlist entries removed from the warden's download set. */
  removed: number;
}

/** Empties the download allowlist (every entry, ours or stray), then removes the window file. */
export async function closeWindow(o: { egress: EgressClient; stateDir: string }): Promise<CloseResult> {
  const window = readWindow(o.stateDir);
  const status = await o.egress.status();
  let removed = 0;
  const wanted = new Map<string, AllowEntry>();
  for (const s of status.downloadAllow ?? []) {
    const e = parseAllowEntry(s);
    if (e) wanted.set(entryKey(e), e);
  }
  for (const e of window?.entries ?? []) wanted.set(entryKey(e), e);
  for (const e of wanted.values()) {
    try {
      await o.egress.deny(e.proto, e.cidr, e.port);
      removed++;
    } catch (err) {
      if ((err as { code?: string }).code !== 'unknown_entry') {
        throw new PhantomaError(ERRORS.EGRESS_WINDOW_FAILED, `the warden did not remove ${entryKey(e)}: ${(err as Error).message}`, { cause: err });
      }
    }
  }
  const after = await o.egress.status();
  if ((after.downloadAllow ?? []).length > 0) throw new PhantomaError(ERRORS.EGRESS_WINDOW_FAILED, `the download allowlist is not empty after closing: ${after.downloadAllow!.join(',')}`);
  try {
    unlinkSync(windowPath(o.stateDir));
  } catch {
    // none
  }
  return { window, removed };
}

function auditAllow(entries: readonly AllowEntry[]): string {
  const s = entries.map((e) => `${e.proto}:${e.cidr}:${e.port}`).join('-');
  return s.length > 1024 ? `${s.slice(0, 1000)}-more` : s || 'none';
}

export function windowOpenedEvent(w: WindowState): AuditEvent {
  return { type: 'egress_window_opened', windowId: w.id, by: w.by.replace(/[^A-Za-z0-9_.:-]/g, '_').slice(0, 64) || 'unknown', untilMs: w.until, allow: auditAllow(w.entries) };
}

const AUDITED_FILE = 'egress-window.audited';

function readAudited(stateDir: string): string | undefined {
  try {
    return readFileSync(join(stateDir, AUDITED_FILE), 'utf8').trim();
  } catch {
    return undefined;
  }
}

export interface WindowKeeper {
  /** One check now: audits a newly seen window, closes an expired one. */
  check(): Promise<void>;
  close(): void;
}

/**
 * The daemon's side. `start` runs the first check before it returns (call it before anything else that
 * uses the network): an expired window is closed, stray entries removed.
 */
export async function startWindowKeeper(o: {
  egress: EgressClient;
  stateDir: string;
  audit: (e: AuditEvent) => void;
  log?: { warn(o: object, m: string): void; info(o: object, m: string): void };
  intervalMs?: number;
  now?: () => number;
}): Promise<WindowKeeper> {
  const now = o.now ?? Date.now;
  let running: Promise<void> | undefined;
  let first = true;
  let seen: string | undefined;
  const once = async (): Promise<void> => {
    const w = readWindow(o.stateDir);
    // A window this keeper saw is gone without the keeper closing it: `window close` (or a new window).
    if (seen && seen !== w?.id) o.audit({ type: 'egress_window_closed', windowId: seen, reason: 'manual', entries: 0 });
    seen = w && w.until > now() ? w.id : undefined;
    // Which window's opening is already in the audit log: its own file, never a rewrite of the window
    // file (that could race with a `window open` writing a new one).
    const audited = w ? readAudited(o.stateDir) === w.id : false;
    if (w && !audited && w.until > now()) {
      o.audit(windowOpenedEvent(w));
      writeFileAtomic(join(o.stateDir, AUDITED_FILE), w.id + '\n', 0o600);
    }
    if (w && w.until <= now()) {
      if (!audited && w.id !== 'unreadable') o.audit(windowOpenedEvent(w));
      const r = await closeWindow(o);
      o.audit({ type: 'egress_window_closed', windowId: w.id, reason: first ? 'expired_at_start' : 'expired', entries: r.removed });
      o.log?.info({ windowId: w.id, removed: r.removed }, 'maintenance window closed at its deadline');
    } else if (!w) {
      const st = await o.egress.status();
      if ((st.downloadAllow ?? []).length > 0) {
        const r = await closeWindow(o);
        o.audit({ type: 'egress_window_closed', windowId: 'none', reason: 'stray_entries', entries: r.removed });
        o.log?.warn({ removed: r.removed }, 'the download allowlist had entries but no window was open: removed');
      }
    }
    first = false;
  };
  const check = (): Promise<void> => (running ??= once().finally(() => (running = undefined)));
  await check();
  const timer = setInterval(() => {
    check().catch((err: unknown) => o.log?.warn({ err: (err as Error).message }, 'window check failed; retrying'));
  }, o.intervalMs ?? 1000);
  timer.unref();
  return { check, close: () => clearInterval(timer) };
}
