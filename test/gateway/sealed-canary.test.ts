// The canary test on the sealed path (issue 8): prompts with unique random canaries go, sealed, through a
// real node run as its own process (`phantoma serve`, warden-isolated workers, keyd from a real vault):
// streamed and whole answers and client cancellations. Afterwards the gateway process holds ZERO copies of
// any canary in its memory (after a forced GC), no file changed since the start and no log or audit line
// has one, and everything the gateway received on the wire (recorded by a relay in front of it) is
// ciphertext. Every scan first finds a canary planted on purpose — the wire check one planted in a clear
// field of an envelope — so a scan that cannot see fails instead of passing.
//
// Never let a canary reach the TAP output (tap writes it to .tap/ on disk, which the file scan would find).
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { appendFileSync, closeSync, existsSync, mkdtempSync, openSync, readFileSync, readdirSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ROOT, runPhantoma } from '../helpers.ts';
import { makeVaultContents, addClient, identityFingerprint, rawEd25519Public } from '../../src/vault/contents.ts';
import { createVault } from '../../src/vault/store.ts';
import { createSealedClient } from '../../src/client/sealed.ts';
import { sealRequest } from '../../src/sealed/request.ts';
import { SEALED_CONTENT_TYPE, SEALED_PATH } from '../../src/gateway/sealed-route.ts';
import { createMatcher, createStreamScanner, diskMounts, findProcesses, forceGc, isDiskFs, makeCanary, parseMountinfo, scanFilesSince, scanLogText, scanProcessMemory } from '../ephemeral/scan.ts';

const TEST_START_MS = Date.now();
const SINCE_MS = TEST_START_MS - 2_000;
const MODEL = `sealed-${Math.random().toString(16).slice(2, 12)}`;
const POOL_SIZE = 2;

// State on a disk filesystem the file walk covers.
function isOnDisk(path: string): boolean {
  const real = realpathSync(path);
  let best = { mp: '/', fstype: '' };
  for (const m of parseMountinfo(readFileSync('/proc/self/mountinfo', 'utf8'))) {
    if ((m.mountPoint === '/' || real === m.mountPoint || real.startsWith(m.mountPoint + '/')) && m.mountPoint.length >= best.mp.length) best = { mp: m.mountPoint, fstype: m.fstype };
  }
  return isDiskFs(best.fstype);
}
const base = [tmpdir(), '/var/tmp', join(ROOT, '.cache')].find((d) => existsSync(d) && isOnDisk(d));
if (!base) throw new Error('no disk-backed directory for the node state');
const state = mkdtempSync(join(base, 'phantoma-sealed-canary-'));
process.once('exit', () => rmSync(state, { recursive: true, force: true }));
const LOG = join(state, 'node.log');

// The vault: identity, request keys, and the client "alice".
const alice = generateKeyPairSync('ed25519');
const now = new Date();
const contents = addClient(makeVaultContents({ now, requestKeyValidityMs: 86_400_000 }), 'alice', rawEd25519Public(alice.publicKey), now);
createVault(join(state, 'vault.phv'), { kind: 'passphrase', secret: Buffer.from('canary vault') }, { log2N: 10, r: 8, p: 1 }, contents);
const identityPin = identityFingerprint(Buffer.from(contents.identity.publicKey, 'base64'));

const SETTINGS = [
  `--stateDir=${state}`,
  '--gateway.host=127.0.0.1',
  '--gateway.port=0',
  '--gateway.metricsPort=0',
  '--gateway.tls=off',
  '--inference.threads=1',
  '--inference.contextSize=4096',
  `--pool.size=${POOL_SIZE}`,
  '--gateway.requestTimeoutMs=20000',
  '--gateway.maxQueue=64',
  '--gateway.shutdownGraceMs=5000',
  `--models=${JSON.stringify([{ name: MODEL, builtin: 'tiny' }])}`,
  `--defaultModel=${MODEL}`,
  '--workers.backend=warden',
  '--warden.start=true',
  `--warden.socket=${join(state, 'warden.sock')}`,
  `--warden.cgroupName=${MODEL}`,
  `--vault.keydSocket=${join(state, 'keyd', 'keyd.sock')}`,
];

const real: string[] = [];
const canary = (): string => {
  const c = makeCanary();
  real.push(c);
  return c;
};
const planted = { file: makeCanary(), log: makeCanary(), memory: makeCanary(), wire: makeCanary() };
const plantedSet = new Set(Object.values(planted));
const realMatcher = () => createMatcher(real);

// ---- the node, as its own process ----
const logFd = openSync(LOG, 'a', 0o600);
const server: ChildProcess = spawn(join(ROOT, 'bin', 'phantoma'), ['serve', '--json', ...SETTINGS], {
  stdio: ['ignore', logFd, logFd],
  env: { ...process.env, PHANTOMA_VAULT_PASSPHRASE: 'canary vault', NODE_OPTIONS: '--inspect-port=127.0.0.1:0' },
});
closeSync(logFd);
const serverPid = server.pid!;
const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => server.on('exit', (code, signal) => resolve({ code, signal })));
const readLog = (): string => readFileSync(LOG, 'utf8');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const isOurWorker = (argv: string[]): boolean => argv.some((a) => /worker-main\.[jt]s$/.test(a)) && argv.some((a) => a.includes(`"${MODEL}"`));
process.once('exit', () => {
  try {
    process.kill(serverPid, 'SIGKILL');
  } catch {
    /* gone */
  }
});

async function until<T>(f: () => T | undefined | false | Promise<T | undefined | false>, ms: number, what: string): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(50);
  }
}
const info = await until(
  () => {
    const first = readLog().split('\n').find((l) => l.startsWith('{"url"'));
    if (first) return JSON.parse(first) as { url: string; metrics: string };
    if (server.exitCode !== null) throw new Error(`serve exited ${server.exitCode} (see its log)`);
    return undefined;
  },
  90_000,
  'serve to print where it listens',
);

// ---- a recording relay in front of the gateway: what the gateway receives on the wire ----
const wire: Buffer[] = [];
const relaySockets = new Set<Socket>();
const relay: Server = createServer((c) => {
  const upstream = connect(Number(new URL(info.url).port), '127.0.0.1');
  relaySockets.add(c).add(upstream);
  c.on('data', (d: Buffer) => wire.push(Buffer.from(d)));
  c.pipe(upstream).pipe(c);
  const end = (): void => {
    c.destroy();
    upstream.destroy();
  };
  c.on('error', end).on('close', end);
  upstream.on('error', end).on('close', end);
});
await new Promise<void>((r) => relay.listen(0, '127.0.0.1', () => r()));
const relayUrl = `http://127.0.0.1:${(relay.address() as { port: number }).port}`;
t.teardown(async () => {
  for (const s of relaySockets) s.destroy();
  await new Promise<void>((r) => relay.close(() => r()));
});

const client = createSealedClient({ url: relayUrl, identityPin, clientName: 'alice', clientKey: alice.privateKey });

t.test('sealed requests carrying canaries: streamed, whole, and cancelled', async (t) => {
  let ok = 0;
  for (let i = 0; i < 8; i++) {
    const a = await client.send(MODEL, { messages: [{ role: 'user', content: `remember ${canary()} and ${canary()}` }], max_tokens: 12, seed: i }, { stream: i % 2 === 0 });
    if (a.receipt.wipeVerified && a.receipt.outcome === 'ok') ok++;
  }
  t.equal(ok, 8, 'every sealed request answered, each with a receipt of a verified wipe');
  let cancelled = 0;
  for (let i = 0; i < 2; i++) {
    const ac = new AbortController();
    const r = await client
      .send(MODEL, { messages: [{ role: 'user', content: `long ${canary()}` }], max_tokens: 3000 }, { stream: true, signal: ac.signal, onText: () => ac.abort() })
      .then(() => 'finished', () => 'aborted');
    if (r === 'aborted') cancelled++;
  }
  t.equal(cancelled, 2, 'two sealed streams cancelled by their client mid-generation');
  await until(async () => findProcesses(isOurWorker).length >= POOL_SIZE, 30_000, 'the pool to refill');
});

t.test('the wire: a canary planted in a clear field is seen; no prompt canary crossed in the clear', async (t) => {
  // Positive control: an envelope whose clear client-name field is the planted canary (refused: unknown).
  const doc = await client.keyDocument();
  const k = doc.requestKeys[0]!;
  const env = sealRequest({ node: { keyId: k.id, publicKeys: { x25519: Buffer.from(k.x25519, 'base64'), mlkem: Buffer.from(k.mlkem768, 'base64') } }, clientName: planted.wire, clientKey: alice.privateKey, model: MODEL, stream: false, body: { messages: [{ role: 'user', content: 'x' }] }, nowMs: Date.now() }).envelope;
  const res = await fetch(relayUrl + SEALED_PATH, { method: 'POST', headers: { 'content-type': SEALED_CONTENT_TYPE }, body: env });
  t.equal(res.status, 401, 'refused (unknown client), but its bytes crossed the wire');
  await res.arrayBuffer();
  const counts = new Map<string, number>();
  const scanner = createStreamScanner(createMatcher([...real, planted.wire]), counts);
  for (const chunk of wire) scanner.push(chunk);
  t.ok((counts.get(planted.wire) ?? 0) >= 1, 'positive control: the wire scan finds the planted clear field');
  const sealedPosts = Buffer.concat(wire).toString('latin1').split(`POST ${SEALED_PATH} HTTP/1.1`).length - 1;
  t.ok(sealedPosts >= 11, `the relay recorded every sealed request (${sealedPosts}: 8 answered, 2 cancelled, 1 planted)`);
  t.equal([...counts.keys()].filter((c) => !plantedSet.has(c)).length, 0, 'no prompt canary on the wire: the gateway received ciphertext only');
});

t.test('gateway memory after a forced GC: the planted string is found, ZERO prompt canaries', async (t) => {
  const created = await runPhantoma(['apikeys', 'create', planted.memory, '--json', ...SETTINGS]);
  t.equal(created.code, 0, 'planted key created');
  const key = (JSON.parse(created.stdout) as { key: string }).key;
  t.equal((await fetch(info.url + '/v1/models', { headers: { authorization: `Bearer ${key}` } })).status, 200, 'the gateway re-read its key store');
  await forceGc(serverPid, readLog, { times: 2 });
  const mem = scanProcessMemory(serverPid, createMatcher([...real, planted.memory]), { contextBytes: 0 });
  t.ok((mem.counts.get(planted.memory) ?? 0) >= 1, 'positive control: the memory scan finds the planted key name');
  t.ok(mem.bytesRead > 10 << 20, `read ${(mem.bytesRead / 2 ** 20).toFixed(0)} MiB`);
  const copies = [...mem.counts].filter(([c]) => !plantedSet.has(c)).reduce((a, [, n]) => a + n, 0);
  t.equal(copies, 0, 'no copy of any prompt canary in the gateway process: it only ever held ciphertext');
});

t.test("the node's log and audit log: the planted line is found, no canary is", async (t) => {
  appendFileSync(LOG, JSON.stringify({ level: 30, msg: 'planted by the sealed canary test', note: planted.log }) + '\n');
  const text = readLog();
  t.ok(scanLogText(text, createMatcher([planted.log])).counts.has(planted.log), 'positive control: the log scan finds the planted line');
  t.same(scanLogText(text, realMatcher()).hitLines, [], 'no prompt canary in any log line');
  const dir = join(state, 'audit');
  const audit = readdirSync(dir).map((f) => readFileSync(join(dir, f), 'utf8')).join('');
  t.ok(audit.includes('"type":"request_served"'), 'the audit log has the requests');
  t.same(scanLogText(audit, realMatcher()).hitLines, [], 'no prompt canary in the audit log');
});

t.test('files changed since the start on every disk filesystem: the planted file is found, no canary is', async (t) => {
  const plantedPath = join(state, 'planted.bin');
  writeFileSync(plantedPath, Buffer.concat([Buffer.alloc((1 << 20) - 9, 'x'), Buffer.from(planted.file), Buffer.from('\n')]));
  const mounts = diskMounts(parseMountinfo(readFileSync('/proc/self/mountinfo', 'utf8')));
  const scan = scanFilesSince({ sinceMs: SINCE_MS, matcher: createMatcher([...real, planted.file]), mounts });
  rmSync(plantedPath, { force: true });
  t.same([...(scan.hits.get(planted.file) ?? [])], [plantedPath], 'positive control: the file scan finds the planted file, and only there');
  t.same([...scan.hits].filter(([c]) => !plantedSet.has(c)).flatMap(([, p]) => [...p]), [], 'no prompt canary in any file changed since the test started');
});

t.test('SIGTERM: the node exits 0 and leaves no worker', async (t) => {
  t.ok(findProcesses(isOurWorker).length >= 1, 'positive control: the worker scan sees live warm workers');
  server.kill('SIGTERM');
  const exit = await Promise.race([exited, sleep(30_000).then(() => ({ code: null, signal: 'timeout' as const }))]);
  t.same(exit, { code: 0, signal: null }, 'the node exited 0');
  await until(() => findProcesses(isOurWorker).length === 0, 5_000, 'workers to be gone').catch(() => undefined);
  t.same(findProcesses(isOurWorker), [], "no process of this node's workers remains");
});
