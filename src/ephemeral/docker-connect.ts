// From configuration to a running Docker backend: dockerd reachable, the worker image the one this
// installation's files make, leftovers of a crashed run removed. Shared by `phantoma serve`, `phantoma
// doctor` and `phantoma docker build-image`.
import Docker from 'dockerode';
import type { Config } from '../config/schema.ts';
import type { Logger } from '../logger.ts';
import { PhantomaError, ERRORS } from '../errors.ts';
import { projectRoot } from '../paths.ts';
import { hasImage, imageDigest, imageTag, planWorkerImage } from './docker-image.ts';
import { createDockerBackend, removeLeftoverWorkers } from './docker-backend.ts';
import type { WorkerBackend } from './backend.ts';

export function dockerClient(config: Readonly<Config>): Docker {
  // No request timeout: docker-modem's applies to the socket's idle time, which would cut the attach
  // stream of a warm worker that waits longer than it for its request. Start-up bounds its own ping.
  return new Docker({ socketPath: config.docker.socket });
}

/** Answers within `ms` or throws docker_unreachable. */
export async function pingDocker(docker: Docker, socket: string, ms = 5_000): Promise<void> {
  try {
    await Promise.race([docker.ping(), new Promise((_, rej) => setTimeout(() => rej(new Error(`no answer within ${ms} ms`)), ms).unref())]);
  } catch (err) {
    throw new PhantomaError(ERRORS.DOCKER_UNREACHABLE, `dockerd does not answer at ${socket}: ${(err as Error).message}`, { cause: err });
  }
}

/** The image tag workers run: docker.image, or for "auto" the digest of the files the image is made of. */
export async function expectedImage(config: Readonly<Config>): Promise<string> {
  if (config.docker.image !== 'auto') return config.docker.image;
  return imageTag(await imageDigest(planWorkerImage(projectRoot())));
}

export async function connectDockerBackend(config: Readonly<Config>, log: Logger, opts: { preloadThreadpool: boolean }): Promise<WorkerBackend> {
  const docker = dockerClient(config);
  await pingDocker(docker, config.docker.socket);
  const image = await expectedImage(config);
  if (!(await hasImage(docker, image))) {
    throw new PhantomaError(ERRORS.DOCKER_IMAGE_MISSING, `dockerd has no worker image ${image} (made from this installation's files): run \`phantoma docker build-image\``);
  }
  await removeLeftoverWorkers(docker, config.docker.cgroupParent, log);
  log.info({ image, cgroupParent: config.docker.cgroupParent, keydSocket: config.docker.keydSocket ?? null }, 'docker backend: dockerd reachable, worker image present');
  return createDockerBackend({
    docker,
    image,
    cgroupParent: config.docker.cgroupParent,
    uidRange: { from: config.warden.uidFrom, to: config.warden.uidTo },
    memoryBytes: config.workers.memoryMaxBytes,
    pidsMax: config.workers.pidsMax,
    nanoCpus: Math.round(config.docker.cpus * 1e9),
    tmpfsBytes: config.workers.tmpfsBytes,
    preloadThreadpool: opts.preloadThreadpool,
    ...(config.docker.keydSocket ? { keydSocket: config.docker.keydSocket } : {}),
    logger: log,
  });
}
