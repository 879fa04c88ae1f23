// Benchmark: what the Docker worker backend costs (issue 6), on a private dockerd (test/ephemeral/docker-rig.ts).
// (1) Container start and removal latency, p50/p95: a container with exactly a worker's settings
//     (workerContainerConfig) whose command prints one line — create + attach + start until that line
//     arrives; then force-remove + verify (inspect 404). Alternated with the same for a plain process.
// (2) Worker time-to-ready (the real worker: runtime, model load, warm-up), docker vs process, alternated.
// (3) Added latency per request: two nodes (docker backend, process backend) with warm pools, one request
//     at a time, alternating A/B, each node's pool refilled before its next request; per-request client
//     latency (non-streamed chat, 8 tokens), p50/p95, and the median difference.
// Loopback and unix sockets only. Needs root.
//
// Run: . scripts/env.sh && node bench/docker.bench.ts [--starts N] [--requests N]
import { parseArgs } from 'node:util';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { createLogger } from '../src/logger.ts';
import { validateConfig } from '../src/config/load.ts';
import { startNode, threadpoolShimPath, type RunningNode } from '../src/main.ts';
import { projectRoot } from '../src/paths.ts';
import { createDockerBackend, workerContainerConfig, type DockerBackendOptions } from '../src/ephemeral/docker-backend.ts';
import { createProcessBackend } from '../src/ephemeral/process-backend.ts';
import { workerCommand } from '../src/ephemeral/worker-command.ts';
import type { WorkerBackend } from '../src/ephemeral/backend.ts';
import { startTestDockerd } from '../test/ephemeral/docker-rig.ts';
import { tinyModelPath } from '../test/helpers.ts';

const { values } = parseArgs({ options: { starts: { type: 'string', default: '20' }, requests: { type: 'string', default: '20' } } });
const STARTS = Number(values.starts);
const REQUESTS = Number(values.requests);
const logger = createLogger({ level: 'warn' });
const root = projectRoot();
const q = (xs: number[], p: number): number => {
  const s = [...xs].sort((a, b) => a - b);
  return Math.round(s[Math.min(s.length - 1, Math.floor(p * (s.length - 1) + 0.5))]! * 10) / 10;
};
const stats = (xs: number[]): { p50: number; p95: number; n: number } => ({ p50: q(xs, 0.5), p95: q(xs, 0.95), n: xs.length });
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const dockerd = await startTestDockerd();
try {
  const modelPath = await tinyModelPath();
  const opts: DockerBackendOptions = {
    docker: dockerd.docker,
    image: dockerd.image,
    cgroupParent: `/phantoma-bench-${process.pid}/workers`,
    uidRange: { from: 61000, to: 61999 },
    memoryBytes: 1 << 30,
    pidsMax: 128,
    nanoCpus: 2e9,
    tmpfsBytes: 64 << 20,
    preloadThreadpool: true,
    logger,
  };
  const spec = { modelName: 'tiny', modelPath, contextSize: 2048, threads: 1, batchSize: 512, logLevel: 'warn' };
  const hello = "process.stdout.write('hello\\n')";

  // ---- (1) start and removal ----
  const containerStart: number[] = [];
  const containerRemove: number[] = [];
  const processStart: number[] = [];
  let unverified = 0;
  for (let i = 0; i < STARTS; i++) {
    const cfg = workerContainerConfig(opts, spec, `bench${process.pid}x${i}`, 61000 + i);
    const t0 = performance.now();
    const c = await dockerd.docker.createContainer({ ...cfg, Cmd: [cfg.Cmd![0]!, '-e', hello], OpenStdin: false, AttachStdin: false, StdinOnce: false });
    const stream = await c.attach({ stream: true, stdout: true, stderr: true });
    const out = new PassThrough();
    const got = new Promise<void>((r) => out.once('data', () => r()));
    c.modem.demuxStream(stream, out, new PassThrough());
    await c.start();
    await Promise.race([got, sleep(10_000)]);
    const t1 = performance.now();
    await c.remove({ force: true });
    let gone = false;
    try {
      await c.inspect();
    } catch (err) {
      gone = (err as { statusCode?: number }).statusCode === 404;
    }
    const t2 = performance.now();
    if (!gone) unverified++;
    containerStart.push(t1 - t0);
    containerRemove.push(t2 - t1);
    // B: the same program as a plain child process, until its first line; then it has exited.
    const p0 = performance.now();
    await new Promise<void>((resolve) => {
      const child = spawn(process.execPath, ['-e', hello], { stdio: ['ignore', 'pipe', 'ignore'] });
      child.stdout.once('data', () => resolve());
    });
    processStart.push(performance.now() - p0);
    process.stderr.write(`start/remove ${i + 1}/${STARTS}\n`);
  }

  // ---- (2) real worker to ready, alternating ----
  const readyMs: Record<'docker' | 'process', number[]> = { docker: [], process: [] };
  const endMs: Record<'docker' | 'process', number[]> = { docker: [], process: [] };
  const backends: Record<'docker' | 'process', WorkerBackend> = {
    docker: createDockerBackend(opts),
    process: createProcessBackend({ command: workerCommand(), cwd: tmpdir(), preload: [threadpoolShimPath()] }),
  };
  for (let i = 0; i < Math.max(4, Math.floor(STARTS / 2)); i++) {
    for (const name of ['docker', 'process'] as const) {
      const t0 = performance.now();
      const h = backends[name].spawn(spec, { lowPriority: false });
      h.stderr.resume();
      await new Promise<void>((resolve, reject) => {
        h.stdout.on('data', (c: Buffer) => (c.toString().includes('"ready"') ? resolve() : undefined));
        void h.exited.then(() => reject(new Error(`${name} worker exited before ready`)));
      });
      const t1 = performance.now();
      await h.kill();
      readyMs[name].push(t1 - t0);
      endMs[name].push(performance.now() - t1);
    }
    process.stderr.write(`ready ${i + 1}\n`);
  }

  // ---- (3) per-request latency, alternating A/B ----
  async function node(backend: 'docker' | 'process'): Promise<{ node: RunningNode; state: string }> {
    const state = mkdtempSync(join(tmpdir(), 'phantoma-bench-node-'));
    const r = validateConfig({
      stateDir: state,
      cacheDir: join(root, '.cache'),
      logLevel: 'warn',
      gateway: { host: '127.0.0.1', port: 0, metricsPort: 0, tls: 'off', auth: 'none', maxQueue: 1000 },
      pool: { size: 2, maxActive: 1 },
      inference: { threads: 1 },
      workers: { backend },
      docker: { socket: dockerd.socketPath, cgroupParent: `/phantoma-bench-${process.pid}-node/workers` },
    });
    if (!r.ok) throw new Error(JSON.stringify(r.issues));
    return { node: await startNode(r.config, { logger }), state };
  }
  const nodes = { docker: await node('docker'), process: await node('process') };
  const warm = async (n: RunningNode): Promise<void> => {
    const deadline = Date.now() + 60_000;
    while (n.models[0]!.pool.stats().ready < 2) {
      if (Date.now() > deadline) throw new Error('pool did not refill');
      await sleep(20);
    }
  };
  const lat: Record<'docker' | 'process', number[]> = { docker: [], process: [] };
  try {
    for (let i = 0; i < REQUESTS; i++) {
      for (const name of (i % 2 ? ['process', 'docker'] : ['docker', 'process']) as Array<'docker' | 'process'>) {
        const n = nodes[name].node;
        await warm(nodes.docker.node);
        await warm(nodes.process.node);
        const s = performance.now();
        const res = await fetch(n.url + '/v1/chat/completions', {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'hello' }], max_tokens: 8, seed: i }),
        });
        if (res.status !== 200) throw new Error(`${name}: HTTP ${res.status}`);
        await res.text();
        lat[name].push(performance.now() - s);
      }
      process.stderr.write(`requests ${i + 1}/${REQUESTS}\n`);
    }
  } finally {
    for (const n of Object.values(nodes)) {
      await n.node.close();
      rmSync(n.state, { recursive: true, force: true });
    }
  }

  const report = {
    date: new Date().toISOString(),
    machine: '2-core shared VM',
    starts: STARTS,
    containerStartToFirstByteMs: stats(containerStart),
    containerRemoveVerifiedMs: stats(containerRemove),
    processStartToFirstByteMs: stats(processStart),
    removalUnverified: unverified,
    workerReadyMs: { docker: stats(readyMs.docker), process: stats(readyMs.process) },
    workerEndMs: { docker: stats(endMs.docker), process: stats(endMs.process) },
    requestMs: { docker: stats(lat.docker), process: stats(lat.process), addedP50: Math.round((q(lat.docker, 0.5) - q(lat.process, 0.5)) * 10) / 10 },
  };
  console.log(JSON.stringify(report, null, 2));
  mkdirSync(join(root, 'bench', 'results'), { recursive: true });
  writeFileSync(join(root, 'bench', 'results', 'docker.json'), JSON.stringify(report, null, 2) + '\n');
} finally {
  await dockerd.stop();
}
