// Installs a node the way deploy/systemd/README.md describes, into a booted container (test/helpers/nspawn.ts),
// for test/deploy/systemd.test.ts. The container has no network: the release is this checkout, built
// (dist/, native builds, .runtime/, node_modules/, the tiny model in .cache/models), snapshotted
// (releaseSnapshot) and bind-mounted read-only as slot a (/opt/phantoma/slots/a) and as the control
// plane's installation (/opt/phantoma-cp/current).
import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from '../helpers.ts';
import type { Bind, Container, ExecResult } from '../helpers/nspawn.ts';

export const UNITS = ['phantoma.service', 'phantoma-warden.service', 'phantoma-keyd.service', 'phantoma-control-plane.service', 'phantoma-rollback.service'] as const;
export const RUNNING_UNITS = ['phantoma.service', 'phantoma-warden.service', 'phantoma-keyd.service', 'phantoma-control-plane.service'] as const;
export const DEPLOY = join(ROOT, 'deploy', 'systemd');
export const GATEWAY_PORT = 8443;
export const CP_PORT = 8444;

/**
 * A release tree for the container, snapshotted from this checkout so that edits to src/ while the test
 * runs cannot make the gateway refuse a stale dist/: the small parts copied (src, dist, bin, native builds,
 * the test model...), the large read-only ones (.runtime, node_modules) hard-linked. Rebuilt in the
 * snapshot if its src/ turns out newer than its dist/. Returns the directory; remove it afterwards.
 */
export function releaseSnapshot(): string {
  const dir = mkdtempSync('/var/tmp/phantoma-release-');
  chmodSync(dir, 0o755);
  const cp = (args: string[]): void => {
    const r = spawnSync('cp', args, { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`cp ${args.join(' ')}: ${r.stderr}`);
  };
  cp(['-a', ...['package.json', 'package-lock.json', 'tsconfig.json', 'tsconfig.build.json', 'bin', 'src', 'dist', 'native', 'control-plane', 'deploy', 'scripts'].map((p) => join(ROOT, p)), dir]);
  mkdirSync(join(dir, '.cache'));
  cp(['-a', join(ROOT, '.cache', 'models'), join(dir, '.cache')]);
  cp(['-al', join(ROOT, '.runtime'), join(ROOT, 'node_modules'), dir]);
  const stamp = statSync(join(dir, 'dist', '.build-stamp')).mtimeMs;
  const newer = spawnSync('find', [join(dir, 'src'), '-newer', join(dir, 'dist', '.build-stamp'), '-print', '-quit'], { encoding: 'utf8' }).stdout.trim();
  if (newer || !stamp) {
    const r = spawnSync('bash', [join(dir, 'scripts', 'build.sh')], { encoding: 'utf8', cwd: dir });
    if (r.status !== 0) throw new Error(`build in the snapshot failed: ${r.stderr}`);
  }
  return dir;
}

export function removeSnapshot(dir: string): void {
  if (dir.startsWith('/var/tmp/phantoma-release-')) rmSync(dir, { recursive: true, force: true });
}

export function releaseBinds(release: string): Bind[] {
  return [
    { host: release, container: '/opt/phantoma/slots/a', readOnly: true },
    { host: release, container: '/opt/phantoma-cp/current', readOnly: true },
  ];
}

/** The node configuration: the layout the units assume (deploy/systemd/README.md). */
export function nodeConfig(): Record<string, unknown> {
  return {
    stateDir: '/var/lib/phantoma',
    gateway: { host: '127.0.0.1', port: GATEWAY_PORT, tls: 'off', auth: 'none', metricsPort: 9464 },
    warden: { socket: '/run/phantoma-warden/warden.sock', start: false },
    // The gateway's own connections limited to the control plane (the warden's drop-in names it).
    egress: { confineGateway: true },
    vault: { path: '/var/lib/phantoma-keyd/vault.phv', keydSocket: '/run/phantoma-keyd/keyd.sock', keydStart: false },
    updates: { root: '/opt/phantoma' },
    pool: { size: 1 },
    inference: { threads: 1 },
    models: [{ name: 'tiny', builtin: 'tiny' }],
  };
}

export async function must(c: Container, cmd: string[], what: string, opts: { timeoutMs?: number; env?: Record<string, string> } = {}): Promise<ExecResult> {
  const r = await c.exec(cmd, opts);
  if (r.code !== 0) throw new Error(`${what} failed (${r.code}): ${r.stdout}\n${r.stderr}`);
  return r;
}

export async function installNode(c: Container): Promise<void> {
  const r = c.root;
  // Unit files, helper scripts, the journald drop-in: exactly what deploy/systemd ships.
  for (const u of UNITS) copyFileSync(join(DEPLOY, u), join(r, 'etc/systemd/system', u));
  mkdirSync(join(r, 'usr/lib/phantoma'), { recursive: true });
  for (const s of ['phantoma-warden-start', 'phantoma-trial-rollback']) {
    copyFileSync(join(DEPLOY, s), join(r, 'usr/lib/phantoma', s));
    chmodSync(join(r, 'usr/lib/phantoma', s), 0o755);
  }
  // The installer's drop-in: the gateway may reach the control plane and nothing else.
  mkdirSync(join(r, 'etc/systemd/system/phantoma-warden.service.d'), { recursive: true });
  writeFileSync(join(r, 'etc/systemd/system/phantoma-warden.service.d/gateway-egress.conf'), `[Service]\nEnvironment=PHANTOMA_GATEWAY_EGRESS=tcp,127.0.0.1/32,${CP_PORT}\n`);
  mkdirSync(join(r, 'etc/systemd/journald.conf.d'), { recursive: true });
  for (const f of readdirSync(join(DEPLOY, 'journald.conf.d'))) copyFileSync(join(DEPLOY, 'journald.conf.d', f), join(r, 'etc/systemd/journald.conf.d', f));
  // Configuration (no secrets: world-readable) and credentials (root-only; systemd hands them to one unit).
  mkdirSync(join(r, 'etc/phantoma'), { recursive: true, mode: 0o755 });
  writeFileSync(join(r, 'etc/phantoma/node.json'), JSON.stringify(nodeConfig(), null, 1) + '\n', { mode: 0o644 });
  mkdirSync(join(r, 'etc/phantoma-cp'), { recursive: true, mode: 0o755 });
  writeFileSync(join(r, 'etc/phantoma-cp/config.json'), JSON.stringify({ dataDir: '/var/lib/phantoma-cp', host: '127.0.0.1', port: CP_PORT, metricsPort: 9465, key: { kdfLog2N: 10, allowWeakKdf: true } }, null, 1) + '\n', { mode: 0o644 });
  mkdirSync(join(r, 'etc/credstore'), { recursive: true, mode: 0o700 });
  writeFileSync(join(r, 'etc/credstore/phantoma-vault-key'), randomBytes(32), { mode: 0o600 });
  writeFileSync(join(r, 'etc/credstore/phantoma-cp-key'), randomBytes(32), { mode: 0o600 });
  // The A/B layout: slot a is the bind-mounted release; `current` points at it.
  symlinkSync('slots/a', join(r, 'opt/phantoma/current'));

  await must(c, ['/bin/sh', '-c', [
    'set -e',
    'for u in phantoma phantoma-keyd phantoma-cp; do useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $u; done',
    // keyd's vault, made with the credential it will get from systemd
    'install -d -m 0711 -o phantoma-keyd -g phantoma-keyd /var/lib/phantoma-keyd',
    '/opt/phantoma/current/bin/phantoma vault init --config /etc/phantoma/node.json --key-file /etc/credstore/phantoma-vault-key',
    'chown phantoma-keyd:phantoma-keyd /var/lib/phantoma-keyd/vault.phv && chmod 0600 /var/lib/phantoma-keyd/vault.phv',
    // the control plane's sealed lease key, with its credential
    'install -d -m 0700 -o phantoma-cp -g phantoma-cp /var/lib/phantoma-cp',
    'CREDENTIALS_DIRECTORY=/etc/credstore /opt/phantoma-cp/current/control-plane/bin/phantoma-cp key init --config /etc/phantoma-cp/config.json',
    'chown -R phantoma-cp:phantoma-cp /var/lib/phantoma-cp',
    'systemctl restart systemd-journald',
    'systemctl daemon-reload',
  ].join('\n')], 'installing the node', { timeoutMs: 120_000 });
}

/** `systemctl show -p` values of a unit. */
export async function show(c: Container, unit: string, props: string[]): Promise<Record<string, string>> {
  const r = await c.systemctl('show', unit, ...props.map((p) => `--property=${p}`));
  const out: Record<string, string> = {};
  for (const line of r.stdout.split('\n')) {
    const i = line.indexOf('=');
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1);
  }
  return out;
}

/** Polls until `check` returns a value (bounded); returns the last observation on timeout. */
export async function waitFor<T>(what: string, timeoutMs: number, check: () => Promise<T | undefined>, intervalMs = 500): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((res) => setTimeout(res, intervalMs));
  }
}
