// Issue 14: the real playbook (deploy/ansible/site.yml) turns a booted Debian 12 container (issue 13's rig,
// no network) into a control plane and an enrolled, ready node, through the community.general.chroot
// connection with an `nsenter --target <leader> --all` wrapper. Both roles in one container: the control
// plane listens on its loopback, the node enrols there and sends heartbeats.
//
//   1. syntax-check and ansible-lint --offline (production profile) pass;
//   2. the first run reports changes; inside: services active, node enrolled, /readyz 200, a chat request
//      answered, heartbeats counted by the control plane, the drop-ins hold the sysctl / journald /
//      init_on_free settings, and the live kernel values (the host's) are unchanged;
//   3. a second run reports changed=0 for every host;
//   4. a token used by one node (node2) and reused by another (node3) is refused: the play fails on node3
//      with the control plane's code, and the token is found nowhere on the container's filesystems.
import t from 'tap';
import { createHash } from 'node:crypto';
import { copyFileSync, cpSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { bootContainer, writeChrootWrapper, type Container } from '../helpers/nspawn.ts';
import { ROOT, tinyModelPath } from '../helpers.ts';
import { ensureTestRelease } from './ansible-release.ts';
import { MARKER } from '../../deploy/ansible/tools/verify-install.ts';
import { ANSIBLE_DIR, GATEWAY_PORT, ansibleEnv, runBounded, runPlaybook, writeInventory, type PlaybookResult } from './ansible-rig.ts';

// Three playbook runs in a booted container take 250-300 s on a 2-vCPU EPYC; with cold caches the rootfs
// (debootstrap, ≈ 100 s) and the test release (≈ 70 s) come first, and one such run reached 593 s of the
// runner's 600: this file gets a longer limit of its own.
t.setTimeout(900_000);

const CP_CLI = '/opt/phantoma-cp/current/control-plane/bin/phantoma-cp';
const CP_CONFIG = '/etc/phantoma-cp/config.json';
const NODE_NODE = '/opt/phantoma/current/.runtime/bin/node';
const timings: Record<string, number> = {};

function changedOf(r: PlaybookResult, host: string): number {
  const c = r.recap.get(host);
  if (!c) throw new Error(`no PLAY RECAP line for ${host}:\n${r.output.slice(-3000)}`);
  return c.changed!;
}

function failedOf(r: PlaybookResult, host: string): number {
  return r.recap.get(host)?.failed ?? -1;
}

/** The tail of a playbook's output, for a failing assertion's diagnostics. */
const tail = (r: { output: string }): string => r.output.slice(-6000);

async function poll<T>(what: string, ms: number, f: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1000));
  }
}

t.test('the playbook passes syntax-check and ansible-lint --offline', async (t) => {
  const work = join(tmpdir(), `phantoma-ansible-lint-${process.pid}`);
  mkdirSync(work, { recursive: true });
  t.teardown(() => rmSync(work, { recursive: true, force: true }));
  const syntax = await runBounded('ansible-playbook', ['-i', join(ANSIBLE_DIR, 'inventory/example.yml'), '--syntax-check', join(ANSIBLE_DIR, 'site.yml')], { cwd: ANSIBLE_DIR, env: ansibleEnv(work), timeoutMs: 60_000 });
  t.equal(syntax.code, 0, `syntax-check: ${syntax.output}`);
  t.match(syntax.output, /playbook: .*site\.yml/);
  const lint = await runBounded('ansible-lint', ['--offline', '--profile', 'production', '--nocolor'], { cwd: ANSIBLE_DIR, env: { ...ansibleEnv(work), NO_COLOR: '1' }, timeoutMs: 120_000 });
  t.equal(lint.code, 0, `ansible-lint: ${lint.output}`);
  t.match(lint.output, /Passed with production profile: 0 failure\(s\), 0 warning\(s\)/);
});

t.test('one run makes an enrolled, ready node; a second run changes nothing; a reused token is refused', async (t) => {
  let started = Date.now();
  const rel = await ensureTestRelease((s) => t.comment(s));
  timings.release = Date.now() - started;
  t.comment(`test release: ${rel.built ? `built in ${rel.buildMs} ms (cold)` : 'from the cache'}`);
  const tiny = await tinyModelPath();

  const work = join(tmpdir(), `phantoma-ansible-${process.pid}`);
  mkdirSync(work, { recursive: true, mode: 0o700 });
  started = Date.now();
  const c: Container = await bootContainer({ name: `ansible-${process.pid}` });
  timings.boot = Date.now() - started;
  t.teardown(async () => {
    await c.stop();
    rmSync(work, { recursive: true, force: true });
  });
  const hostCorePattern = readFileSync('/proc/sys/kernel/core_pattern', 'utf8');
  const hostSuidDumpable = readFileSync('/proc/sys/fs/suid_dumpable', 'utf8');
  const exe = join(work, 'chroot-exe');
  writeChrootWrapper(c, exe);
  const inventory = join(work, 'inventory.json');
  // The units as they are now: every run of this test installs the same files (deploy/systemd may be
  // edited while a test runs in a shared checkout; the second run must compare like with like).
  const systemd = join(work, 'systemd');
  cpSync(join(ROOT, 'deploy', 'systemd'), systemd, { recursive: true });
  writeInventory(inventory, c, exe, rel, tiny, systemd);
  const diag = async (): Promise<string> => `${await c.journal('phantoma.service')}\n${await c.journal('phantoma-warden.service')}`.slice(-4000);

  // ---- 1. first run
  const run1 = await runPlaybook(work, inventory, ['--limit', 'cp,node1'], 420_000);
  timings.firstRun = run1.ms;
  t.equal(run1.code, 0, `first run: ${tail(run1)}\n${run1.code === 0 ? '' : await diag()}`);
  if (run1.code !== 0) return;
  t.ok(changedOf(run1, 'cp') > 0, 'the first run changed the control plane');
  t.ok(changedOf(run1, 'node1') > 0, 'the first run changed the node');
  t.equal(failedOf(run1, 'node1'), 0);
  t.match(run1.output, /release 0\.1\.0 in slot a,\s+signed by 2 maintainers/, 'the release was verified (2 maintainers) before it was installed');
  t.match(run1.output, /5 pass, \d+ warn, 0 fail/, 'phantoma doctor passed inside the play');

  // ---- 2. inside the container
  const active = await c.systemctl('is-active', 'phantoma-keyd.service', 'phantoma-warden.service', 'phantoma.service', 'phantoma-control-plane.service');
  t.same(active.stdout.trim().split('\n'), ['active', 'active', 'active', 'active'], 'every unit is active');
  const slot = await c.exec(['readlink', '/opt/phantoma/current']);
  t.equal(slot.stdout.trim(), 'slots/a', 'the node runs slot a');
  const installed = JSON.parse(readFileSync(join(c.root, 'opt/phantoma', MARKER), 'utf8')) as { sha256: string; version: string; signers: string[] };
  t.equal(installed.sha256, createHash('sha256').update(readFileSync(rel.tarball)).digest('hex'), 'the installed release is the signed tarball');
  t.equal(installed.signers.length, 2, 'verified with two distinct maintainers\' bundles');
  const ready = await c.exec([NODE_NODE, '--input-type=module', '-e', `const r = await fetch('http://127.0.0.1:${GATEWAY_PORT}/readyz'); console.log(r.status);`]);
  t.equal(ready.stdout.trim(), '200', `readyz: ${ready.stdout}${ready.stderr}`);
  const chat = await c.exec([
    NODE_NODE, '--input-type=module', '-e',
    `const r = await fetch('http://127.0.0.1:${GATEWAY_PORT}/v1/chat/completions', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'Hello' }], max_tokens: 8, seed: 1 }) }); console.log(JSON.stringify({ status: r.status, body: await r.json() }));`,
  ], { timeoutMs: 60_000 });
  const answer = JSON.parse(chat.stdout.trim().split('\n').pop() ?? '{}') as { status: number; body: { object?: string; choices?: Array<{ message: { content: string } }>; usage?: { completion_tokens: number } } };
  t.equal(answer.status, 200, `chat: ${chat.stdout}${chat.stderr}`);
  t.equal(answer.body.object, 'chat.completion');
  t.ok((answer.body.usage?.completion_tokens ?? 0) > 0, 'the answer has tokens');
  t.type(answer.body.choices?.[0]?.message.content, 'string');

  // The kit the role left on the node refuses a tarball that lacks k bundles from pinned maintainers, and
  // unpacks nothing (the same command the role runs; one good bundle plus one from an unknown key).
  copyFileSync(join(rel.dir, 'bundles', 'mallory.sigstore.json'), join(c.root, 'root', 'mallory.sigstore.json'));
  const kit = `/usr/lib/phantoma/verifier/${rel.kitSha256}`;
  const refused = await c.exec([
    `${kit}/.runtime/bin/node`, '--disable-warning=ExperimentalWarning', `${kit}/deploy/ansible/tools/verify-install.ts`,
    '--tarball', `/var/cache/phantoma/releases/phantoma-${rel.version}.tar.gz`, '--trusted-root', '/var/cache/phantoma/releases/trusted-root.json',
    '--dest', '/opt/phantoma-refused', '--version', rel.version,
    '--bundle', `/var/cache/phantoma/releases/bundles-${rel.version}/alice.sigstore.json`, '--bundle', '/root/mallory.sigstore.json',
  ]);
  t.equal(refused.code, 11, `refused: ${refused.stdout}${refused.stderr}`);
  t.equal((JSON.parse(refused.stdout) as { error: { code: string } }).error.code, 'update_bundles_insufficient');
  t.notOk(existsSync(join(c.root, 'opt/phantoma-refused/slots')), 'nothing was unpacked');

  // Enrolled, and its heartbeats (every 10 s here; the first within 10 s of the start) reached the control plane.
  const enrolled = await c.exec(['test', '-s', '/var/lib/phantoma/control/state.json']);
  t.equal(enrolled.code, 0, 'the node holds its enrolment state');
  const seen = await poll('a heartbeat at the control plane', 60_000, async () => {
    const r = await c.exec([CP_CLI, 'nodes', 'show', 'node1', '--json', '--config', CP_CONFIG]);
    if (r.code !== 0) return undefined;
    const n = JSON.parse(r.stdout) as { status: string; lastCounter: number; lastSeenAt: string | null; leaseState: string };
    return n.lastCounter >= 1 ? n : undefined;
  });
  t.equal(seen.status, 'active');
  t.equal(seen.leaseState, 'valid');
  t.ok(seen.lastSeenAt, 'the control plane recorded when it last heard from the node');
  // ... from a gateway whose own connections may reach the control plane and nothing else (issue 13).
  t.match(readFileSync(join(c.root, 'etc/systemd/system/phantoma-warden.service.d/gateway-egress.conf'), 'utf8'), /^Environment="PHANTOMA_GATEWAY_EGRESS=tcp,127\.0\.0\.1\/32,8444"$/m, "the warden's allowlist for the gateway is the control plane's address from its URL");
  t.match(JSON.parse(readFileSync(join(c.root, 'etc/phantoma/node.json'), 'utf8')), { egress: { confineGateway: true } }, 'the node asks for it');
  const confined = await c.exec(['journalctl', '--no-pager', '-u', 'phantoma.service', '--grep', "the gateway's own connections are now limited"]);
  t.equal(confined.code, 0, `the gateway was confined before it served: ${confined.stdout}`);

  // The drop-ins hold the settings; the live kernel values are the host's and were not touched.
  const sysctl = readFileSync(join(c.root, 'etc/sysctl.d/60-phantoma.conf'), 'utf8');
  t.match(sysctl, /^fs\.suid_dumpable = 0$/m);
  t.match(sysctl, /^kernel\.core_pattern = \|\/bin\/false$/m);
  t.match(sysctl, /^kernel\.unprivileged_bpf_disabled = 1$/m);
  const yama = await c.exec(['test', '-e', '/proc/sys/kernel/yama/ptrace_scope']);
  if (yama.code === 0) t.match(sysctl, /^kernel\.yama\.ptrace_scope = 2$/m, 'Yama is set where the kernel has it');
  else t.notMatch(sysctl, /yama/, 'no Yama line on a kernel without Yama');
  t.match(readFileSync(join(c.root, 'etc/systemd/journald.conf.d/phantoma.conf'), 'utf8'), /^Storage=volatile$/m);
  t.match(run1.output, /PASS\s+journald\s+journal kept in RAM only: Storage=volatile/, "phantoma doctor found the live journald volatile");
  // A line logged now lands in the runtime journal (/run) and not in the boot-time persistent one.
  const marker = `phantoma-ansible-${process.pid}-${Date.now()}`;
  await c.exec(['logger', '-t', 'phantoma-ansible-test', marker]);
  await c.exec(['journalctl', '--sync']);
  const inRun = await c.exec(['journalctl', '--no-pager', '-D', '/run/log/journal', '-t', 'phantoma-ansible-test', '-o', 'cat']);
  t.match(inRun.stdout, marker, 'a new journal line is in /run/log/journal');
  const inVar = await c.exec(['sh', '-c', `test -d /var/log/journal || exit 0; journalctl --no-pager -D /var/log/journal -t phantoma-ansible-test -o cat`]);
  t.notMatch(inVar.stdout, marker, 'and not in /var/log/journal');
  t.match(readFileSync(join(c.root, 'etc/default/grub.d/60-phantoma.cfg'), 'utf8'), /GRUB_CMDLINE_LINUX_DEFAULT="\$GRUB_CMDLINE_LINUX_DEFAULT init_on_free=1"/);
  const reboot = await c.exec(['cat', '/run/reboot-required']);
  t.match(reboot.stdout, /init_on_free=1/, 'a reboot is flagged as due for init_on_free');
  t.equal(readFileSync('/proc/sys/kernel/core_pattern', 'utf8'), hostCorePattern, "the host's core_pattern was not changed");
  t.equal(readFileSync('/proc/sys/fs/suid_dumpable', 'utf8'), hostSuidDumpable, "the host's suid_dumpable was not changed");

  // ---- 3. second run: nothing to do
  const run2 = await runPlaybook(work, inventory, ['--limit', 'cp,node1'], 300_000);
  timings.secondRun = run2.ms;
  t.equal(run2.code, 0, `second run: ${tail(run2)}`);
  t.equal(changedOf(run2, 'cp'), 0, `the second run changed nothing on the control plane: ${run2.output.match(/changed: \[cp\].*/g)?.join('\n') ?? ''}`);
  t.equal(changedOf(run2, 'node1'), 0, `the second run changed nothing on the node: ${run2.output.match(/changed: \[node1\].*/g)?.join('\n') ?? ''}`);

  // ---- 4. a token reused on a second node
  const minted = await c.exec([CP_CLI, 'tokens', 'create', '--node', 'node2', '--ttl', '10m', '--config', CP_CONFIG]);
  t.equal(minted.code, 0, minted.stderr);
  const token = minted.stdout.trim();
  t.ok(token.length >= 20, 'a token was minted');
  const vars = join(work, 'token.json');
  writeFileSync(vars, JSON.stringify({ phantoma_node_enrolment_token: token }), { mode: 0o600 });
  const run3 = await runPlaybook(work, inventory, ['--limit', 'node2,node3', '-e', `@${vars}`], 300_000);
  timings.reuseRun = run3.ms;
  rmSync(vars, { force: true });
  t.equal(run3.code, 2, `the play fails: ${tail(run3)}`);
  t.equal(failedOf(run3, 'node2'), 0, 'node2 enrolled with the token (its first use)');
  t.equal(failedOf(run3, 'node3'), 1, 'node3 failed');
  t.match(run3.output, /fatal: \[node3\]: FAILED! =>\s+changed: false\s+msg: 'enrolment of node3 with https:\/\/127\.0\.0\.1:8444 was refused\s+\(exit 10\): phantoma:\s+the control plane refused: this enrolment token was already used \[cp_token_used\]\s+\[control_plane_refused\]'/, 'node3 was refused with the control plane\'s code');
  t.notOk(run3.output.includes(token), 'the token is not in the play\'s output');
  const node2 = await c.exec([CP_CLI, 'nodes', 'show', 'node2', '--json', '--config', CP_CONFIG]);
  t.equal((JSON.parse(node2.stdout) as { status: string }).status, 'active', 'the control plane knows node2');
  const node3 = await c.exec([CP_CLI, 'nodes', 'show', 'node3', '--json', '--config', CP_CONFIG]);
  t.not(node3.code, 0, 'the control plane does not know node3');
  t.equal((await c.exec(['test', '-e', '/var/lib/phantoma-node3/control/state.json'])).code, 1, 'node3 holds no enrolment');
  // Never on the node's disk (nor its tmpfs): searched inside the container, the token given on stdin.
  const found = await c.exec(['grep', '-rlF', '-D', 'skip', '-f', '-', '/etc', '/var', '/tmp', '/root', '/run', '/home', '/opt', '/usr/lib/phantoma'], { input: token + '\n', timeoutMs: 120_000 });
  t.equal(found.code, 1, `the token is on no file in the container: ${found.stdout}${found.stderr}`);
  // Nor left behind on the controller by Ansible (its home and local temp directory are in work/).
  const local = await runBounded('grep', ['-rlF', '-D', 'skip', '-f', '-', work], { timeoutMs: 60_000, input: token + '\n' });
  t.equal(local.code, 1, `the token is on no file Ansible left on the controller: ${local.output}`);
  t.comment(`timings (ms): ${JSON.stringify(timings)}`);
});
