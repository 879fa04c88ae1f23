import t from 'tap';
import { mkdtempSync, rmSync, readFileSync, writeFileSync, readdirSync, unlinkSync, existsSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createAuditLog, verifyAuditLog, tailAuditLog, AUDIT_CHAIN_BROKEN, AUDIT_EVENT_REFUSED, entryHash, canonicalJson, GENESIS, type AuditLog } from '../../src/audit/audit-log.ts';
import { AUDIT_EVENTS, ENTRY_FIELDS, type AuditEvent } from '../../src/audit/audit-events.ts';
import { auditCommand } from '../../src/cli/audit.ts';
import type { CommandContext } from '../../src/cli/main.ts';
import { ERRORS, PhantomaError } from '../../src/errors.ts';

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'phantoma-audit-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function fakeClock(): () => Date {
  let ms = Date.parse('2025-01-01T00:00:00Z');
  return () => new Date((ms += 1000));
}

let counter = 0;
function event(i = counter++): AuditEvent {
  switch (i % 4) {
    case 0:
      return { type: 'worker_spawned', workerId: `w-${i}`, model: 'tiny', backend: 'process' };
    case 1:
      return { type: 'request_served', requestId: `req_${i}`, model: 'tiny', durationMs: 12.5, promptTokens: 7, completionTokens: 32, outcome: 'ok' };
    case 2:
      return { type: 'end_verification', workerId: `w-${i}`, verified: true, ms: 1.25 };
    default:
      return { type: 'refusal', code: 'invalid_api_key', route: '/v1/chat/completions' };
  }
}

function open(dir: string, opts: { maxFileBytes?: number; maxFiles?: number } = {}): AuditLog {
  return createAuditLog({ dir, clock: fakeClock(), maxFileBytes: opts.maxFileBytes ?? 1 << 20, ...(opts.maxFiles === undefined ? {} : { maxFiles: opts.maxFiles }) });
}

function lines(path: string): string[] {
  return readFileSync(path, 'utf8').split('\n').slice(0, -1);
}

/** A log spread over audit.log.3 (oldest) … audit.log, about 6 entries a file. */
function rotatedLog(t: { teardown(fn: () => void): void }): { dir: string; files: string[] } {
  const dir = tempDir(t);
  const log = open(dir, { maxFileBytes: 1800, maxFiles: 5 });
  for (let i = 0; i < 22; i++) log.append(event(i));
  log.close();
  const files = readdirSync(dir).sort();
  return { dir, files };
}

t.test('the schema is closed and has no room for content', async (t) => {
  for (const [type, fields] of Object.entries(AUDIT_EVENTS)) {
    for (const [name, spec] of Object.entries(fields)) {
      t.notOk((ENTRY_FIELDS as readonly string[]).includes(name), `${type}.${name} is not a reserved entry name`);
      t.notMatch(name, /prompt$|content|message|text|body|header|url/i, `${type}.${name} does not look like content`);
      t.ok(['id', 'route', 'int', 'number', 'boolean'].includes(spec.kind), `${type}.${name} has a closed kind`);
    }
  }
});

t.test('appends form a hash chain that verifies', async (t) => {
  const dir = tempDir(t);
  const log = open(dir);
  const written = [];
  for (let i = 0; i < 8; i++) written.push(log.append(event(i)));
  t.equal(written[0]!.seq, 1);
  t.equal(written[0]!.prev, GENESIS, 'the first entry is anchored at genesis');
  for (let i = 1; i < written.length; i++) {
    t.equal(written[i]!.seq, i + 1);
    t.equal(written[i]!.prev, written[i - 1]!.hash, `entry ${i + 1} links to entry ${i}`);
  }
  const onDisk = lines(join(dir, 'audit.log')).map((l) => JSON.parse(l) as Record<string, unknown>);
  t.equal(onDisk.length, 8);
  t.same(Object.keys(onDisk[1]!), ['seq', 'time', 'type', 'requestId', 'model', 'durationMs', 'promptTokens', 'completionTokens', 'outcome', 'prev', 'hash'], 'fields in a readable order');
  t.equal(onDisk[1]!.time, '2025-01-01T00:00:02.000Z');
  for (const e of onDisk) t.equal(entryHash(e), e.hash, `seq ${String(e.seq)}: hash is SHA-256 of the canonical entry`);
  t.equal(canonicalJson({ b: 1, a: { d: [2, { f: 1, e: 0 }], c: 'x' } }), '{"a":{"c":"x","d":[2,{"e":0,"f":1}]},"b":1}', 'canonical JSON sorts keys at every level');
  const r = log.verify();
  t.ok(r.ok, JSON.stringify(r.problem));
  t.equal(r.entries, 8);
  t.same(r.anchor, { file: 'audit.log', seq: 1, prev: GENESIS, genesis: true });
  t.same(r.head, { seq: 8, hash: written[7]!.hash });
  t.same(log.head(), r.head);
  t.equal(statSync(join(dir, 'audit.log')).mode & 0o777, 0o600, 'the log is private to the node user');
  log.close();
});

t.test('rotation carries the chain across files and deletes the oldest beyond maxFiles', async (t) => {
  const dir = tempDir(t);
  const log = open(dir, { maxFileBytes: 1400, maxFiles: 3 });
  const written = [];
  for (let i = 0; i < 40; i++) written.push(log.append(event(i)));
  const files = readdirSync(dir).sort();
  t.same(files, ['audit.log', 'audit.log.1', 'audit.log.2', 'audit.log.3'], 'three rotated files are kept');
  for (const f of files) t.ok(statSync(join(dir, f)).size <= 1400, `${f} is within maxFileBytes`);
  const firstOfCurrent = JSON.parse(lines(join(dir, 'audit.log'))[0]!) as { prev: string; seq: number };
  const lastOfPrevious = JSON.parse(lines(join(dir, 'audit.log.1')).at(-1)!) as { hash: string; seq: number };
  t.equal(firstOfCurrent.prev, lastOfPrevious.hash, "the new file's first prev is the previous file's last hash");
  t.equal(firstOfCurrent.seq, lastOfPrevious.seq + 1);
  const r = log.verify();
  t.ok(r.ok, JSON.stringify(r.problem));
  t.same(r.files.map((f) => f.file), ['audit.log.3', 'audit.log.2', 'audit.log.1', 'audit.log'], 'walked oldest to newest');
  t.equal(r.anchor?.genesis, false, 'the oldest files were rotated away: the anchor is not genesis');
  t.equal(r.anchor?.file, 'audit.log.3');
  const anchorSeq = r.anchor!.seq;
  t.ok(anchorSeq > 1);
  t.equal(r.anchor?.prev, written[anchorSeq - 2]!.hash, 'the anchor is the hash of the last deleted entry');
  t.equal(r.entries, 40 - anchorSeq + 1);
  t.same(r.head, { seq: 40, hash: written[39]!.hash });
  log.close();
});

t.test('tail returns the last N entries across files, oldest first', async (t) => {
  const { dir } = rotatedLog(t);
  const log = open(dir, { maxFileBytes: 1800, maxFiles: 5 });
  const current = lines(join(dir, 'audit.log')).length;
  const n = current + 3;
  const tail = log.tail(n);
  t.equal(tail.length, n);
  t.same(tail.map((e) => e.seq), Array.from({ length: n }, (_, i) => 22 - n + 1 + i), 'consecutive, ending at the head');
  t.same(log.tail(0), []);
  t.equal(log.tail(1000).length, 22, 'asking for more than there is returns everything');
  t.equal(log.tail(1)[0]!.type, event(21).type);
  log.close();
});

t.test('reopening continues the chain', async (t) => {
  const dir = tempDir(t);
  let log = open(dir);
  for (let i = 0; i < 3; i++) log.append(event(i));
  const head = log.head()!;
  log.close();
  log = open(dir);
  t.same(log.head(), head, 'the head is read back from the file');
  const next = log.append(event(3));
  t.equal(next.seq, 4);
  t.equal(next.prev, head.hash);
  t.ok(log.verify().ok);
  log.close();

  // right after a rotation audit.log is empty; after a crash between rename and create it is missing
  const r = rotatedLog(t);
  writeFileSync(join(r.dir, 'audit.log'), '');
  log = open(r.dir, { maxFileBytes: 1800, maxFiles: 5 });
  const afterEmpty = log.append(event(0));
  log.close();
  const lastOfOne = JSON.parse(lines(join(r.dir, 'audit.log.1')).at(-1)!) as { hash: string; seq: number };
  t.equal(afterEmpty.prev, lastOfOne.hash, 'an empty current file continues from audit.log.1');
  t.equal(afterEmpty.seq, lastOfOne.seq + 1);
  t.ok(verifyAuditLog(r.dir).ok);

  const r2 = rotatedLog(t);
  unlinkSync(join(r2.dir, 'audit.log'));
  log = open(r2.dir, { maxFileBytes: 1800, maxFiles: 5 });
  t.ok(existsSync(join(r2.dir, 'audit.log')), 'a missing current file is created');
  const afterMissing = log.append(event(0));
  log.close();
  t.equal(afterMissing.prev, (JSON.parse(lines(join(r2.dir, 'audit.log.1')).at(-1)!) as { hash: string }).hash);
  t.ok(verifyAuditLog(r2.dir).ok);
});

// Each tamper: what to do to a rotated log, and which file and line verify must name.
const tampers: Array<[string, (dir: string) => { file: string; line: number; reason: RegExp }]> = [
  [
    'an edited field',
    (dir) => {
      const path = join(dir, 'audit.log.2');
      const ls = lines(path);
      const i = ls.findIndex((l) => l.includes('"completionTokens":32'));
      ls[i] = ls[i]!.replace('"completionTokens":32', '"completionTokens":33');
      writeFileSync(path, ls.join('\n') + '\n');
      return { file: 'audit.log.2', line: i + 1, reason: /hash does not match.*edited/ };
    },
  ],
  [
    'a deleted line',
    (dir) => {
      const path = join(dir, 'audit.log.1');
      const ls = lines(path);
      ls.splice(2, 1);
      writeFileSync(path, ls.join('\n') + '\n');
      return { file: 'audit.log.1', line: 3, reason: /removed/ };
    },
  ],
  [
    'two swapped lines',
    (dir) => {
      const path = join(dir, 'audit.log.3');
      const ls = lines(path);
      [ls[1], ls[2]] = [ls[2]!, ls[1]!];
      writeFileSync(path, ls.join('\n') + '\n');
      return { file: 'audit.log.3', line: 2, reason: /removed or reordered/ };
    },
  ],
  [
    'a truncated last line',
    (dir) => {
      const path = join(dir, 'audit.log');
      const text = readFileSync(path, 'utf8');
      writeFileSync(path, text.slice(0, -20));
      return { file: 'audit.log', line: lines(path).length + 1, reason: /truncated/ };
    },
  ],
  [
    'a garbled last line that still ends in a newline',
    (dir) => {
      const path = join(dir, 'audit.log');
      const ls = lines(path);
      ls[ls.length - 1] = ls.at(-1)!.slice(0, 30);
      writeFileSync(path, ls.join('\n') + '\n');
      return { file: 'audit.log', line: ls.length, reason: /not valid JSON/ };
    },
  ],
  [
    'a file removed from the middle',
    (dir) => {
      unlinkSync(join(dir, 'audit.log.2'));
      return { file: 'audit.log.1', line: 1, reason: /across files: audit\.log\.3 ends at seq \d+; audit\.log\.2 missing/ };
    },
  ],
  [
    'a line inserted with a valid hash of its own',
    (dir) => {
      const path = join(dir, 'audit.log.1');
      const ls = lines(path);
      const forged: Record<string, unknown> = { ...(JSON.parse(ls[1]!) as Record<string, unknown>), outcome: 'forged' };
      forged.hash = entryHash(forged);
      ls.splice(2, 0, JSON.stringify(forged));
      writeFileSync(path, ls.join('\n') + '\n');
      return { file: 'audit.log.1', line: 3, reason: /out of order|removed or reordered|prev does not match/ };
    },
  ],
];

for (const [name, tamper] of tampers) {
  t.test(`verify detects ${name} and names the file and line`, async (t) => {
    const { dir, files } = rotatedLog(t);
    t.same(files, ['audit.log', 'audit.log.1', 'audit.log.2', 'audit.log.3'], 'fixture has four files');
    t.ok(verifyAuditLog(dir).ok, 'the untouched log verifies');
    const expected = tamper(dir);
    const r = verifyAuditLog(dir);
    t.notOk(r.ok);
    t.equal(r.problem?.file, expected.file);
    t.equal(r.problem?.line, expected.line);
    t.match(r.problem?.reason, expected.reason);
  });
}

t.test('opening a log with a damaged tail refuses, naming the line', async (t) => {
  const { dir } = rotatedLog(t);
  const path = join(dir, 'audit.log');
  writeFileSync(path, readFileSync(path, 'utf8').slice(0, -5));
  const n = lines(path).length + 1;
  t.throws(() => open(dir), { code: AUDIT_CHAIN_BROKEN.code, message: new RegExp(`audit\\.log line ${n}: the last line is truncated`) });
  t.throws(() => tailAuditLog(dir, 3), { code: AUDIT_CHAIN_BROKEN.code, message: /audit\.log line \d+: the last line is truncated/ });
  t.equal(tailAuditLog(dir, 0).length, 0);
});

t.test('append refuses unknown types, unknown fields and bad values, and writes nothing', async (t) => {
  const dir = tempDir(t);
  const log = open(dir);
  log.append(event(0));
  const before = readFileSync(join(dir, 'audit.log'), 'utf8');
  const secret = 'tell me the launch codes';
  const refused: Array<[string, unknown, RegExp]> = [
    ['unknown type', { type: 'prompt_logged', workerId: 'w1' }, /unknown audit event type "prompt_logged"/],
    ['content-like field', { type: 'refusal', code: 'x', prompt: secret }, /has no field "prompt"; the schema is closed/],
    ['content in an id field', { type: 'refusal', code: secret }, /field code of audit event refusal must be 1-64 characters/],
    ['newline in an id field', { type: 'refusal', code: 'a\nb' }, /must be 1-64 characters/],
    ['over-long id', { type: 'worker_spawned', workerId: 'w'.repeat(129), model: 'm', backend: 'process' }, /workerId .* 1-128/],
    ['empty id', { type: 'worker_spawned', workerId: '', model: 'm', backend: 'process' }, /workerId/],
    ['slash outside a route', { type: 'worker_spawned', workerId: 'a/b', model: 'm', backend: 'process' }, /workerId/],
    ['NaN', { type: 'end_verification', workerId: 'w', verified: true, ms: Number.NaN }, /ms .* finite/],
    ['Infinity', { type: 'worker_ended', workerId: 'w', outcome: 'ok', verified: true, endMs: Infinity }, /endMs .* finite/],
    ['fractional token count', { ...event(1), promptTokens: 1.5 }, /promptTokens .* integer/],
    ['string number', { ...event(1), durationMs: '12' }, /durationMs .* number/],
    ['missing field', { type: 'node_stopped' }, /missing required field reason/],
    ['boolean as string', { type: 'end_verification', workerId: 'w', verified: 'yes', ms: 1 }, /verified .* boolean/],
    ['reserved name', { type: 'node_stopped', reason: 'sigterm', hash: GENESIS }, /has no field "hash"/],
    ['not an object', 'hello', /must be an object/],
  ];
  for (const [what, ev, message] of refused) {
    let caught: unknown;
    try {
      log.append(ev as AuditEvent);
    } catch (err) {
      caught = err;
    }
    t.ok(caught instanceof PhantomaError, `${what}: refused with a PhantomaError`);
    t.equal((caught as PhantomaError).code, AUDIT_EVENT_REFUSED.code);
    t.match((caught as Error).message, message, `${what}: says why`);
    t.notMatch((caught as Error).message, /launch codes/, `${what}: the message never echoes the value`);
  }
  t.equal(readFileSync(join(dir, 'audit.log'), 'utf8'), before, 'nothing was written');
  const ok = log.append({ type: 'request_served', requestId: 'r1', model: 'tiny', durationMs: 3, promptTokens: 1, completionTokens: 2, outcome: 'error', code: undefined });
  t.notOk('code' in ok, 'an undefined optional field is omitted');
  t.equal(ok.seq, 2, 'refusals did not consume sequence numbers');
  t.ok(log.verify().ok);
  log.close();
  t.throws(() => log.append(event(0)), /closed/);
});

function fakeCtx(stateDir: string, json: boolean): { ctx: CommandContext; out: string[]; err: string[] } {
  const out: string[] = [];
  const err: string[] = [];
  const ctx = { args: [], json, out: (s: string) => out.push(s), err: (s: string) => err.push(s), config: () => ({ stateDir }) } as unknown as CommandContext;
  return { ctx, out, err };
}

t.test('phantoma audit verify|tail', async (t) => {
  const stateDir = tempDir(t);
  const dir = join(stateDir, 'audit');
  {
    const { ctx, out } = fakeCtx(stateDir, false);
    t.equal(await auditCommand.run(ctx, { values: {}, positionals: ['verify'] }), 0, 'no log yet: nothing to verify');
    t.match(out.join('\n'), /no audit entries/);
  }
  const log = open(dir, { maxFileBytes: 1800, maxFiles: 5 });
  for (let i = 0; i < 22; i++) log.append(event(i));
  log.close();

  {
    const { ctx, out } = fakeCtx(stateDir, true);
    t.equal(await auditCommand.run(ctx, { values: { json: true }, positionals: ['verify'] }), 0);
    const r = JSON.parse(out.join('')) as { ok: boolean; entries: number; anchor: { genesis: boolean } };
    t.ok(r.ok);
    t.equal(r.entries, 22);
    t.equal(r.anchor.genesis, true);
  }
  {
    const { ctx, out } = fakeCtx(stateDir, false);
    t.equal(await auditCommand.run(ctx, { values: {}, positionals: ['verify'] }), 0);
    t.match(out.join('\n'), /audit log verified: 22 entries in 4 file\(s\).*genesis.*head seq 22/);
  }
  {
    const { ctx, out } = fakeCtx(stateDir, true);
    t.equal(await auditCommand.run(ctx, { values: { json: true, lines: '3' }, positionals: ['tail'] }), 0);
    const entries = JSON.parse(out.join('')) as Array<{ seq: number }>;
    t.same(entries.map((e) => e.seq), [20, 21, 22]);
  }
  {
    const { ctx, out } = fakeCtx(stateDir, false);
    t.equal(await auditCommand.run(ctx, { values: { lines: '2' }, positionals: ['tail'] }), 0);
    t.equal(out.join('\n').split('\n').length, 2);
    t.match(out.join('\n'), /^ +21 .* worker_spawned +workerId=w-20 model=tiny backend=process\n +22 .* request_served +requestId=req_21 model=tiny durationMs=12.5 promptTokens=7 completionTokens=32 outcome=ok$/);
  }

  const path = join(dir, 'audit.log.2');
  const ls = lines(path);
  ls[1] = ls[1]!.replace(/"time":"[^"]+"/, '"time":"2020-01-01T00:00:00.000Z"');
  writeFileSync(path, ls.join('\n') + '\n');
  {
    const { ctx, out } = fakeCtx(stateDir, true);
    t.equal(await auditCommand.run(ctx, { values: { json: true }, positionals: ['verify'] }), AUDIT_CHAIN_BROKEN.exit, 'a broken chain exits non-zero');
    const r = JSON.parse(out.join('')) as { ok: boolean; problem: { file: string; line: number }; error: { code: string } };
    t.notOk(r.ok);
    t.same([r.problem.file, r.problem.line], ['audit.log.2', 2]);
    t.equal(r.error.code, AUDIT_CHAIN_BROKEN.code);
  }
  {
    const { ctx, out, err } = fakeCtx(stateDir, false);
    t.not(await auditCommand.run(ctx, { values: {}, positionals: ['verify'] }), 0);
    t.same(out, []);
    t.match(err.join('\n'), /chain broken at audit\.log\.2 line 2 \(seq \d+\): hash does not match/);
  }
  {
    const { ctx } = fakeCtx(stateDir, false);
    await t.rejects(auditCommand.run(ctx, { values: {}, positionals: ['rewrite'] }), { code: ERRORS.CLI_USAGE.code });
    await t.rejects(auditCommand.run(ctx, { values: { lines: 'many' }, positionals: ['tail'] }), { code: ERRORS.CLI_USAGE.code });
  }
});
