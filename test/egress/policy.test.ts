// The pure parts of egress verification: status parsing, what counts as "attached as built", the policy
// hash, and egress.mode off (loud, and visible in the hash). No kernel needed; the real thing is in
// filter.test.ts, verify.test.ts and gateway.test.ts.
import t from 'tap';
import { Writable } from 'node:stream';
import { checkGateway, checkStatus, egressPolicyHash, loadExpectedTags } from '../../src/egress/policy.ts';
import { parseStatus, parseEvent, parseWatch, type EgressClient } from '../../src/egress/warden-egress.ts';
import { createEgressMonitor } from '../../src/egress/monitor.ts';
import { createLogger } from '../../src/logger.ts';
import type { AuditEvent } from '../../src/audit/audit-events.ts';
import { checkAuditEvent } from '../../src/audit/audit-events.ts';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const TAGS = { connect4: 'f5e230b70d4ef0c6', connect6: '7a137988e33d1b04', sendmsg4: '953435e19d1b5f1c', sendmsg6: 'd22a4402ec6a7d0f', egress: 'a52aead7a91af791' };
const dir = mkdtempSync(join(tmpdir(), 'phantoma-egress-policy-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const tagsFile = join(dir, 'egress.tags');
writeFileSync(tagsFile, Object.entries(TAGS).map(([k, v]) => `${k} ${v}`).join('\n') + '\n');
const expected = loadExpectedTags(tagsFile);

function statusLine(over: Record<string, string> = {}): string {
  const f: Record<string, string> = { mode: 'enforce', pins: '/sys/fs/bpf/phantoma/x' };
  let id = 10;
  for (const s of ['workers', 'download']) {
    f[`${s}.cgroup`] = String(id++);
    for (const [h, tag] of Object.entries(TAGS)) f[`${s}.${h}`] = `${id++}:${tag}`;
    Object.assign(f, { [`${s}.denied`]: '3', [`${s}.allowed`]: '0', [`${s}.lost`]: '0' });
  }
  Object.assign(f, { 'workers.allow': '0', 'download.allow': '-', gateway: 'off', 'events.sent': '1', 'events.dropped': '0', watch: 'on', 'watch.reported': '0' }, over);
  return Object.entries(f).map(([k, v]) => `${k}=${v}`).join(' ');
}

t.test('loadExpectedTags refuses an incomplete manifest', async (t) => {
  const bad = join(dir, 'bad.tags');
  writeFileSync(bad, 'connect4 f5e230b70d4ef0c6\n');
  t.throws(() => loadExpectedTags(bad), /no tag for connect6/);
});

t.test('checkStatus: as built passes; missing, foreign, failed query, non-empty workers allowlist, mode off fail', async (t) => {
  t.same(checkStatus(parseStatus(statusLine()), expected), []);
  t.match(checkStatus(parseStatus(statusLine({ 'workers.connect4': '-' })), expected), ['workers/connect4: no program attached']);
  t.match(checkStatus(parseStatus(statusLine({ 'download.egress': '99:0123456789abcdef' })), expected), [/download\/egress: attached program tag 0123456789abcdef is not the built/]);
  t.same(checkStatus(parseStatus(statusLine({ 'workers.egress': `99:0123456789abcdef+100:${TAGS.egress}` })), expected), [], 'an extra program next to ours only denies more');
  t.match(checkStatus(parseStatus(statusLine({ 'workers.sendmsg6': 'error:EPERM' })), expected), ['workers/sendmsg6: BPF_PROG_QUERY failed (error:EPERM)']);
  t.match(checkStatus(parseStatus(statusLine({ 'workers.allow': '1' })), expected), [/workers\/ allowlist has 1 entries/]);
  t.match(checkStatus(parseStatus('mode=off'), expected), [/--egress off/]);
  t.throws(() => parseStatus('mode=enforce workers.cgroup=1'), /lacks/);
});

t.test('policy hash: stable, canonical allowlist order, differs by mode, tags and allowlist', async (t) => {
  const a = egressPolicyHash({ mode: 'enforce', expected, downloadAllow: ['tcp:10.0.0.1/32:443', 'udp:10.0.0.2/32:53'] });
  t.equal(a, egressPolicyHash({ mode: 'enforce', expected, downloadAllow: ['udp:10.0.0.2/32:53', 'tcp:10.0.0.1/32:443'] }));
  t.match(a, /^[0-9a-f]{64}$/);
  t.not(a, egressPolicyHash({ mode: 'enforce', expected, downloadAllow: [] }));
  t.not(egressPolicyHash({ mode: 'off' }), egressPolicyHash({ mode: 'enforce', expected, downloadAllow: [] }));
});

t.test('event lines parse; audit events built from them fit the closed schema', async (t) => {
  const d = parseEvent('EVENT ts=5 set=workers hook=connect6 pid=7 comm=node cgroup=1234 proto=tcp dst=fd00:200:1::2 port=443 probe=0')!;
  t.match(d, { set: 'workers', hook: 'connect6', pid: 7, cgroupId: 1234, dst: 'fd00:200:1::2', port: 443, probe: false });
  t.equal(checkAuditEvent({ type: 'egress_denied', set: d.set, hook: d.hook, pid: d.pid, cgroupId: d.cgroupId, proto: d.proto, dst: d.dst, port: d.port, probe: d.probe }, []), undefined);
  const w = parseWatch('AUDIT ts=9 kind=ptrace request=16 pid=8 comm=gdb cgroup=3 target=42 target_is=gateway')!;
  t.match(w, { kind: 'ptrace', request: 16, target: 42, targetIs: 'gateway' });
  t.equal(checkAuditEvent({ type: 'ptrace_detected', kind: w.kind, request: w.request, pid: w.pid, callerCgroupId: w.cgroupId, target: w.target, targetIs: w.targetIs }, []), undefined);
});

t.test('egress.mode off: no warden question, a loud warning at start, the "off" hash, audited', async (t) => {
  const lines: string[] = [];
  const logger = createLogger({ level: 'info', destination: new Writable({ write: (c, _e, cb) => (lines.push(String(c)), cb()) }) });
  const audit: AuditEvent[] = [];
  const client = new Proxy({}, { get: () => () => Promise.reject(new Error('must not be asked')) }) as EgressClient;
  const m = createEgressMonitor({ mode: 'off', client, expected: undefined, checkIntervalMs: 1000, probeIntervalMs: 1000, logger, audit: (e) => audit.push(e) });
  await m.start();
  t.equal(m.ok(), true);
  t.equal(m.policyHash(), egressPolicyHash({ mode: 'off' }));
  t.ok(lines.some((l) => /egress\.mode is \\"off\\"|egress.mode is "off"/.test(l) && /"level":40/.test(l)), 'a warning names it');
  t.match(audit, [{ type: 'egress_state', verified: false, code: 'egress_off' }]);
  m.close();
});

t.test('enforce without the built tags: never verified, says why', async (t) => {
  const client = { status: () => Promise.resolve(parseStatus(statusLine())) } as unknown as EgressClient;
  const m = createEgressMonitor({ mode: 'enforce', client, expected: undefined, expectedError: 'egress.tags missing', checkIntervalMs: 1000, probeIntervalMs: 1000, logger: createLogger({ level: 'silent' }) });
  await m.start();
  t.equal(m.ok(), false);
  t.match(m.reason(), /^egress_tags_missing: egress.tags missing/);
  m.close();
});

t.test('a deny flood from one cgroup: all counted in the metrics, at most 20 a minute in the audit log', async (t) => {
  const { Registry } = await import('prom-client');
  const registry = new Registry();
  let push: ((e: ReturnType<typeof parseEvent> & object) => void) | undefined;
  const client = {
    status: () => Promise.resolve(parseStatus(statusLine())),
    probe: () => Promise.resolve({ refused: true, attempts: {}, reached: 0, ms: 1, detail: '' }),
    events: (cb: (e: never) => void) => {
      push = cb as never;
      return Promise.resolve({ close: () => undefined, closed: new Promise<void>(() => undefined) });
    },
  } as unknown as EgressClient;
  const audit: AuditEvent[] = [];
  const m = createEgressMonitor({ mode: 'enforce', client, expected, checkIntervalMs: 60_000, probeIntervalMs: 60_000, logger: createLogger({ level: 'silent' }), audit: (e) => audit.push(e), registry });
  await m.start();
  t.teardown(() => m.close());
  t.equal(m.ok(), true);
  for (let i = 0; i < 5 && !push; i++) await new Promise((r) => setTimeout(r, 10));
  for (let i = 0; i < 50; i++) push!(parseEvent(`EVENT ts=${i} set=workers hook=connect4 pid=7 comm=x cgroup=77 proto=tcp dst=10.0.0.1 port=80 probe=0`)!);
  push!(parseEvent('EVENT ts=99 set=workers hook=connect4 pid=8 comm=x cgroup=78 proto=tcp dst=10.0.0.1 port=80 probe=0')!);
  push!(parseEvent('EVENT ts=100 set=workers hook=connect4 pid=0 comm=x cgroup=79 proto=tcp dst=127.0.0.1 port=80 probe=1')!);
  t.equal(audit.filter((e) => e.type === 'egress_denied' && e.cgroupId === 77).length, 20, '20 audited for the flooding cgroup');
  t.equal(audit.filter((e) => e.type === 'egress_denied' && e.cgroupId === 78).length, 1, 'another cgroup is not starved');
  t.equal(audit.filter((e) => e.type === 'egress_denied' && e.cgroupId === 79).length, 0, 'probe denies are not audited');
  t.match(await registry.metrics(), /phantoma_egress_denied_total\{set="workers",hook="connect4"\} 51/, 'metrics count every real deny');
});

t.test('checkGateway: the socket programs, as built, on this very cgroup; the gateway allowlist in the hash', async (t) => {
  const sock = (over: Record<string, string> = {}): string => {
    const g: Record<string, string> = { gateway: 'x', 'gateway.cgroup': '42', 'gateway.allow': 'tcp:127.0.0.1/32:8443', 'gateway.denied': '0', 'gateway.allowed': '1', 'gateway.lost': '0' };
    let id = 90;
    for (const h of ['connect4', 'connect6', 'sendmsg4', 'sendmsg6']) g[`gateway.${h}`] = `${id++}:${TAGS[h as keyof typeof TAGS]}`;
    return statusLine({ ...g, ...over });
  };
  const st = parseStatus(sock());
  t.same(st.gateway?.allow, ['tcp:127.0.0.1/32:8443']);
  t.equal(st.gateway?.cgroupId, 42);
  t.same(checkGateway(st, expected, 42), [], 'confined as built');
  t.same(checkGateway(parseStatus(statusLine()), expected, 42), ["the warden runs without --gateway-egress: nothing limits the gateway's own connections"]);
  t.same(checkGateway(parseStatus(sock({ 'gateway.cgroup': '0' })), expected, 42), ['the gateway set is attached to no cgroup yet']);
  t.same(checkGateway(st, expected, 43), ["the gateway set is on cgroup 42, not on this gateway's 43"], 'another cgroup (a gateway before a restart)');
  t.same(checkGateway(parseStatus(sock({ 'gateway.sendmsg6': '-' })), expected, 42), ['gateway/sendmsg6: no program attached']);
  t.match(checkGateway(parseStatus(sock({ 'gateway.connect4': '7:0123456789abcdef' })), expected, 42), [/gateway\/connect4: attached program tag 0123456789abcdef is not the built/]);
  t.throws(() => parseStatus(sock({ 'gateway.connect6': undefined as never }).replace(/ gateway\.connect6=\S+/, '')), { code: 'warden_protocol' }, 'a gateway set without a hook is a protocol error');

  const none = egressPolicyHash({ mode: 'enforce', expected, downloadAllow: [] });
  const g = egressPolicyHash({ mode: 'enforce', expected, downloadAllow: [], gatewayAllow: ['tcp:127.0.0.1/32:8443'] });
  t.not(g, none, 'a confined gateway shows in the hash');
  t.not(g, egressPolicyHash({ mode: 'enforce', expected, downloadAllow: [], gatewayAllow: ['tcp:127.0.0.1/32:9443'] }), 'and so does its allowlist');
  t.equal(none, egressPolicyHash({ mode: 'enforce', expected, downloadAllow: [] }), 'a node without confinement keeps its hash');
});
