// Issue 13: the systemd units in deploy/systemd, in a booted Debian 12 container (test/helpers/nspawn.ts;
// one boot for the whole file), and their sandbox exposure as systemd-analyze scores it.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { readFileSync, readlinkSync, mkdirSync, writeFileSync, rmSync, chmodSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from '../helpers.ts';
import { bootContainer, type Container } from '../helpers/nspawn.ts';
import { CP_PORT, DEPLOY, GATEWAY_PORT, RUNNING_UNITS, UNITS, installNode, must, nodeConfig, releaseBinds, releaseSnapshot, removeSnapshot, show, waitFor } from './systemd-rig.ts';

const started = Date.now();

// ---------------------------------------------------------------- exposure (host, offline)

/** Ceilings: ≤ 2.0 for every unprivileged unit (issue 13); the warden's is its measured value. */
const EXPOSURE_CEILING: Record<(typeof UNITS)[number], number> = {
  'phantoma.service': 2.0,
  'phantoma-keyd.service': 2.0,
  'phantoma-control-plane.service': 2.0,
  'phantoma-rollback.service': 2.0,
  'phantoma-warden.service': 4.1,
};

t.test('systemd-analyze security --offline=yes: exposure of every unit', async (t) => {
  for (const unit of UNITS) {
    const r = spawnSync('systemd-analyze', ['security', '--offline=yes', '--no-pager', join(DEPLOY, unit)], { encoding: 'utf8', timeout: 60_000 });
    const m = /Overall exposure level for \S+: (\d+\.\d)/.exec(r.stdout);
    t.ok(m, `${unit}: systemd-analyze printed an overall exposure (exit ${r.status}; ${r.stderr.trim().slice(0, 300)})`);
    const score = Number(m?.[1]);
    t.ok(score <= EXPOSURE_CEILING[unit], `${unit}: exposure ${score} ≤ ${EXPOSURE_CEILING[unit]}`);
    t.comment(`${unit}: exposure ${score}`);
  }
  // What the numbers stand for, read back from the unit files.
  const gw = readFileSync(join(DEPLOY, 'phantoma.service'), 'utf8');
  for (const line of ['Type=notify', 'NotifyAccess=main', 'CapabilityBoundingSet=', 'AmbientCapabilities=', 'NoNewPrivileges=yes', 'LimitCORE=0', 'UMask=0077', 'SystemCallFilter=@system-service @pkey', 'ProtectSystem=strict', 'Restart=on-failure', 'OnFailure=phantoma-rollback.service'])
    t.match(gw, new RegExp(`^${line.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`, 'm'), `phantoma.service has ${line}`);
  t.notMatch(gw, /^MemoryDenyWriteExecute=yes/m, 'no MemoryDenyWriteExecute (V8 JIT)');
  t.notMatch(gw, /^IPAddressDeny=/m, 'no IPAddressDeny (it would cut off clients)');
  const warden = readFileSync(join(DEPLOY, 'phantoma-warden.service'), 'utf8');
  t.match(warden, /^Delegate=yes$/m, 'the warden owns its delegated subtree');
  t.match(warden, /^CapabilityBoundingSet=CAP_SYS_ADMIN CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SETUID CAP_SETGID CAP_SETPCAP CAP_CHOWN CAP_KILL CAP_DAC_READ_SEARCH$/m, "the warden's capability set");
  t.match(warden, /^SystemCallFilter=@system-service @pkey bpf perf_event_open mount umount2 mount_setattr$/m, 'the privileged calls are listed one by one, not as @privileged/@debug/@mount');
});

// ---------------------------------------------------------------- the booted container

let c: Container | undefined;
let release: string | undefined;
t.teardown(async () => {
  await c?.stop();
  if (release) removeSnapshot(release);
  t.comment(`systemd test file: ${Math.round((Date.now() - started) / 1000)} s`);
});

const chat = `
import json, sys, urllib.request
req = urllib.request.Request('http://127.0.0.1:8443/v1/chat/completions', data=json.dumps({'model': 'tiny', 'messages': [{'role': 'user', 'content': 'hello'}], 'max_tokens': 8}).encode(), headers={'content-type': 'application/json'})
try:
    r = urllib.request.urlopen(req, timeout=60)
    print(json.dumps({'status': r.status, 'body': json.loads(r.read())}))
except Exception as e:
    print(json.dumps({'status': getattr(e, 'code', 0), 'error': str(e)}))
`;

async function chatOnce(c: Container): Promise<{ status: number; body?: { choices: Array<{ message: { content: string }; finish_reason: string }> }; error?: string }> {
  const r = await c.exec(['python3', '-'], { input: chat, timeoutMs: 90_000 });
  return JSON.parse(r.stdout.trim() || '{"status":-1}') as { status: number };
}

async function cursor(c: Container): Promise<string> {
  const r = await c.exec(['journalctl', '-n', '0', '--show-cursor']);
  const m = /-- cursor: (\S+)/.exec(r.stdout);
  if (!m) throw new Error(`no journal cursor: ${r.stdout} ${r.stderr}`);
  return m[1]!;
}

async function journalSince(c: Container, cur: string, units: string[], extra: string[] = []): Promise<string> {
  const r = await c.exec(['journalctl', '--no-pager', '--after-cursor', cur, ...units.flatMap((u) => ['-u', u]), ...extra]);
  return r.stdout;
}

async function waitActive(c: Container, unit: string, timeoutMs: number, notPid?: string): Promise<Record<string, string>> {
  return waitFor(`${unit} active (running)`, timeoutMs, async () => {
    const s = await show(c, unit, ['ActiveState', 'SubState', 'MainPID', 'NRestarts', 'StatusText', 'Result']);
    return s.ActiveState === 'active' && s.SubState === 'running' && s.MainPID !== '0' && s.MainPID !== notPid ? s : undefined;
  });
}

const count = (text: string, re: RegExp): number => text.split('\n').filter((l) => re.test(l)).length;

t.test('in a booted Debian 12 container', async (t) => {
  const b = spawnSync('bash', [join(ROOT, 'scripts', 'build.sh')], { encoding: 'utf8', timeout: 300_000 });
  t.equal(b.status, 0, `scripts/build.sh: ${b.stderr}`);
  release = releaseSnapshot();
  c = await bootContainer({ binds: releaseBinds(release) });
  t.comment(`booted ${c.name} (leader ${c.leader}) at ${Math.round((Date.now() - started) / 1000)} s`);
  await installNode(c);
  const ct = c;

  await t.test('all units active (running), READY only after the egress filter was verified', async (t) => {
    const start = await ct.exec(['systemctl', 'start', 'phantoma.service', 'phantoma-control-plane.service'], { timeoutMs: 120_000 });
    t.equal(start.code, 0, `systemctl start: ${start.stderr}`);
    for (const unit of RUNNING_UNITS) {
      const s = await show(ct, unit, ['ActiveState', 'SubState']);
      t.same(s, { ActiveState: 'active', SubState: 'running' }, `${unit} is active (running)`);
    }
    t.equal((await show(ct, 'phantoma.service', ['StatusText'])).StatusText, 'serving tiny', 'the gateway STATUS= says it serves');
    t.equal((await show(ct, 'phantoma-warden.service', ['StatusText'])).StatusText, 'serving', 'the warden sent READY=1 itself');
    t.equal((await show(ct, 'phantoma-control-plane.service', ['StatusText'])).StatusText, `serving https://127.0.0.1:${CP_PORT}`, 'the control plane sent READY=1 once it listened');
    // Who runs with what: the gateway unprivileged with no capability at all; the warden with its set.
    const gwPid = (await show(ct, 'phantoma.service', ['MainPID'])).MainPID!;
    const st = (await must(ct, ['cat', `/proc/${gwPid}/status`], 'gateway status')).stdout;
    const uid = (await must(ct, ['id', '-u', 'phantoma'], 'id')).stdout.trim();
    t.match(st, new RegExp(`^Uid:\\s+${uid}\\s+${uid}\\s+${uid}\\s+${uid}$`, 'm'), 'the gateway runs as the phantoma user');
    t.match(st, /^CapEff:\s+0000000000000000$/m, 'the gateway has no effective capability');
    t.match(st, /^CapBnd:\s+0000000000000000$/m, 'nor any in its bounding set');
    t.match(st, /^NoNewPrivs:\s+1$/m, 'no_new_privs');
    t.match(st, /^Seccomp:\s+2$/m, 'a seccomp filter');
    const wdPid = (await show(ct, 'phantoma-warden.service', ['MainPID'])).MainPID!;
    const ws = (await must(ct, ['cat', `/proc/${wdPid}/status`], 'warden status')).stdout;
    const capEff = /^CapEff:\s+([0-9a-f]+)$/m.exec(ws)?.[1];
    const decoded = (await must(ct, ['capsh', `--decode=${capEff}`], 'capsh')).stdout.trim();
    t.equal(decoded.split('=')[1], 'cap_chown,cap_dac_read_search,cap_kill,cap_setgid,cap_setuid,cap_setpcap,cap_net_admin,cap_sys_admin,cap_perfmon,cap_bpf', "the warden's effective capabilities are exactly its set");
    // The ordering, from the journal's monotonic clock: the gateway's own "egress filter verified" line,
    // then its READY line, then systemd's "Started" (which systemd logs when READY=1 arrives).
    const j = await ct.exec(['journalctl', '--no-pager', '-b', '-u', 'phantoma.service', '-o', 'json', '--output-fields=MESSAGE,__MONOTONIC_TIMESTAMP,_PID']);
    const entries = j.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l) as { MESSAGE?: string; __MONOTONIC_TIMESTAMP: string });
    const at = (re: RegExp): number => Number(entries.find((e) => typeof e.MESSAGE === 'string' && re.test(e.MESSAGE))?.__MONOTONIC_TIMESTAMP ?? NaN);
    const confined = at(/the gateway's own connections are now limited/);
    const verified = at(/egress filter verified \(kernel program tags and live probe\)/);
    const readySent = at(/READY=1 sent to systemd/);
    const startedLine = at(/^Started phantoma\.service/);
    t.ok(confined > 0 && verified > 0 && readySent > 0 && startedLine > 0, `all four lines are in the journal (${confined}, ${verified}, ${readySent}, ${startedLine})`);
    t.ok(confined <= verified, "the gateway's own cgroup was confined before the filter counted as verified");
    t.ok(verified < readySent, 'the filter was verified before READY=1 was sent');
    t.ok(readySent <= startedLine, 'systemd marked the unit started only after READY=1');
    t.match((await ct.exec(['cat', '/etc/systemd/journald.conf.d/phantoma.conf'])).stdout, /^Storage=volatile$/m, 'the journald drop-in is installed');
    const runtime = await ct.exec(['sh', '-c', 'ls /run/log/journal/*/system.journal']);
    t.equal(runtime.code, 0, `journald writes to /run/log/journal (RAM) after the services started: ${runtime.stderr}`);
  });

  await t.test('a chat request succeeds through the gateway unit', async (t) => {
    const r = await chatOnce(ct);
    t.equal(r.status, 200, `chat: ${JSON.stringify(r).slice(0, 400)}`);
    t.ok((r.body?.choices[0]?.message.content.length ?? 0) > 0, 'an answer');
    t.match(r.body?.choices[0]?.finish_reason ?? '', /^(length|stop)$/);
  });

  await t.test("the gateway's own connections: to the control plane only (socket BPF programs on its cgroup)", async (t) => {
    // A process joined to the gateway unit's cgroup (as the container sees it: the gateway's own
    // /proc/<pid>/cgroup under the cgroup2 mount) is filtered exactly like the gateway.
    const gwPid = (await show(ct, 'phantoma.service', ['MainPID'])).MainPID!;
    const connect = async (port: number, inGateway: boolean): Promise<string> => {
      const py = `import socket\ns = socket.socket()\ntry:\n  s.connect(('127.0.0.1', ${port}))\n  print('connected')\nexcept OSError as e:\n  print(e.errno)`;
      const join_ = inGateway ? `echo $$ > "$(findmnt -n -t cgroup2 -o TARGET | head -n 1)$(sed -n 's/^0:://p' /proc/${gwPid}/cgroup)/cgroup.procs" && ` : '';
      return (await must(ct, ['sh', '-c', `${join_}exec python3 -c "$0"`, py], 'python3 connect')).stdout.trim();
    };
    const cur = await cursor(ct);
    t.equal(await connect(GATEWAY_PORT, false), 'connected', "positive control: outside the gateway's cgroup the gateway's port is reachable");
    t.equal(await connect(CP_PORT, true), 'connected', "inside: the control plane (the warden's PHANTOMA_GATEWAY_EGRESS) is reachable");
    t.equal(await connect(GATEWAY_PORT, true), '1', 'inside: anything else is refused with EPERM (errno 1)');
    const log = await waitFor('the deny in the gateway\'s log', 15_000, async () => {
      const l = await journalSince(ct, cur, ['phantoma.service']);
      return /egress denied/.test(l) ? l : undefined;
    });
    t.match(log, new RegExp(`"set":"gateway".*"port":${GATEWAY_PORT}|"port":${GATEWAY_PORT}.*"set":"gateway"`), 'the gateway logged the deny with set "gateway"');
    t.equal((await show(ct, 'phantoma.service', ['StatusText'])).StatusText, 'serving tiny', 'and keeps serving');
  });

  await t.test('no READY=1 while the egress filter cannot be verified', async (t) => {
    // The release's record of the programs it built no longer matches what the kernel runs (as if the
    // filter attached were not ours): the gateway must stay "activating" and say why, not become ready.
    const tagsPath = join(release!, 'native/warden/build/egress.tags');
    const tags = readFileSync(tagsPath, 'utf8');
    writeFileSync(tagsPath, tags.replace(/^(\S+) ([0-9a-f]{16})$/m, (_l, hook: string) => `${hook} 0000000000000000`));
    try {
      const cur = await cursor(ct);
      await must(ct, ['systemctl', 'restart', '--no-block', 'phantoma.service'], 'restart --no-block');
      const s = await waitFor('STATUS= naming the unverified filter', 60_000, async () => {
        const x = await show(ct, 'phantoma.service', ['ActiveState', 'SubState', 'StatusText']);
        return /^starting: waiting for egress filter not verified/.test(x.StatusText ?? '') ? x : undefined;
      });
      t.equal(s.ActiveState, 'activating', `still activating: ${s.StatusText}`);
      await new Promise((r) => setTimeout(r, 3000));
      t.equal((await show(ct, 'phantoma.service', ['ActiveState'])).ActiveState, 'activating', 'and still not ready a few seconds later');
      const log = await journalSince(ct, cur, ['phantoma.service']);
      t.notMatch(log, /READY=1 sent to systemd/, 'READY=1 was never sent');
      t.notMatch(log, /Started phantoma\.service/, 'systemd never saw the unit started');
    } finally {
      writeFileSync(tagsPath, tags);
    }
    await must(ct, ['systemctl', 'restart', 'phantoma.service'], 'restart', { timeoutMs: 120_000 });
    t.equal((await waitActive(ct, 'phantoma.service', 60_000)).StatusText, 'serving tiny', 'with the right tags it becomes ready');
  });

  await t.test('a frozen daemon (SIGSTOP) is restarted by the watchdog and comes back ready', async (t) => {
    // A short watchdog, as configuration (a drop-in), not a code switch.
    mkdirSync(join(ct.root, 'etc/systemd/system/phantoma.service.d'), { recursive: true });
    const dropIn = join(ct.root, 'etc/systemd/system/phantoma.service.d/test-watchdog.conf');
    writeFileSync(dropIn, '[Service]\nWatchdogSec=6\nTimeoutAbortSec=3\n');
    await must(ct, ['systemctl', 'daemon-reload'], 'daemon-reload');
    await must(ct, ['systemctl', 'reset-failed', 'phantoma.service'], 'reset-failed');
    await must(ct, ['systemctl', 'restart', 'phantoma.service'], 'restart', { timeoutMs: 120_000 });
    const before = await waitActive(ct, 'phantoma.service', 60_000);
    t.equal((await show(ct, 'phantoma.service', ['WatchdogUSec'])).WatchdogUSec, '6s', 'the drop-in is in force');
    const cur = await cursor(ct);
    await must(ct, ['kill', '-STOP', before.MainPID!], 'SIGSTOP');
    const after = await waitActive(ct, 'phantoma.service', 120_000, before.MainPID);
    const log = await journalSince(ct, cur, ['phantoma.service']);
    t.match(log, /phantoma\.service: Watchdog timeout \(limit 6s\)!/, 'systemd saw the watchdog expire');
    t.match(log, new RegExp(`Killing process ${before.MainPID} \\(\\S+\\) with signal SIGABRT`), 'and killed the frozen process');
    t.match(log, /Failed with result 'watchdog'/);
    t.equal(Number(after.NRestarts), Number(before.NRestarts) + 1, 'one automatic restart');
    t.equal(after.StatusText, 'serving tiny', 'ready again');
    t.equal((await chatOnce(ct)).status, 200, 'and serving');
    rmSync(dropIn);
    await must(ct, ['systemctl', 'daemon-reload'], 'daemon-reload');
  });

  await t.test('a bad configuration: a clear journal message and a bounded restart loop', async (t) => {
    const cfgPath = join(ct.root, 'etc/phantoma/node.json');
    const good = readFileSync(cfgPath, 'utf8');
    writeFileSync(cfgPath, JSON.stringify({ ...nodeConfig(), gateway: { ...(nodeConfig().gateway as object), port: 'eighty' } }));
    await must(ct, ['systemctl', 'reset-failed', 'phantoma.service'], 'reset-failed');
    const cur = await cursor(ct);
    const r = await ct.exec(['systemctl', 'restart', 'phantoma.service'], { timeoutMs: 120_000 });
    t.not(r.code, 0, 'systemctl restart reports the failure');
    const s = await waitFor('phantoma.service failed', 90_000, async () => {
      const x = await show(ct, 'phantoma.service', ['ActiveState', 'NRestarts']);
      return x.ActiveState === 'failed' ? x : undefined;
    });
    // let OnFailure= run its condition
    await waitFor('phantoma-rollback.service to settle', 30_000, async () => ((await journalSince(ct, cur, ['phantoma-rollback.service'])).includes('phantoma-rollback.service') && (await show(ct, 'phantoma-rollback.service', ['ActiveState'])).ActiveState !== 'activating' ? true : undefined));
    const log = await journalSince(ct, cur, ['phantoma.service', 'phantoma-rollback.service']);
    t.equal(count(log, /gateway\.port: expected integer, got "eighty" \[config_invalid\]/), 3, 'the reason, once per attempt: StartLimitBurst=3 attempts');
    t.match(log, /phantoma\.service: Start request repeated too quickly\./, 'then the start limit ends the loop');
    t.equal(s.ActiveState, 'failed');
    t.match(log, /phantoma-rollback\.service: Skipped due to 'exec-condition'/, 'no trial was on: nothing is rolled back');
    t.equal(readlinkSync(join(ct.root, 'opt/phantoma/current')), 'slots/a', 'current is untouched');
    // Fixed configuration: back in service.
    writeFileSync(cfgPath, good);
    await must(ct, ['systemctl', 'reset-failed', 'phantoma.service'], 'reset-failed');
    await must(ct, ['systemctl', 'start', 'phantoma.service'], 'start', { timeoutMs: 120_000 });
    await waitActive(ct, 'phantoma.service', 60_000);
  });

  await t.test('a release that fails its trial boot is rolled back by systemd', async (t) => {
    // Slot b: a release whose gateway crashes at start; `phantoma update apply` leaves exactly this state.
    const b = join(ct.root, 'opt/phantoma/slots/b');
    mkdirSync(join(b, 'bin'), { recursive: true });
    writeFileSync(join(b, 'bin/phantoma'), '#!/bin/sh\necho "phantoma: release 9.9.9-broken cannot start (simulated crash)" >&2\nexit 1\n');
    chmodSync(join(b, 'bin/phantoma'), 0o755);
    writeFileSync(join(b, '.phantoma-slot.json'), JSON.stringify({ version: '9.9.9-broken' }) + '\n');
    writeFileSync(join(ct.root, 'opt/phantoma/update-state.json'), JSON.stringify({ current: 'b', previous: 'a', trial: { slot: 'b', version: '9.9.9-broken', previous: 'a', startedAt: new Date().toISOString(), deadlineMs: 180_000 } }, null, 1) + '\n');
    await must(ct, ['sh', '-c', 'ln -sfn slots/b /opt/phantoma/current.new && mv -T /opt/phantoma/current.new /opt/phantoma/current'], 'switch current');
    await must(ct, ['systemctl', 'reset-failed', 'phantoma.service'], 'reset-failed');
    const before = await show(ct, 'phantoma.service', ['MainPID']);
    const cur = await cursor(ct);
    await ct.exec(['systemctl', 'restart', 'phantoma.service'], { timeoutMs: 120_000 });
    try {
      await waitFor('the rollback to finish', 120_000, async () => ((await journalSince(ct, cur, ['phantoma-rollback.service'])).includes('Finished phantoma-rollback.service') ? true : undefined));
    } catch (err) {
      t.comment((await journalSince(ct, cur, ['phantoma.service', 'phantoma-rollback.service'])).slice(-6000));
      throw err;
    }
    const s = await waitActive(ct, 'phantoma.service', 120_000, before.MainPID);
    const log = await journalSince(ct, cur, ['phantoma.service', 'phantoma-rollback.service']);
    t.equal(count(log, /release 9\.9\.9-broken cannot start/), 3, 'the new release was tried StartLimitBurst=3 times');
    t.match(log, /Triggering OnFailure= dependencies/, 'then OnFailure= started the rollback unit');
    t.match(log, /trial boot of 9\.9\.9-broken \(slot b\) failed: switched back to slot a/);
    t.equal(readlinkSync(join(ct.root, 'opt/phantoma/current')), 'slots/a', 'current points at the previous slot again');
    const state = JSON.parse(readFileSync(join(ct.root, 'opt/phantoma/update-state.json'), 'utf8')) as { current: string; trial?: unknown; last?: { result: string; version: string; code: string } };
    t.equal(state.current, 'a');
    t.equal(state.trial, undefined, 'the trial is over');
    t.match(state.last, { result: 'rolled_back', version: '9.9.9-broken', code: 'update_trial_failed' });
    t.equal(s.StatusText, 'serving tiny', 'the old release is ready again');
    const st = await must(ct, ['cat', `/proc/${s.MainPID}/cmdline`], 'cmdline');
    t.match(st.stdout, /\/opt\/phantoma\/slots\/a\//, 'and runs from slot a');
    t.equal((await chatOnce(ct)).status, 200, 'and serves');
    // The outcome reached the node's hash-chained audit log: written by the root rollback unit into the
    // pending file (handed to the gateway's user), moved into the chain by the restarted gateway.
    const audit = readFileSync(join(ct.root, 'var/lib/phantoma/audit/audit.log'), 'utf8');
    t.match(audit, /"type":"update_trial"[^\n]*"passed":false/, 'update_trial passed=false is in the audit log');
    t.match(audit, /"type":"update_rolled_back"[^\n]*"from":"9\.9\.9-broken"/, 'update_rolled_back is in the audit log');
    t.equal((await ct.exec(['test', '-e', '/var/lib/phantoma/audit/pending.jsonl'])).code, 1, 'the pending file was drained');
    const verify = await ct.exec(['runuser', '-u', 'phantoma', '--', '/opt/phantoma/current/bin/phantoma', 'audit', 'verify', '--config', '/etc/phantoma/node.json']);
    t.equal(verify.code, 0, `phantoma audit verify: ${verify.stdout}${verify.stderr}`);
  });
});
