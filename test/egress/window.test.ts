// Maintenance window pieces that need no kernel (issue 10): durations, host:port targets, resolution and
// pinning with a resolver the test controls, the audit events' fit to the closed vocabulary. The windows
// themselves, on the real kernel, are in test/models/pull.test.ts.
import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openWindow, parseAllowEntry, parseDuration, parseTarget, readWindow, windowOpenedEvent, windowPath } from '../../src/egress/window.ts';
import { checkAuditEvent } from '../../src/audit/audit-events.ts';
import type { EgressClient } from '../../src/egress/warden-egress.ts';

t.test('durations and targets', async (t) => {
  t.equal(parseDuration('30m'), 1_800_000);
  t.equal(parseDuration('90s'), 90_000);
  t.equal(parseDuration('2h'), 7_200_000);
  t.throws(() => parseDuration('5'), { code: 'cli_usage' });
  t.throws(() => parseDuration('-1m'), { code: 'cli_usage' });
  t.same(parseTarget('models.example:443'), { host: 'models.example', port: 443 });
  t.same(parseTarget('[fd00::2]:8080'), { host: 'fd00::2', port: 8080 });
  t.throws(() => parseTarget('host'), { code: 'cli_usage' });
  t.throws(() => parseTarget('host:0'), { code: 'cli_usage' });
  t.throws(() => parseTarget('host:70000'), { code: 'cli_usage' });
  t.same(parseAllowEntry('tcp:[fd00::2]/128:8080'), { proto: 'tcp', cidr: 'fd00::2/128', port: 8080 });
  t.same(parseAllowEntry('tcp:10.0.0.2/32:443'), { proto: 'tcp', cidr: '10.0.0.2/32', port: 443 });
});

function fakeEgress(): EgressClient & { allowed: string[] } {
  const allowed: string[] = [];
  return {
    allowed,
    status: async () => ({ mode: 'enforce', downloadAllow: [...allowed] }),
    probe: async () => Promise.reject(new Error('no')),
    allow: async (proto, cidr, port) => void allowed.push(`${proto}:${cidr}:${port}`),
    deny: async (proto, cidr, port) => {
      const i = allowed.indexOf(`${proto}:${cidr}:${port}`);
      if (i < 0) throw Object.assign(new Error('unknown'), { code: 'unknown_entry' });
      allowed.splice(i, 1);
    },
    events: async () => Promise.reject(new Error('no')),
    confine: async () => Promise.reject(new Error('no')),
  };
}

t.test('host names are resolved at open and pinned; the deadline is on disk before any ALLOW', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'phantoma-window-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const eg = fakeEgress();
  const realAllow = eg.allow;
  let fileAtAllow = false;
  eg.allow = async (...a) => {
    fileAtAllow = readWindow(dir) !== undefined;
    return realAllow(...a);
  };
  const w = await openWindow({ egress: eg, stateDir: dir, forMs: 60_000, allow: ['mirror.test:443', '[fd00::7]:8443'], by: 'alice', resolve: async (h) => (h === 'mirror.test' ? ['192.0.2.10', '192.0.2.11'] : []) });
  t.ok(fileAtAllow, 'the window file existed when the first entry was allowed');
  t.same(w.targets[0]!.addresses, ['192.0.2.10', '192.0.2.11']);
  t.same(eg.allowed, ['tcp:192.0.2.10/32:443', 'tcp:192.0.2.11/32:443', 'tcp:fd00::7/128:8443']);
  t.equal(readWindow(dir)!.id, w.id);
  const ev = windowOpenedEvent(w);
  t.equal(checkAuditEvent(ev, []), undefined, 'egress_window_opened fits the vocabulary');
  t.match(ev, { by: 'alice', untilMs: w.until, allow: 'tcp:192.0.2.10/32:443-tcp:192.0.2.11/32:443-tcp:fd00::7/128:8443' });
  t.equal(checkAuditEvent({ type: 'egress_window_closed', windowId: w.id, reason: 'expired', entries: 3 }, []), undefined);
  await t.rejects(openWindow({ egress: fakeEgress(), stateDir: dir, forMs: 60_000, allow: ['nowhere.test:443'], by: 'a', resolve: async () => Promise.reject(Object.assign(new Error('x'), { code: 'ENOTFOUND' })) }), { code: 'egress_window_resolve_failed' });
  await t.rejects(openWindow({ egress: fakeEgress(), stateDir: dir, forMs: 25 * 3600_000, allow: ['a.test:1'], by: 'a' }), { code: 'cli_usage' });
});

t.test('an unreadable window file counts as expired', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'phantoma-window-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(windowPath(dir), '{not json');
  t.equal(readWindow(dir)!.until, 0);
});
