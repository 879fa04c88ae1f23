// phantoma vault / keys / clients as real processes: init (moving an existing TLS key in), keys show,
// clients add/list/revoke, keys rotate, export → wipe → import keeps identity and the client registry;
// bad input exits with its documented code and writes nothing.
import t from 'tap';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runPhantoma } from '../helpers.ts';
import { ensureSelfSignedTls } from '../../src/gateway/tls.ts';
import { runCli } from '../../src/cli/main.ts';

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-cli-vault-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));
const state = join(tmp, 'state');
const settings = [`--stateDir=${state}`, '--vault.kdfLog2N=10', '--vault.allowWeakKdf=true'];
const env = { ...process.env, PHANTOMA_VAULT_PASSPHRASE: 'vault pass', PHANTOMA_BACKUP_PASSPHRASE: 'backup pass' };
// Most commands run in-process through runCli (the same code and exit status as bin/phantoma, without a
// 2 s Node start each); the first test runs the real binary.
async function run(args: string[], e: NodeJS.ProcessEnv = env): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const saved = { ...process.env };
  for (const k of ['PHANTOMA_VAULT_PASSPHRASE', 'PHANTOMA_BACKUP_PASSPHRASE', 'CREDENTIALS_DIRECTORY']) {
    if (e[k] === undefined) delete process.env[k];
    else process.env[k] = e[k];
  }
  let stdout = '';
  let stderr = '';
  try {
    const code = await runCli([...args, ...settings], { out: (l) => (stdout += l + '\n'), err: (l) => (stderr += l + '\n') });
    return { code, stdout, stderr };
  } finally {
    for (const k of Object.keys(process.env)) if (!(k in saved)) delete process.env[k];
    Object.assign(process.env, saved);
  }
}
const runBinary = (args: string[], e: NodeJS.ProcessEnv = env) => runPhantoma([...args, ...settings], { env: e });
const json = (s: string): any => JSON.parse(s);

t.test('init moves the existing TLS key into the vault; keys show prints identity, request keys, TLS', async (t) => {
  const tls = await ensureSelfSignedTls(state);
  const noCred = await run(['vault', 'init'], { ...env, PHANTOMA_VAULT_PASSPHRASE: undefined, CREDENTIALS_DIRECTORY: undefined });
  t.equal(noCred.code, 9);
  t.match(noCred.stderr, /\[vault_credential_missing\]/);
  t.notOk(existsSync(join(state, 'vault.phv')), 'nothing written without a credential');
  const weak = await runPhantoma(['vault', 'init', `--stateDir=${state}`, '--vault.kdfLog2N=10'], { env });
  t.equal(weak.code, 2, 'a weak KDF needs the test-only flag');
  t.match(weak.stderr, /allowWeakKdf.*\[config_invalid\]/);
  const init = await runBinary(['vault', 'init', '--json']);
  t.equal(init.code, 0, init.stderr);
  const made = json(init.stdout);
  t.equal(made.tlsFingerprint, tls.fingerprint, 'the TLS pin survives the move');
  t.equal(made.tlsMoved, true);
  t.notOk(existsSync(join(state, 'tls-key.pem')), 'the plaintext TLS key is gone');
  t.match(made.identityFingerprint, /^sha256:[0-9a-f]{64}$/);
  const again = await run(['vault', 'init']);
  t.equal(again.code, 9);
  t.match(again.stderr, /\[vault_exists\]/);
  const show = await runBinary(['keys', 'show', '--json']);
  t.equal(show.code, 0, show.stderr);
  const shown = json(show.stdout);
  t.equal(shown.identityFingerprint, made.identityFingerprint, 'restart keeps identity');
  t.equal(shown.tlsFingerprint, tls.fingerprint);
  t.same(shown.requestKeys.map((k: { id: string }) => k.id), made.requestKeyIds);
  const wrong = await runBinary(['keys', 'show'], { ...env, PHANTOMA_VAULT_PASSPHRASE: 'nope' });
  t.equal(wrong.code, 9);
  t.match(wrong.stderr, /key-check value mismatch.*\[vault_passphrase_wrong\]/);
  const passFile = join(tmp, 'pass.txt');
  writeFileSync(passFile, 'vault pass\n');
  const viaFile = await run(['keys', 'show', '--json', '--passphrase-file', passFile], { ...process.env, PHANTOMA_VAULT_PASSPHRASE: undefined });
  t.equal(json(viaFile.stdout).identityFingerprint, made.identityFingerprint, '--passphrase-file works (trailing newline dropped)');
});

t.test('clients add/list/revoke; bad input exits 2 and leaves the vault byte-identical', async (t) => {
  const vault = join(state, 'vault.phv');
  const key = Buffer.alloc(32, 9).toString('base64url');
  t.equal((await run(['clients', 'add', 'alice', key])).code, 0);
  const before = readFileSync(vault);
  const dup = await run(['clients', 'add', 'alice', key]);
  t.equal(dup.code, 2);
  t.match(dup.stderr, /\[client_exists\]/);
  const badKey = await run(['clients', 'add', 'bob', 'not-a-key']);
  t.equal(badKey.code, 2);
  t.match(badKey.stderr, /\[cli_usage\]/);
  const badName = await run(['clients', 'add', '../x', key]);
  t.equal(badName.code, 2);
  const unknown = await run(['clients', 'revoke', 'nobody']);
  t.equal(unknown.code, 2);
  t.match(unknown.stderr, /\[client_not_found\]/);
  t.ok(readFileSync(vault).equals(before), 'refused commands wrote nothing');
  t.equal((await run(['clients', 'add', 'bob', Buffer.alloc(32, 3).toString('base64')])).code, 0);
  t.equal((await run(['clients', 'revoke', 'alice'])).code, 0);
  const list = json((await run(['clients', 'list', '--json'])).stdout);
  t.same(list.map((c: { name: string; revokedAt?: string }) => [c.name, !!c.revokedAt]), [['alice', true], ['bob', false]]);
});

t.test('keys rotate adds a request key and keeps the previous one for the overlap', async (t) => {
  const before = json((await run(['keys', 'show', '--json'])).stdout);
  const r = await run(['keys', 'rotate', '--json', '--vault.rotationOverlapSeconds=3600']);
  t.equal(r.code, 0, r.stderr);
  const keys = json(r.stdout).requestKeys as Array<{ id: string; notAfter: string }>;
  t.equal(keys.length, 2);
  t.equal(keys[0]!.id, before.requestKeys[0].id);
  const left = Date.parse(keys[0]!.notAfter) - Date.now();
  t.ok(left > 3500_000 && left <= 3600_000, 'the old key is cut to now + overlap');
});

t.test('export → wipe → import keeps identity and the client registry; a wrong backup passphrase is refused', async (t) => {
  const before = json((await run(['keys', 'show', '--json'])).stdout);
  const clients = json((await run(['clients', 'list', '--json'])).stdout);
  const backup = join(tmp, 'node.backup');
  const same = await run(['vault', 'export', backup], { ...env, PHANTOMA_BACKUP_PASSPHRASE: 'vault pass' });
  t.equal(same.code, 2, 'a backup passphrase equal to the vault passphrase is refused');
  t.notOk(existsSync(backup), 'and nothing is written');
  const ex = await run(['vault', 'export', backup]);
  t.equal(ex.code, 0, ex.stderr);
  t.equal((await run(['vault', 'export', backup])).code, 9, 'an existing backup is not overwritten');
  rmSync(state, { recursive: true, force: true });
  const wrong = await run(['vault', 'import', backup], { ...env, PHANTOMA_BACKUP_PASSPHRASE: 'nope' });
  t.equal(wrong.code, 9);
  t.match(wrong.stderr, /\[vault_passphrase_wrong\]/);
  t.notOk(existsSync(join(state, 'vault.phv')), 'nothing written');
  const asVault = await run(['vault', 'import', join(tmp, 'missing.backup')]);
  t.equal(asVault.code, 9);
  t.match(asVault.stderr, /\[vault_not_found\]/);
  const im = await run(['vault', 'import', backup], { ...env, PHANTOMA_VAULT_PASSPHRASE: 'a new vault pass' });
  t.equal(im.code, 0, im.stderr);
  const after = json((await run(['keys', 'show', '--json'], { ...env, PHANTOMA_VAULT_PASSPHRASE: 'a new vault pass' })).stdout);
  t.equal(after.identityFingerprint, before.identityFingerprint, 'identity survives the rebuild');
  t.equal(after.tlsFingerprint, before.tlsFingerprint);
  t.same(json((await run(['clients', 'list', '--json'], { ...env, PHANTOMA_VAULT_PASSPHRASE: 'a new vault pass' })).stdout), clients, 'client registry survives');
  t.equal((await run(['vault', 'import', backup])).code, 9, 'import never overwrites a vault');
});

t.test('a systemd credential (key file in $CREDENTIALS_DIRECTORY) seals and opens a vault; --key-file too', async (t) => {
  const credDir = join(tmp, 'creds');
  mkdirSync(credDir, { mode: 0o700 });
  writeFileSync(join(credDir, 'phantoma-vault-key'), randomBytes(32));
  const other = `--vault.path=${join(tmp, 'cred-vault.phv')}`;
  const credEnv = { ...process.env, PHANTOMA_VAULT_PASSPHRASE: undefined, CREDENTIALS_DIRECTORY: credDir };
  const init = await run(['vault', 'init', '--json', other], credEnv);
  t.equal(init.code, 0, init.stderr);
  t.match(json(init.stdout).kdf, /key file/);
  const show = await run(['keys', 'show', '--json', other], credEnv);
  t.equal(json(show.stdout).identityFingerprint, json(init.stdout).identityFingerprint);
  const viaFlag = await run(['keys', 'show', '--json', other, '--key-file', join(credDir, 'phantoma-vault-key')], { ...credEnv, CREDENTIALS_DIRECTORY: undefined });
  t.equal(viaFlag.code, 0, '--key-file names the same key');
  const withPass = await run(['keys', 'show', other], { ...credEnv, PHANTOMA_VAULT_PASSPHRASE: 'a passphrase' });
  t.equal(withPass.code, 9, 'a passphrase (which takes precedence) does not open a key-file vault');
  t.match(withPass.stderr, /\[vault_passphrase_wrong\]/);
  writeFileSync(join(credDir, 'short-key'), randomBytes(8));
  const short = await run(['vault', 'init', `--vault.path=${join(tmp, 'short.phv')}`, '--key-file', join(credDir, 'short-key')], credEnv);
  t.equal(short.code, 9);
  t.match(short.stderr, /at least 32 bytes.*\[vault_credential_missing\]/);
  t.notOk(existsSync(join(tmp, 'short.phv')));
});
