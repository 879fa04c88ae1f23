// Verification by the kernel's word and failing closed, against a real warden: the monitor verifies
// (BPF_PROG_QUERY tags = the built tags, live probe refused); a program detached behind the daemon's back
// is noticed within the check interval and the gate starts no worker; a SIGKILLed warden leaves its
// programs attached (pinned) so nothing reaches the listener meanwhile, and only a restarted warden that
// re-verifies (status AND probe) opens the gate again.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import {
  attemptCgroup,
  buildAll,
  cleanupWardenLeftovers,
  createNetns,
  runAttempt,
  startWarden,
  tempDir,
  type Netns,
  type Warden,
} from './rig.ts';
import { createEgressMonitor, type EgressMonitor } from '../../src/egress/monitor.ts';
import { checkStatus, egressPolicyHash, loadExpectedTags } from '../../src/egress/policy.ts';
import { gateBackend, gatePool } from '../../src/egress/gate.ts';
import { createEgressClient } from '../../src/egress/warden-egress.ts';
import { createLogger } from '../../src/logger.ts';
import { runPhantoma } from '../helpers.ts';
import type { WorkerBackend, WorkerHandle } from '../../src/ephemeral/backend.ts';
import type { WorkerPool } from '../../src/ephemeral/pool.ts';
import type { AuditEvent } from '../../src/audit/audit-events.ts';

t.equal(process.getuid?.(), 0, 'runs as root');
const dir = tempDir('phantoma-egress-v-');
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const ATTEMPT = buildAll(dir);
const NAME = `phantoma-egress-verify-${process.pid}`;
const expected = loadExpectedTags();
const logger = createLogger({ level: 'silent' });
const CHECK_MS = 300;

let ns: Netns;
let w: Warden;
t.before(async () => {
  ns = await createNetns('ver');
  w = await startWarden({ name: NAME, sockDir: dir });
});
t.teardown(async () => {
  await ns?.listener.stop();
  ns?.destroy();
  await w?.stop();
  cleanupWardenLeftovers(NAME);
});

function monitorFor(socketPath: string, audit: AuditEvent[] = []): EgressMonitor {
  return createEgressMonitor({
    mode: 'enforce',
    client: createEgressClient({ socketPath, timeoutMs: 2000 }),
    expected,
    checkIntervalMs: CHECK_MS,
    probeIntervalMs: 60_000,
    logger,
    audit: (e) => audit.push(e),
  });
}

/** A fake inner backend that records spawns (the gate's behaviour, not a worker's, is under test here). */
function countingBackend(): WorkerBackend & { spawned: number; handles: WorkerHandle[] } {
  const b = {
    name: 'warden',
    spawned: 0,
    handles: [] as WorkerHandle[],
    spawn(): WorkerHandle {
      b.spawned++;
      const exit = Promise.withResolvers<{ code: number | null; signal: NodeJS.Signals | null }>();
      const h: WorkerHandle = {
        id: `fake${b.spawned}`,
        pid: undefined,
        keydId: `keyd-name-${b.spawned}`,
        stdin: new PassThrough(),
        stdout: new PassThrough(),
        stderr: new PassThrough(),
        exited: exit.promise,
        async kill() {
          exit.resolve({ code: null, signal: 'SIGKILL' });
          return exit.promise;
        },
      };
      b.handles.push(h);
      return h;
    },
  };
  return b;
}

function waitChange(m: EgressMonitor, want: boolean, ms: number): Promise<number | undefined> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    if (m.ok() === want) return resolve(0);
    const timer = setTimeout(() => resolve(undefined), ms);
    m.onChange((ok) => {
      if (ok === want) {
        clearTimeout(timer);
        resolve(Date.now() - t0);
      }
    });
  });
}

function linkPin(hook: string): string {
  const root = '/sys/fs/bpf/phantoma';
  const d = readdirSync(root).find((x) => x.startsWith(`${NAME}-`));
  const files = readdirSync(join(root, d!, 'workers'));
  return join(root, d!, 'workers', files.find((f) => f.startsWith(`link_${hook}_`))!);
}

function kernelAttached(cgroupDir: string): Array<{ attach_type: string; name: string }> {
  const r = spawnSync('bpftool', ['-j', 'cgroup', 'show', cgroupDir], { encoding: 'utf8' });
  return JSON.parse(r.stdout || '[]') as Array<{ attach_type: string; name: string }>;
}

t.test('verified by the kernel word and the live probe; the policy hash is stable and names mode and tags', async (t) => {
  const audit: AuditEvent[] = [];
  const m = monitorFor(w.socketPath, audit);
  await m.start();
  t.teardown(() => m.close());
  t.equal(m.ok(), true, m.reason() ?? 'verified');
  t.same(checkStatus(m.lastStatus()!, expected), []);
  t.match(audit, [{ type: 'egress_state', verified: true }]);
  t.equal(m.policyHash(), egressPolicyHash({ mode: 'enforce', expected, downloadAllow: [] }));
  t.not(m.policyHash(), egressPolicyHash({ mode: 'off' }), 'off hashes differently');
  const other = new Map(expected);
  other.set('egress', '0000000000000000');
  t.not(m.policyHash(), egressPolicyHash({ mode: 'enforce', expected: other, downloadAllow: [] }), 'another program, another hash');
  t.not(m.policyHash(), egressPolicyHash({ mode: 'enforce', expected, downloadAllow: ['tcp:10.0.0.1/32:443'] }), 'an allowlist entry changes the hash');
});

t.test('phantoma egress status: programs and tags by the kernel word, allowlists, policy hash; --probe', async (t) => {
  const r = await runPhantoma(['egress', 'status', '--probe', '--json', `--warden.socket=${w.socketPath}`], { timeoutMs: 30_000 });
  t.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  t.equal(j.verified, true);
  t.same(j.reasons, []);
  t.equal(j.policyHash, egressPolicyHash({ mode: 'enforce', expected, downloadAllow: [] }));
  t.equal(j.probe.refused, true);
  t.equal(j.status.sets.workers.programs.connect4[0].tag, expected.get('connect4'));
  const text = await runPhantoma(['egress', 'status', `--warden.socket=${w.socketPath}`], { timeoutMs: 30_000 });
  t.equal(text.code, 0);
  t.match(text.stdout, /egress filter: enforce, verified/);
  t.match(text.stdout, new RegExp(`connect4 +id \\d+ tag ${expected.get('connect4')} \\(built\\)`));
  t.match(text.stdout, /allowlist workers\/: empty/);
});

t.test('a program detached behind the daemon\'s back: noticed within the check interval, the gate closes', async (t) => {
  const m = monitorFor(w.socketPath);
  await m.start();
  t.teardown(() => m.close());
  t.equal(m.ok(), true);
  const inner = countingBackend();
  const gated = gateBackend(inner, m);
  const warm = gated.spawn({} as never, { lowPriority: false });
  t.equal(inner.spawned, 1, 'verified: a spawn goes through');
  const fakePool = { model: 'x', notReadyReason: () => undefined, acquire: async () => ({}) } as unknown as WorkerPool;
  const pool = gatePool(fakePool, m);

  const r = spawnSync('bpftool', ['link', 'detach', 'pinned', linkPin('connect4')], { encoding: 'utf8' });
  t.equal(r.status, 0, `bpftool link detach: ${r.stderr}`);
  t.notOk(kernelAttached(w.workersDir).some((p) => p.attach_type === 'cgroup_inet4_connect'), 'the kernel no longer lists connect4 on workers/');
  const ms = await waitChange(m, false, CHECK_MS + 2000);
  t.ok(ms !== undefined && ms <= CHECK_MS + 1000, `noticed after ${ms} ms (interval ${CHECK_MS} ms)`);
  t.match(m.reason(), /egress_programs: workers\/connect4: no program attached/);
  t.equal((await warm.exited).signal, 'SIGKILL', 'the live worker was ended');
  const deferred = gated.spawn({} as never, { lowPriority: false });
  t.equal(inner.spawned, 1, 'no worker starts while unverified');
  t.match(pool.notReadyReason(), /egress filter not verified/, '/readyz names the reason');
  await t.rejects(pool.acquire(), { code: 'egress_unverified' });
  await deferred.kill();
  const cli = await runPhantoma(['egress', 'status', `--warden.socket=${w.socketPath}`], { timeoutMs: 30_000 });
  t.equal(cli.code, 5, 'phantoma egress status exits 5 (egress_unverified)');
  t.match(cli.stdout, /NOT verified[\s\S]*connect4 +NOTHING ATTACHED[\s\S]*problem: workers\/connect4: no program attached/);

  // Re-attach by restarting the warden (it attaches fresh links before dropping old ones).
  await w.stop();
  w = await startWarden({ name: NAME, sockDir: dir });
  t.ok((await waitChange(m, true, 5000)) !== undefined, 're-verified after the warden re-attached');
});

t.test('SIGKILLed warden: programs stay attached, nothing reaches meanwhile, the gate opens only after re-verification', async (t) => {
  const m = monitorFor(w.socketPath);
  await m.start();
  t.teardown(() => m.close());
  t.equal(m.ok(), true);
  const inner = countingBackend();
  const gated = gateBackend(inner, m);

  await w.kill();
  const attached = kernelAttached(w.workersDir);
  t.same(attached.map((p) => p.attach_type).sort(), ['cgroup_inet4_connect', 'cgroup_inet6_connect', 'cgroup_inet_egress', 'cgroup_udp4_sendmsg', 'cgroup_udp6_sendmsg'], 'all five programs still attached (kernel word, via bpftool)');
  t.ok(await waitChange(m, false, CHECK_MS + 2000) !== undefined, 'the monitor noticed the warden is gone');
  t.match(m.reason(), /^warden_unreachable/);

  // Meanwhile: positive control, then the same attempt from a workers/ child is refused.
  const ok = `ok-${process.pid}-dead`;
  t.equal((await runAttempt(ATTEMPT, 'tcp', ns.v4, ns.tcpPort, ok)).result, 'ok');
  t.ok(await ns.listener.waitFor((e) => e.data === ok, 3000), 'positive control reached the listener');
  const cg = attemptCgroup(w.workersDir);
  try {
    for (const [mode, addr, port] of [['tcp', ns.v4, ns.tcpPort], ['tcp', ns.v6, ns.tcpPort], ['udp-sendto', ns.v4, ns.udpPort]] as const) {
      const tok = `dead-${mode}-${addr}-${process.pid}`;
      const r = await runAttempt(ATTEMPT, mode, addr, port, tok, cg.procs);
      t.equal(r.result, 'EPERM', `${mode} to ${addr} with the warden dead: EPERM`);
      t.notOk(await ns.listener.waitFor((e) => e.data === tok, 300), 'and it did not reach the listener');
    }
  } finally {
    cg.remove();
  }
  const deferred = gated.spawn({} as never, { lowPriority: false });
  t.equal(inner.spawned, 0, 'no worker starts while the warden is gone');

  w = await startWarden({ name: NAME, sockDir: dir });
  const back = await waitChange(m, true, CHECK_MS + 5000);
  t.ok(back !== undefined, 're-verified once the warden is back');
  t.equal(inner.spawned, 1, 'the deferred worker starts only then');
  t.equal(deferred.keydId, 'keyd-name-1', "and shows keyd's name for it (the gateway's prepare needs it)");
  await deferred.kill();
  const kinds = kernelAttached(w.workersDir).map((p) => p.attach_type);
  t.equal(kinds.length, 5, 'after the restart exactly one program per hook (old links detached after the new ones were in)');
});
