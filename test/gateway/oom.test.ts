// A worker that needs more memory than its cgroup allows: the kernel's OOM killer ends it mid-request,
// the client gets a clean 502 worker_out_of_memory, the audit log and metrics say so, and the pool
// recovers to full size with workers that have their configured limit again.
//
// A real pool worker under the warden, a real request, the real kernel OOM killer: after the worker is
// warm, the test (root) tightens that one worker's cgroup limit to just above what it holds idle; a
// ~900-token prompt then makes it touch ~5 MiB more (compute buffers) than at rest.
import t from 'tap';
import { readFileSync, writeFileSync, existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { startTestNode, isAlive, until } from './fixture.ts';

const longPrompt = Array.from({ length: 300 }, (_, i) => `w${i % 97}`).join(' ');
const request = { model: 'tiny', messages: [{ role: 'user', content: longPrompt }], max_tokens: 4 };

/** The worker's memory cgroup directory and its usage/limit files, v2 where memory is delegated, else v1. */
function memoryCgroup(pid: number): { dir: string; usage: string; limits: string[] } {
  const mounts = readFileSync('/proc/self/mountinfo', 'utf8').split('\n');
  const mountOf = (pred: (fstype: string, superOpts: string) => boolean): string | undefined => {
    for (const line of mounts) {
      const [pre, post] = line.split(' - ');
      if (!pre || !post) continue;
      const [fstype, , superOpts = ''] = post.split(' ');
      if (pred(fstype!, superOpts)) return pre.split(' ')[4];
    }
    return undefined;
  };
  for (const line of readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n')) {
    const [, ctrls, path] = line.split(':');
    if (ctrls !== undefined && ctrls.split(',').includes('memory')) {
      const dir = join(mountOf((fs, opts) => fs === 'cgroup' && opts.split(',').includes('memory'))!, path!);
      const memsw = join(dir, 'memory.memsw.limit_in_bytes');
      // v1: the memory limit first (memsw may never be below it), then memsw to the same value.
      return { dir, usage: join(dir, 'memory.usage_in_bytes'), limits: [join(dir, 'memory.limit_in_bytes'), ...(existsSync(memsw) ? [memsw] : [])] };
    }
  }
  const v2 = /^0::(.*)$/m.exec(readFileSync(`/proc/${pid}/cgroup`, 'utf8'))![1]!;
  const dir = join(mountOf((fs) => fs === 'cgroup2')!, v2);
  return { dir, usage: join(dir, 'memory.current'), limits: [join(dir, 'memory.max')] };
}

const n = await startTestNode({ pool: { size: 1, maxActive: 1 }, workers: { memoryMaxBytes: 512 << 20 } });
t.teardown(() => n.close());
const pool = n.node.models[0]!.pool;

t.test('the same long prompt is served by a worker with its configured limit (positive control)', async (t) => {
  const res = await n.post('/v1/chat/completions', request);
  t.equal(res.status, 200);
  t.ok(((await res.json()) as any).usage.prompt_tokens > 800, 'a long prompt');
  await n.waitReady(60_000);
});

t.test('a worker pushed past its memory limit is OOM-killed: 502 worker_out_of_memory, pool recovers', async (t) => {
  // How much a request grows a worker beyond its idle usage varies a little with load (GC timing, kernel
  // memory): if a request still fits, the next warm worker gets less headroom (at most three tries).
  let res: Response | undefined;
  let pid = 0;
  let cg: ReturnType<typeof memoryCgroup> | undefined;
  for (const headroom of [1 << 20, 512 << 10, 128 << 10]) {
    await n.waitReady(60_000);
    const worker = pool.workers()[0]!;
    pid = worker.pid!;
    cg = memoryCgroup(pid);
    t.match(cg.dir, new RegExp(`/workers/${worker.id}$`), "the worker's own cgroup");
    const configured = readFileSync(cg.limits[0]!, 'utf8').trim();
    t.equal(configured, String(512 << 20), 'the warden set the configured limit');
    // Reclaim what the kernel can take back without killing (page cache charged to the worker) before the
    // usage is read: otherwise that reclaimable cache is headroom the request can grow into without an OOM.
    for (const [file, value] of [['memory.force_empty', '0'], ['memory.reclaim', String(1 << 30)]] as const) {
      try {
        if (existsSync(join(cg.dir, file))) writeFileSync(join(cg.dir, file), value);
      } catch {
        /* nothing more could be reclaimed */
      }
    }
    const tight = Number(readFileSync(cg.usage, 'utf8')) + headroom;
    for (const f of cg.limits) writeFileSync(f, String(tight));
    res = await n.post('/v1/chat/completions', request);
    if (res.status !== 200) break;
    t.comment(`the request fit in ${headroom} bytes of headroom; the next worker gets less`);
  }
  t.equal(res!.status, 502);
  const err = ((await res!.json()) as any).error;
  t.equal(err.code, 'worker_out_of_memory');
  t.equal(err.type, 'server_error');
  await until(() => !isAlive(pid), 5_000, `worker ${pid} to be gone`);
  t.notOk(existsSync(cg!.dir), 'its cgroup was removed');

  await n.waitReady(60_000);
  t.same(pool.stats(), { starting: 0, ready: 1, busy: 0, queued: 0 }, 'the pool is full again');
  const next = pool.workers()[0]!;
  t.not(next.pid, pid, 'with a new worker');
  t.equal(readFileSync(memoryCgroup(next.pid!).limits[0]!, 'utf8').trim(), String(512 << 20), 'which has the configured limit');
  const again = await n.post('/v1/chat/completions', request);
  t.equal(again.status, 200, 'and the same request is served again');

  const metrics = await (await fetch(n.node.metricsUrl)).text();
  t.match(metrics, /phantoma_workers_ended_total\{model="tiny",outcome="out_of_memory"\} 1/);
  const auditDir = join(n.stateDir, 'audit');
  const entries = readdirSync(auditDir).flatMap((f) => readFileSync(join(auditDir, f), 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)));
  const ended = entries.filter((e) => e.type === 'worker_ended' && e.outcome === 'out_of_memory');
  t.equal(ended.length, 1, 'one audit entry for the OOM-killed worker');
  t.equal(ended[0].verified, true, 'its end was verified');
});
