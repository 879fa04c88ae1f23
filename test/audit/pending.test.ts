// Pending audit events (src/audit/pending.ts): written by processes that are not the chain's writer, moved
// into the chain by the node at its start.
import t from 'tap';
import { appendFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PENDING_NAME, appendPendingAudit, drainPendingAudit } from '../../src/audit/pending.ts';
import { createAuditLog, tailAuditLog, verifyAuditLog } from '../../src/audit/audit-log.ts';
import type { AuditEvent } from '../../src/audit/audit-events.ts';

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-pending-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));

t.test('events wait in the pending file and go into the chain in order, once', async (t) => {
  const dir = join(tmp, 'a');
  appendPendingAudit(dir, { type: 'update_installed', version: '0.2.0', slot: 'b', signers: 2 });
  appendPendingAudit(dir, { type: 'update_trial', version: '0.2.0', slot: 'b', passed: false, ms: 1200 });
  const log = createAuditLog({ dir, maxFileBytes: 1 << 20 });
  log.append({ type: 'node_started', version: '0.1.0', pid: 1 });
  t.same(drainPendingAudit(dir, (e) => log.append(e)), { recorded: 2, skipped: 0 });
  t.notOk(existsSync(join(dir, PENDING_NAME)), 'the pending file is gone');
  t.same(drainPendingAudit(dir, (e) => log.append(e)), { recorded: 0, skipped: 0 }, 'a second drain records nothing again');
  log.close();
  t.equal(verifyAuditLog(dir).ok, true);
  t.same(tailAuditLog(dir, 3).map((e) => e.type), ['node_started', 'update_installed', 'update_trial']);
});

t.test('an event outside the closed schema is refused when appended, and nothing is written', async (t) => {
  const dir = join(tmp, 'b');
  t.throws(() => appendPendingAudit(dir, { type: 'update_installed', version: '0.2.0', slot: 'b', signers: 2, note: 'free text' } as unknown as AuditEvent), { code: 'audit_event_refused' });
  t.throws(() => appendPendingAudit(dir, { type: 'prompt_seen' } as unknown as AuditEvent), { code: 'audit_event_refused' });
  t.notOk(existsSync(join(dir, PENDING_NAME)));
});

t.test('a torn or forged line is skipped and counted; a drain cut short by a crash is finished first', async (t) => {
  const dir = join(tmp, 'c');
  appendPendingAudit(dir, { type: 'update_rolled_back', from: '0.2.0', to: '0.1.0', manual: false });
  // a crash mid-drain left this behind, then more was appended
  writeFileSync(join(dir, `${PENDING_NAME}.draining`), readFileSync(join(dir, PENDING_NAME)));
  rmSync(join(dir, PENDING_NAME));
  appendPendingAudit(dir, { type: 'update_refused', code: 'update_signature_threshold' });
  appendFileSync(join(dir, PENDING_NAME), JSON.stringify({ type: 'request_served', prompt: 'hello' }) + '\n{"type":"update_tri');
  const seen: string[] = [];
  t.same(drainPendingAudit(dir, (e) => seen.push(e.type)), { recorded: 2, skipped: 2 });
  t.same(seen, ['update_rolled_back', 'update_refused'], 'the interrupted drain first, then the newer events');
  t.notOk(existsSync(join(dir, `${PENDING_NAME}.draining`)));
});
