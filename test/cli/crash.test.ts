// Crash safety: a SIGKILLed warden and a SIGKILLed gateway leave hung workers behind; the next start kills
// and removes them (and their cgroups) before it serves.
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, readFileSync, existsSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ROOT } from '../helpers.ts';

const state = mkdtempSync(join(tmpdir(), 'phantoma-crash-'));
const cgroupName = `phantoma-crash-test-${process.pid}`;
const settings = [
  `--stateDir=${state}`, '--warden.start=true', `--warden.socket=${join(state, 'warden.sock')}`, `--warden.cgroupName=${cgroupName}`,
  '--gateway.host=127.0.0.1', '--gateway.port=0', '--gateway.metricsPort=0', '--gateway.tls=off', '--gateway.auth=none',
  '--inference.threads=1', '--pool.size=2',
];
const started: ChildProcess[] = [];
t.teardown(() => {
  for (const p of started) if (p.exitCode === null) p.kill('SIGKILL');
  rmSync(state, { recursive: true, force: true });
});

async function serve(): Promise<{ proc: ChildProcess; url: string; metrics: string }> {
  const proc = spawn(join(ROOT, 'bin', 'phantoma'), ['serve', '--json', ...settings], { stdio: ['ignore', 'pipe', 'pipe'] });
  started.push(proc);
  proc.stderr!.resume();
  const line = await new Promise<string>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error('serve printed nothing')), 60_000);
    proc.stdout!.on('data', (c: Buffer) => {
      out += c.toString();
      if (out.includes('\n')) {
        clearTimeout(timer);
        resolve(out.split('\n')[0]!);
      }
    });
  });
  const info = JSON.parse(line) as { url: string; metrics: string };
  for (let i = 0; i < 600; i++) {
    if ((await fetch(info.url + '/readyz')).status === 200 && /state="ready"\} 2/.test(await (await fetch(info.metrics)).text())) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  return { proc, ...info };
}

const childrenOf = (pid: number): number[] => {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
};
// Dead means gone, or a zombie waiting for a reaper (this VM's pid 1 reaps orphans lazily).
const alive = (pid: number): boolean => existsSync(`/proc/${pid}`) && !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));

function workerCgroups(): string[] {
  const out: string[] = [];
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').trim().split('\n')) {
    const f = line.split(' ');
    const fstype = f[f.indexOf('-') + 1];
    if (fstype !== 'cgroup2' && fstype !== 'cgroup') continue;
    // the warden puts its subtree under its own cgroup, which is the test's here
    for (const own of readFileSync('/proc/self/cgroup', 'utf8').trim().split('\n').map((l) => l.split(':')[2]!)) {
      const dir = join(f[4]!, own, cgroupName, 'workers');
      if (existsSync(dir)) for (const e of readdirSync(dir, { withFileTypes: true })) if (e.isDirectory()) out.push(join(dir, e.name));
    }
  }
  return [...new Set(out)];
}

t.test('SIGKILL the warden and then the gateway: the next start cleans everything before it serves', async (t) => {
  const first = await serve();
  const [wardenPid] = childrenOf(first.proc.pid!);
  t.ok(wardenPid, 'the node started a warden');
  const workers = childrenOf(wardenPid!);
  t.ok(workers.length >= 2, `the warden has isolated workers (${workers})`);
  t.ok(workerCgroups().length >= 2, 'and worker cgroups exist (the check can see them)');

  // A worker whose gateway is gone ends itself (EOF on its stdin), and a gateway that sees its warden gone
  // fails closed and ends its workers. The orphans the next start must clean up are workers that cannot
  // react: hung ones. SIGSTOP stands in for a hang, so what ends them below is the cleanup, nothing else.
  for (const w of workers) process.kill(w, 'SIGSTOP');
  t.teardown(() => {
    for (const w of workers) if (alive(w)) process.kill(w, 'SIGKILL');
  });
  process.kill(wardenPid!, 'SIGKILL');
  first.proc.kill('SIGKILL');
  await new Promise((r) => first.proc.once('exit', r));
  t.ok(workers.every(alive), 'hung workers outlive a SIGKILLed warden and gateway (so the cleanup below is what ends them)');

  const second = await serve();
  t.notOk(workers.some(alive), 'every worker of the crashed node is dead');
  // One directory per hierarchy (v2, v1 memory, v1 pids here) for each worker id.
  const ids = new Set(workerCgroups().map((d) => d.split('/').at(-1)));
  const newWorkers = childrenOf(childrenOf(second.proc.pid!)[0]!);
  t.equal(ids.size, newWorkers.length, `only the new node's worker cgroups exist (${ids.size})`);
  const res = await fetch(second.url + '/v1/chat/completions', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4 }) });
  t.equal(res.status, 200, 'and the new node serves');
  second.proc.kill('SIGTERM');
  t.equal(await new Promise((r) => second.proc.once('exit', r)), 0);
  t.same(workerCgroups(), [], 'a clean stop leaves no worker cgroup');
});
