// Workers in throwaway Docker containers (issue 6): the same one-request lifecycle as process and warden
// workers, behind the same WorkerBackend interface, so the pool, queue, end verification and audit events
// are shared code. One container per worker: attached before it starts (a hijacked attach carries stdin;
// stdout and stderr are demultiplexed, Tty off), so its stdio is the same newline-JSON worker protocol.
// After its one request the container is force-removed and the removal verified (inspect answers 404 and
// its cgroup directories are gone).
//
// Each container: CgroupParent under the warden's workers/ cgroup, NetworkMode none (only lo), read-only
// root, a size-capped tmpfs at /scratch owned by the worker's own uid (61000-61999) as its only writable
// place, every capability dropped, no-new-privileges, memory (no swap), pids and CPU limits, RLIMIT_CORE 0,
// no IPC namespace sharing and no /dev/shm, log driver none, the model bind-mounted read-only, no Docker
// socket. docs/architecture.md ("Docker backend") says what each setting buys.
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { constants as osConstants } from 'node:os';
import { PassThrough, type Duplex } from 'node:stream';
import Docker from 'dockerode';
import type { Logger } from '../logger.ts';
import { PhantomaError, ERRORS } from '../errors.ts';
import type { WorkerBackend, WorkerEndResult, WorkerExit, WorkerHandle } from './backend.ts';
import type { WorkerSpec } from './worker-main.ts';
import { WORKER_NODE_FLAGS } from './worker-command.ts';
import { encodeMessage } from './worker-protocol.ts';
import { IMAGE_PROJECT_DIR } from './docker-image.ts';

/** Label on every worker container; its value is the node's cgroup parent, so one node never ends another's. */
export const WORKER_LABEL = 'org.phantoma.worker';
/** Where the worker's scratch tmpfs is mounted (cwd, HOME, TMPDIR). */
export const SCRATCH_DIR = '/scratch';
/** Where the model file is bind-mounted, read-only. */
export const MODEL_DIR = '/model';
/** Where keyd's socket appears inside a worker when docker.keydSocket is set. */
export const KEYD_SOCKET_IN_WORKER = '/run/phantoma/keyd.sock';

export interface DockerBackendOptions {
  docker: Docker;
  image: string;
  /** CgroupParent (cgroupfs driver): the warden's workers/ cgroup. */
  cgroupParent: string;
  uidRange: { from: number; to: number };
  memoryBytes: number;
  pidsMax: number;
  nanoCpus: number;
  tmpfsBytes: number;
  /** LD_PRELOAD the persistent-threadpool shim (inside the image). */
  preloadThreadpool: boolean;
  /** Host path of keyd's worker socket, bind-mounted at KEYD_SOCKET_IN_WORKER (absent: not mounted). */
  keydSocket?: string;
  logger: Logger;
}

const SIGNAL_NAMES = new Map<number, NodeJS.Signals>(Object.entries(osConstants.signals).map(([name, n]) => [n, name as NodeJS.Signals]));

function statusCode(err: unknown): number | undefined {
  return (err as { statusCode?: number }).statusCode;
}

/** The cgroup directories a container gets under the cgroupfs driver, in every mounted hierarchy. */
function cgroupDirs(cgroupParent: string, containerId: string): string[] {
  const roots: string[] = [];
  try {
    for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
      const sep = line.indexOf(' - ');
      if (sep === -1) continue;
      const fstype = line.slice(sep + 3).split(' ')[0];
      if (fstype === 'cgroup' || fstype === 'cgroup2') roots.push(line.split(' ')[4]!);
    }
  } catch {
    /* no /proc: nothing to check */
  }
  return roots.map((r) => join(r, cgroupParent, containerId));
}

/** The container's HostConfig and Config for one worker (exported for tests). */
export function workerContainerConfig(o: DockerBackendOptions, spec: WorkerSpec, id: string, uid: number): Docker.ContainerCreateOptions {
  const modelInWorker = `${MODEL_DIR}/${basename(spec.modelPath)}`;
  const workerSpec: WorkerSpec = { ...spec, modelPath: modelInWorker };
  const node = `${IMAGE_PROJECT_DIR}/.runtime/bin/node`;
  const script = `${IMAGE_PROJECT_DIR}/dist/src/ephemeral/worker-main.js`;
  const mounts: Docker.MountSettings[] = [{ Type: 'bind', Source: spec.modelPath, Target: modelInWorker, ReadOnly: true }];
  if (o.keydSocket) mounts.push({ Type: 'bind', Source: o.keydSocket, Target: KEYD_SOCKET_IN_WORKER, ReadOnly: false });
  return {
    name: `phantoma-worker-${id}`,
    Image: o.image,
    Cmd: [node, ...WORKER_NODE_FLAGS, script, JSON.stringify(workerSpec)],
    Entrypoint: [],
    User: `${uid}:${uid}`,
    WorkingDir: SCRATCH_DIR,
    Env: [
      'PATH=/usr/bin:/bin',
      `HOME=${SCRATCH_DIR}`,
      `TMPDIR=${SCRATCH_DIR}`,
      'LANG=C.UTF-8',
      'NODE_LLAMA_CPP_SKIP_DOWNLOAD=true',
      ...(o.preloadThreadpool ? [`LD_PRELOAD=${IMAGE_PROJECT_DIR}/native/threadpool/build/libphantoma_threadpool.so`] : []),
      ...(o.keydSocket ? [`PHANTOMA_KEYD_SOCKET=${KEYD_SOCKET_IN_WORKER}`] : []),
    ],
    Labels: { [WORKER_LABEL]: o.cgroupParent, 'org.phantoma.worker-id': id },
    AttachStdin: true,
    AttachStdout: true,
    AttachStderr: true,
    OpenStdin: true,
    StdinOnce: true,
    Tty: false,
    NetworkDisabled: true,
    HostConfig: {
      NetworkMode: 'none',
      ReadonlyRootfs: true,
      Tmpfs: { [SCRATCH_DIR]: `rw,nosuid,nodev,noexec,size=${o.tmpfsBytes},uid=${uid},gid=${uid},mode=0700` },
      Mounts: mounts,
      CapDrop: ['ALL'],
      SecurityOpt: ['no-new-privileges'],
      Memory: o.memoryBytes,
      MemorySwap: o.memoryBytes, // equal to Memory: no swap
      PidsLimit: o.pidsMax,
      NanoCpus: o.nanoCpus,
      CgroupParent: o.cgroupParent,
      IpcMode: 'none',
      LogConfig: { Type: 'none', Config: {} },
      Ulimits: [
        { Name: 'core', Soft: 0, Hard: 0 },
        { Name: 'nofile', Soft: 1024, Hard: 4096 },
      ],
      RestartPolicy: { Name: 'no', MaximumRetryCount: 0 },
      AutoRemove: false, // removed by us, so the removal can be verified
      Init: false,
      Privileged: false,
    },
  };
}

export function createDockerBackend(o: DockerBackendOptions): WorkerBackend & { uidsInUse(): number; containersLive(): number } {
  const log = o.logger.child({ component: 'docker-backend' });
  const { from, to } = o.uidRange;
  if (!Number.isInteger(from) || !Number.isInteger(to) || from < 1 || to < from) throw new Error('invalid worker uid range');
  const inUse = new Set<number>();
  let next = from;
  let live = 0;
  function takeUid(): number | undefined {
    for (let i = 0; i <= to - from; i++) {
      const uid = next;
      next = next === to ? from : next + 1;
      if (!inUse.has(uid)) {
        inUse.add(uid);
        return uid;
      }
    }
    return undefined;
  }

  return {
    name: 'docker',
    uidsInUse: () => inUse.size,
    containersLive: () => live,
    spawn(spec): WorkerHandle {
      const id = randomBytes(8).toString('hex');
      const stdin = new PassThrough();
      const stdout = new PassThrough();
      const stderr = new PassThrough();
      stdin.on('error', () => undefined);
      let pid: number | undefined;
      let uid: number | undefined;
      let container: Docker.Container | undefined;
      let attached: Duplex | undefined;
      let exitCode: number | null = null;
      let ending: Promise<WorkerEndResult> | undefined;
      const endResult = Promise.withResolvers<WorkerEndResult>();
      const finishOutputs = (): void => {
        if (!stdout.writableEnded) stdout.end();
        if (!stderr.writableEnded) stderr.end();
      };

      const started = (async () => {
        uid = takeUid();
        if (uid === undefined) throw new PhantomaError(ERRORS.DOCKER_UNREACHABLE, 'no free worker uid in the range');
        const c = await o.docker.createContainer(workerContainerConfig(o, spec, id, uid));
        container = c;
        live++;
        // Attached before start, so not a byte of output is missed; hijacked, so stdin is a real stream.
        const stream = (await c.attach({ stream: true, stdin: true, stdout: true, stderr: true, hijack: true })) as unknown as Duplex;
        attached = stream;
        c.modem.demuxStream(stream, stdout, stderr);
        stream.once('end', finishOutputs);
        stream.once('close', finishOutputs);
        stream.on('error', finishOutputs);
        stdin.pipe(stream);
        const waited = c.wait({ condition: 'next-exit' }).then(
          (r: { StatusCode?: number }) => (exitCode = typeof r.StatusCode === 'number' ? r.StatusCode : null),
          () => undefined,
        );
        await c.start();
        pid = ((await c.inspect()) as { State: { Pid: number } }).State.Pid || undefined;
        return { c, waited };
      })();

      const end = (): Promise<WorkerEndResult> => {
        ending ??= (async () => {
          try {
            await started;
          } catch {
            /* nothing started, or creation failed half-way: still remove whatever exists */
          }
          if (!container) {
            if (uid !== undefined) inUse.delete(uid);
            return { verified: true, ms: 0 };
          }
          const t0 = performance.now();
          try {
            // Kills (SIGKILL) and removes in one call; its tmpfs, namespaces and cgroups go with it.
            await container.remove({ force: true, v: true }).catch((err: unknown) => {
              if (statusCode(err) !== 404) throw err;
            });
            attached?.destroy();
            // Verified: dockerd no longer knows it, and no cgroup directory of it is left.
            let gone = false;
            try {
              await container.inspect();
            } catch (err) {
              gone = statusCode(err) === 404;
            }
            const dirs = cgroupDirs(o.cgroupParent, container.id).filter((d) => existsSync(d));
            const ms = performance.now() - t0;
            if (!gone || dirs.length > 0) {
              log.error({ workerId: id, container: container.id.slice(0, 12), inspect404: gone, cgroupsLeft: dirs.length }, 'worker container removal NOT verified');
              return { verified: false, ms, error: gone ? 'cgroup_left' : 'container_left' };
            }
            live--;
            if (uid !== undefined) inUse.delete(uid);
            return { verified: true, ms };
          } catch (err) {
            log.error({ workerId: id, status: statusCode(err), err: (err as Error).message }, 'could not remove a worker container');
            attached?.destroy();
            finishOutputs();
            return { verified: false, ms: null, error: 'remove_failed' };
          }
        })();
        void ending.then(endResult.resolve);
        return ending;
      };

      const exited: Promise<WorkerExit> = (async () => {
        let waited: Promise<unknown> | undefined;
        try {
          waited = (await started).waited;
        } catch (err) {
          const code = err instanceof PhantomaError ? err.code : statusCode(err) === 404 ? ERRORS.DOCKER_IMAGE_MISSING.code : ERRORS.DOCKER_UNREACHABLE.code;
          log.warn({ workerId: id, code, status: statusCode(err), err: (err as Error).message }, 'could not start a worker container');
          // Reported through the worker protocol, so the pool names the reason for a failed start.
          if (!stdout.writableEnded) stdout.end(encodeMessage({ type: 'error', code, message: `the worker container did not start (${code})` }));
          if (!stderr.writableEnded) stderr.end();
          await end();
          return { code: null, signal: null };
        }
        // Its output has ended (the container exited, or was removed): drained by the consumer, then removed.
        await new Promise<void>((r) => {
          if (stdout.readableEnded) return r();
          stdout.once('end', () => r()).once('close', () => r());
        });
        await Promise.race([waited, new Promise((r) => setTimeout(r, 2000).unref())]);
        await end();
        const code = exitCode;
        // Docker reports a signal death as 128 + the signal number.
        const signal = code !== null && code > 128 ? (SIGNAL_NAMES.get(code - 128) ?? null) : null;
        return { code: signal ? null : code, signal };
      })();

      return {
        id,
        // keyd knows a container by its cgroup, <cgroupParent>/<container id>; known once it is created.
        get keydId() {
          return container?.id;
        },
        get pid() {
          return pid;
        },
        stdin,
        stdout,
        stderr,
        exited,
        endResult: endResult.promise,
        async kill() {
          await end();
          return exited;
        },
      };
    },
  };
}

/** Removes worker containers a crashed gateway left behind (same cgroup parent), before serving. */
export async function removeLeftoverWorkers(docker: Docker, cgroupParent: string, log: Logger): Promise<number> {
  const list = await docker.listContainers({ all: true, filters: JSON.stringify({ label: [`${WORKER_LABEL}=${cgroupParent}`] }) });
  for (const c of list) {
    await docker
      .getContainer(c.Id)
      .remove({ force: true, v: true })
      .catch((err: unknown) => {
        if (statusCode(err) !== 404) throw err;
      });
  }
  if (list.length) log.warn({ count: list.length }, 'removed worker containers left by an earlier run');
  return list.length;
}
