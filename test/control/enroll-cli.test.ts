// `phantoma enroll` as a real process: the token arrives on stdin (or another fd), never in argv and never
// on disk; the vault's identity key is the key enrolled; then the heartbeat loop of a node runs against the
// same control plane and `phantoma heartbeat log|status` show the result.
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, openSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { runCli } from '../../src/cli/main.ts';
import { readTokenFrom } from '../../src/cli/enroll.ts';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createVault, readVault } from '../../src/vault/store.ts';
import { makeVaultContents, identityFingerprint, identityPrivateKey } from '../../src/vault/contents.ts';
import { signerFromPrivateKey } from '../../src/control/node.ts';
import { createHeartbeatLoop, nextDelayMs } from '../../src/control/heartbeat-loop.ts';
import { ledgerDirOf } from '../../src/control/ledger.ts';
import { createLogger } from '../../src/logger.ts';
import { ROOT } from '../helpers.ts';
import { startCpRig, SNAPSHOT, type CpRig } from '../control-plane/rig.ts';

let rig: CpRig;
t.before(async () => {
  rig = await startCpRig();
});
t.teardown(async () => {
  await rig?.close();
});

const PASS = 'vault passphrase for the enroll test';

function phantoma(args: string[], stdin: string | undefined, extraFd?: string): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(join(ROOT, 'bin', 'phantoma'), args, {
      env: { ...process.env, PHANTOMA_VAULT_PASSPHRASE: PASS },
      stdio: ['pipe', 'pipe', 'pipe', ...(extraFd === undefined ? [] : ['pipe' as const])],
    });
    let out = '';
    let err = '';
    child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr!.on('data', (c: Buffer) => (err += c.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, out, err });
    });
    if (extraFd !== undefined) (child.stdio[3] as NodeJS.WritableStream).end(extraFd);
    child.stdin!.end(stdin ?? '');
  });
}

function filesUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, encoding: 'utf8' }).map((f) => join(dir, f)).filter((f) => statSync(f).isFile());
}

t.test('phantoma enroll reads the token from stdin or an fd, enrols the vault identity, writes no token', async (t) => {
  const stateDir = mkdtempSync(join(tmpdir(), 'phantoma-enroll-'));
  t.teardown(() => rmSync(stateDir, { recursive: true, force: true }));
  const contents = makeVaultContents({ now: new Date(), requestKeyValidityMs: 86_400_000 });
  createVault(join(stateDir, 'vault.phv'), { kind: 'passphrase', secret: Buffer.from(PASS) }, { log2N: 10, r: 8, p: 1 }, contents);
  const settings = [`--stateDir=${stateDir}`];

  const { token } = await rig.cp.service.createToken('cli-node', 600);
  const r = await phantoma(['enroll', '--url', rig.cp.url, '--pin', rig.cp.fingerprint, ...settings, '--json'], `${token}\n`);
  t.equal(r.code, 0, r.err);
  t.equal((JSON.parse(r.out) as { node: string }).node, 'cli-node');
  const shown = await rig.cp.service.showNode('cli-node');
  t.equal(shown.publicKeyFingerprint, identityFingerprint(Buffer.from(contents.identity.publicKey, 'base64')), "the vault's identity key was enrolled");
  for (const f of filesUnder(stateDir)) t.notOk(readFileSync(f).includes(token), `the token is not in ${f.slice(stateDir.length)}`);

  // A restored node re-enrols with a new token, passed on fd 3 this time.
  const again = await rig.cp.service.createToken('cli-node', 600);
  const r2 = await phantoma(['enroll', '--url', rig.cp.url, '--pin', rig.cp.fingerprint, '--token-fd', '3', ...settings], '', again.token);
  t.equal(r2.code, 0, r2.err);
  t.match(r2.out, /enrolled as cli-node with https:\/\/127\.0\.0\.1:\d+; lease valid until /);

  // In-process from here on (each bin/phantoma start costs seconds on this shared machine).
  const cli = async (...args: string[]): Promise<{ code: number; out: string; err: string }> => {
    const out: string[] = [];
    const err: string[] = [];
    const code = await runCli([...args, ...settings], { out: (x) => out.push(x), err: (x) => err.push(x) });
    return { code, out: out.join('\n'), err: err.join('\n') };
  };
  t.throws(() => readTokenFrom(openSync('/dev/null', 'r')), { code: 'cli_usage', message: /no enrolment token on fd/ });

  // The heartbeat loop with the vault's key as signer (keyd's stand-in): beats at once, then on its interval.
  const signer = signerFromPrivateKey(identityPrivateKey(readVault(join(stateDir, 'vault.phv'), { kind: 'passphrase', secret: Buffer.from(PASS) }).contents));
  let attempts = 0;
  const loop = createHeartbeatLoop({ stateDir, signer, version: '0.1.0', snapshot: () => SNAPSHOT, logger: createLogger({ level: 'silent' }), jitter: 0.2, random: () => 0, onAttempt: () => attempts++ });
  loop.start();
  for (let i = 0; i < 100 && attempts === 0; i++) await new Promise((res) => setTimeout(res, 50));
  await loop.stop();
  t.equal(attempts, 1, 'one heartbeat right after start, then the loop waits for its interval');
  const log = await cli('heartbeat', 'log', '-n', '2');
  t.equal(log.code, 0, log.err);
  t.match(log.out, /heartbeat_sent/);
  t.match(log.out, /heartbeat_received .* status=200/);
  const status = await cli('heartbeat', 'status');
  t.match(status.out, /^license: valid\nnode cli-node at https:\/\/127\.0\.0\.1:\d+; last counter 1;/);
  t.ok(filesUnder(ledgerDirOf(stateDir)).length >= 1);
});

t.test('heartbeat scheduling is jittered, retries sooner after a failure, and is bounded', async (t) => {
  t.equal(nextDelayMs(600, 0.2, 0, 0), 480_000);
  t.equal(nextDelayMs(600, 0.2, 0, 1), 720_000);
  t.equal(nextDelayMs(600, 0.2, 1, 0.5), 30_000, 'first retry after 30 s');
  t.equal(nextDelayMs(600, 0.2, 3, 0.5), 120_000, 'doubling');
  t.equal(nextDelayMs(600, 0.2, 50, 0.5), 600_000, 'never later than the interval');
  t.equal(nextDelayMs(10, 0.5, 0, 0), 5000);
});
