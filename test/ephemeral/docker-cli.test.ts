// `phantoma docker build-image`, `phantoma docker image` and the Docker checks of `phantoma doctor` (issue 6),
// as real CLI processes against a private dockerd that starts with no image at all.
import t, { type Test } from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startTestDockerd, type TestDockerd } from './docker-rig.ts';
import { runPhantoma } from '../helpers.ts';
import { ERRORS } from '../../src/errors.ts';
import { imageDigest, imageTag, planWorkerImage } from '../../src/ephemeral/docker-image.ts';
import { projectRoot } from '../../src/paths.ts';

let dockerd: TestDockerd;
t.before(async () => {
  dockerd = await startTestDockerd({ image: false });
});
t.teardown(() => dockerd?.stop());

const flags = (): string[] => ['--workers.backend=docker', `--docker.socket=${dockerd.socketPath}`];
type Check = { id: string; status: string; summary: string };
const doctor = async (extra: string[]): Promise<Map<string, Check>> => {
  const r = await runPhantoma(['doctor', '--json', ...extra], { timeoutMs: 60_000 });
  const checks = JSON.parse(r.stdout) as Check[];
  return new Map(checks.filter((c) => c.id.startsWith('docker-')).map((c) => [c.id, c]));
};

t.test('before the image is built: docker image says missing, doctor fails the image check', async (t) => {
  const expected = imageTag(await imageDigest(planWorkerImage(projectRoot())));
  const r = await runPhantoma(['docker', 'image', '--json', ...flags()], { timeoutMs: 60_000 });
  t.equal(r.code, ERRORS.DOCKER_IMAGE_MISSING.exit, 'exit status of docker_image_missing');
  t.same(JSON.parse(r.stdout), { image: expected, digest: JSON.parse(r.stdout).digest, present: false, files: JSON.parse(r.stdout).files, bytes: JSON.parse(r.stdout).bytes });
  const checks = await doctor(flags());
  t.equal(checks.get('docker-daemon')?.status, 'pass', 'dockerd reachable');
  t.equal(checks.get('docker-image')?.status, 'fail', 'image missing: fail');
  t.equal(checks.get('docker-cgroups')?.status, 'pass', 'cgroupfs driver');
});

/** `phantoma serve` with the docker backend: must refuse to start, with this error code. */
async function serveRefuses(t: Test, extra: string[], code: string, exit: number): Promise<void> {
  const state = mkdtempSync(join(tmpdir(), 'phantoma-dcli-'));
  try {
    const r = await runPhantoma(['serve', '--json', `--stateDir=${state}`, '--gateway.host=127.0.0.1', '--gateway.port=0', '--gateway.metricsPort=0', '--gateway.tls=off', ...extra], { timeoutMs: 60_000 });
    t.equal(r.code, exit, `serve exits ${exit}`);
    const line = (r.stdout + '\n' + r.stderr).split('\n').find((l) => l.startsWith('{"error"'));
    t.equal(line && (JSON.parse(line) as { error: { code: string } }).error.code, code, `serve refuses with ${code}`);
  } finally {
    rmSync(state, { recursive: true, force: true });
  }
}

t.test('serve refuses to start without the image, and without dockerd', async (t) => {
  await serveRefuses(t, flags(), 'docker_image_missing', ERRORS.DOCKER_IMAGE_MISSING.exit);
  await serveRefuses(t, ['--workers.backend=docker', `--docker.socket=${join(dockerd.dir, 'nothing.sock')}`], 'docker_unreachable', ERRORS.DOCKER_UNREACHABLE.exit);
});

t.test('build-image imports it; then docker image and doctor find it; a second build is a no-op', async (t) => {
  const built = await runPhantoma(['docker', 'build-image', '--json', ...flags()], { timeoutMs: 120_000 });
  t.equal(built.code, 0, `build-image exits 0 ${built.stderr.slice(-500)}`);
  const b = JSON.parse(built.stdout) as { image: string; built: boolean; tarBytes: number };
  t.equal(b.built, true, 'built');
  t.ok(b.tarBytes > 50 << 20 && b.tarBytes < 400 << 20, `tarball ${(b.tarBytes / 2 ** 20).toFixed(0)} MiB`);
  const inspect = (await dockerd.docker.getImage(b.image).inspect()) as { Size: number };
  t.ok(inspect.Size > 50 << 20, 'dockerd has the image');
  const again = await runPhantoma(['docker', 'build-image', '--json', ...flags()], { timeoutMs: 60_000 });
  t.equal(again.code, 0);
  t.equal((JSON.parse(again.stdout) as { built: boolean }).built, false, 'up to date: not rebuilt');
  t.equal((await doctor(flags())).get('docker-image')?.status, 'pass', 'doctor: image present');
});

t.test('with the image present, serve starts no container outside a verified egress filter', async (t) => {
  // No warden: nothing owns the workers/ cgroup or its filter (fail closed).
  await serveRefuses(t, [...flags(), `--warden.socket=${join(dockerd.dir, 'no-warden.sock')}`], 'not_ready', ERRORS.NOT_READY.exit);
  // A warden, but the containers' CgroupParent is not its workers/: they would run unfiltered.
  const name = `phantoma-dcli-${process.pid}`;
  const sock = mkdtempSync(join(tmpdir(), 'phantoma-dcli-w-'));
  t.teardown(() => rmSync(sock, { recursive: true, force: true }));
  await serveRefuses(t, [...flags(), '--warden.start=true', `--warden.socket=${join(sock, 'w.sock')}`, `--warden.cgroupName=${name}`, `--docker.cgroupParent=/${name}-elsewhere/workers`], 'config_invalid', ERRORS.CONFIG_INVALID.exit);
});

t.test('an unreachable dockerd: doctor fails the daemon check, docker image exits with docker_unreachable', async (t) => {
  const nowhere = ['--workers.backend=docker', `--docker.socket=${join(dockerd.dir, 'nothing.sock')}`];
  const checks = await doctor(nowhere);
  t.equal(checks.get('docker-daemon')?.status, 'fail');
  const r = await runPhantoma(['docker', 'image', '--json', ...nowhere], { timeoutMs: 60_000 });
  t.equal(r.code, ERRORS.DOCKER_UNREACHABLE.exit, 'exit status of docker_unreachable');
  t.equal((JSON.parse(r.stdout || r.stderr) as { error: { code: string } }).error.code, 'docker_unreachable');
});
