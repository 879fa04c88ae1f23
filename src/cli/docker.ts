// phantoma docker build-image | docker image — the Docker worker backend's image (issue 6). Built from
// files this machine has (src/ephemeral/docker-image.ts says which), imported into the dockerd at
// docker.socket, named by the digest of its content: rebuild after every update or rebuild of dist/.
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Command } from './main.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { projectRoot } from '../paths.ts';
import { hasImage, imageDigest, imageTag, importImageTar, planWorkerImage, writeImageTar } from '../ephemeral/docker-image.ts';
import { dockerClient, pingDocker } from '../ephemeral/docker-connect.ts';
import { createProgressBar } from './progress.ts';

export const dockerCommand: Command = {
  summary: 'build the Docker worker image from this installation and import it into dockerd (workers.backend docker)',
  usage: 'phantoma docker build-image [--force] [--keep-tar FILE] [--json] | docker image [--json]',
  options: { force: { type: 'boolean' }, 'keep-tar': { type: 'string' } },
  async run(ctx, { values, positionals }) {
    const [sub] = positionals;
    if (sub !== 'build-image' && sub !== 'image') throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const config = ctx.config();
    const say = (line: string): void => {
      if (!ctx.json) ctx.err(line);
    };
    const plan = planWorkerImage(projectRoot());
    say(`worker image: ${plan.files} files, ${(plan.bytes / 1048576).toFixed(1)} MB (Node runtime, dist/, worker node_modules, native builds, shared libraries)`);
    const hashBar = ctx.json ? undefined : createProgressBar('hashing');
    let hashed = 0;
    const digest = await imageDigest(plan, (n) => hashBar?.update((hashed += n), plan.bytes));
    hashBar?.finish();
    const tag = imageTag(digest);
    const docker = dockerClient(config);
    await pingDocker(docker, config.docker.socket);
    const present = await hasImage(docker, tag);
    if (sub === 'image') {
      ctx.out(ctx.json ? JSON.stringify({ image: tag, digest, present, files: plan.files, bytes: plan.bytes }) : `${tag} ${present ? 'is in dockerd' : 'is NOT in dockerd: run `phantoma docker build-image`'}`);
      return present ? 0 : ERRORS.DOCKER_IMAGE_MISSING.exit;
    }
    if (present && !values.force) {
      ctx.out(ctx.json ? JSON.stringify({ image: tag, digest, built: false }) : `${tag} is already in dockerd (up to date)`);
      return 0;
    }
    const dir = mkdtempSync(join(tmpdir(), 'phantoma-image-tar-'));
    try {
      const tar = typeof values['keep-tar'] === 'string' ? values['keep-tar'] : join(dir, 'worker-image.tar');
      say('writing the image tarball');
      await writeImageTar(plan, tar);
      const importBar = ctx.json ? undefined : createProgressBar('importing into dockerd');
      await importImageTar(docker, tar, tag, (p) => importBar?.update(p.sent, p.total));
      importBar?.finish();
      const bytes = statSync(tar).size;
      ctx.out(ctx.json ? JSON.stringify({ image: tag, digest, built: true, tarBytes: bytes }) : `${tag} imported (${(bytes / 1048576).toFixed(1)} MB tarball)`);
      return 0;
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
};
