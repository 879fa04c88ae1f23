// `phantoma doctor` checks for the Docker worker backend (issue 6), run only when workers.backend is
// "docker": dockerd answers on docker.socket, it has the worker image this installation's files make, and
// its cgroup driver is cgroupfs (docker.cgroupParent is a cgroupfs path under the warden's workers/).
import type Docker from 'dockerode';
import type { Config } from '../config/schema.ts';
import type { CheckResult } from './checks.ts';
import { dockerClient, expectedImage, pingDocker } from '../ephemeral/docker-connect.ts';
import { hasImage } from '../ephemeral/docker-image.ts';

export const DOCKER_CHECK_IDS = ['docker-daemon', 'docker-image', 'docker-cgroups'] as const;

export interface DockerInfoFacts {
  ServerVersion?: string;
  CgroupDriver?: string;
  CgroupVersion?: string;
  LoggingDriver?: string;
}

/** Judges dockerd's /info (pure, for tests). */
export function checkDockerCgroups(info: DockerInfoFacts, cgroupParent: string): CheckResult {
  if (info.CgroupDriver !== 'cgroupfs') {
    return {
      id: 'docker-cgroups',
      status: 'fail',
      summary: `dockerd uses the ${String(info.CgroupDriver)} cgroup driver; docker.cgroupParent ${cgroupParent} is a cgroupfs path`,
      detail: 'run dockerd with --exec-opt native.cgroupdriver=cgroupfs, so worker containers land under the warden\'s workers/ cgroup',
    };
  }
  return {
    id: 'docker-cgroups',
    status: 'pass',
    summary: `cgroupfs driver, cgroup v${String(info.CgroupVersion ?? '?')}: worker containers go under ${cgroupParent}`,
    detail: 'on a hybrid host runc also places each container at the same path in the cgroup2 hierarchy (where the egress programs attach)',
  };
}

export async function dockerChecks(config: Readonly<Config>): Promise<CheckResult[]> {
  const docker: Docker = dockerClient(config);
  let info: DockerInfoFacts;
  try {
    await pingDocker(docker, config.docker.socket);
    info = (await docker.info()) as DockerInfoFacts;
  } catch (err) {
    return [
      { id: 'docker-daemon', status: 'fail', summary: `dockerd does not answer at ${config.docker.socket}`, detail: (err as Error).message },
      { id: 'docker-image', status: 'fail', summary: 'not checked: dockerd is unreachable' },
    ];
  }
  const out: CheckResult[] = [{ id: 'docker-daemon', status: 'pass', summary: `dockerd ${String(info.ServerVersion)} answers at ${config.docker.socket}` }];
  try {
    const image = await expectedImage(config);
    out.push(
      (await hasImage(docker, image))
        ? { id: 'docker-image', status: 'pass', summary: `worker image ${image} is present` }
        : { id: 'docker-image', status: 'fail', summary: `worker image ${image} is missing`, detail: 'run `phantoma docker build-image` (after every update or rebuild of dist/)' },
    );
  } catch (err) {
    out.push({ id: 'docker-image', status: 'fail', summary: 'the worker image could not be checked', detail: (err as Error).message });
  }
  out.push(checkDockerCgroups(info, config.docker.cgroupParent));
  return out;
}
