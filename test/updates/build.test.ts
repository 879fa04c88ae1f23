// phantoma-release build: reproducible (two builds byte-identical, whatever the files' mtimes, owners'
// names or directory order on disk), production node_modules only, and a tarball the installer accepts
// exactly as built. Built from a small fixture tree through the same code path as the real checkout.
import t from 'tap';
import { createHash } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, utimesSync, writeFileSync, chmodSync, lstatSync, readlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildRelease, productionPackages } from '../../src/release/build.ts';
import { extractRelease } from '../../src/updates/slots.ts';
import { isContainedLink, isSafeRelativePath, parseManifest } from '../../src/updates/manifest.ts';
import { createWriteStream } from 'node:fs';
import { createGzip } from 'node:zlib';
import { pipeline } from 'node:stream/promises';
import { tarStream, type TarEntry } from '../../src/updates/tar.ts';
import { makeTree, TREE_PATHS, tamperedRelease } from './fixture.ts';

/** A tarball whose manifest lists exactly its entries (so only the link rules can refuse it). */
async function craft(out: string, files: Array<{ path: string; data: string }>, links: Array<{ path: string; target: string }>): Promise<string> {
  const manifest = {
    format: 'phantoma-release/1',
    name: 'phantoma',
    version: '1.0.0',
    files: files.map((f) => ({ path: f.path, mode: 0o644, size: Buffer.byteLength(f.data), sha256: createHash('sha256').update(f.data).digest('hex') })),
    symlinks: links,
  };
  const m = Buffer.from(JSON.stringify(manifest));
  const entries: TarEntry[] = [{ type: 'file', path: 'manifest.json', mode: 0o644, size: m.length, data: () => [m] }];
  for (const l of links) entries.push({ type: 'symlink', ...l });
  for (const f of files) entries.push({ type: 'file', path: f.path, mode: 0o644, size: Buffer.byteLength(f.data), data: () => [Buffer.from(f.data)] });
  await pipeline(tarStream(entries), createGzip(), createWriteStream(out));
  return out;
}

const work = mkdtempSync(join(tmpdir(), 'phantoma-build-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));
const sha = (p: string): string => createHash('sha256').update(readFileSync(p)).digest('hex');

function fixture(dir: string): string {
  makeTree(dir, '1.2.3');
  // A lock file with one production and one development package, both installed.
  writeFileSync(
    join(dir, 'package-lock.json'),
    JSON.stringify({ lockfileVersion: 3, packages: { '': {}, 'node_modules/prod-a': {}, 'node_modules/prod-a/node_modules/nested-b': {}, 'node_modules/dev-c': { dev: true } } }),
  );
  for (const p of ['node_modules/prod-a', 'node_modules/prod-a/node_modules/nested-b', 'node_modules/dev-c']) {
    mkdirSync(join(dir, p), { recursive: true });
    writeFileSync(join(dir, p, 'index.js'), `// ${p}\n`);
  }
  return dir;
}

t.test('two builds of the same tree are byte-identical, whatever the mtimes', async (t) => {
  const tree = fixture(join(work, 'tree'));
  const a = await buildRelease({ root: tree, out: join(work, 'a.tar.gz'), paths: [...TREE_PATHS, 'package-lock.json'], commit: 'f'.repeat(40) });
  // Touch everything (and make the umask-visible group bits differ) before the second build.
  for (const f of ['package.json', 'bin/start.mjs', 'lib/release.json', 'lib/payload.bin']) utimesSync(join(tree, f), new Date(2001, 1, 1), new Date(2030, 1, 1));
  chmodSync(join(tree, 'lib', 'payload.bin'), 0o664);
  const b = await buildRelease({ root: tree, out: join(work, 'b.tar.gz'), paths: [...TREE_PATHS, 'package-lock.json'], commit: 'f'.repeat(40) });
  t.equal(a.sha256, b.sha256, 'same sha256');
  t.equal(sha(a.path), sha(b.path), 'same bytes on disk');
  t.equal(a.symlinks, 1);
  // A copy of the tree made in another order and place gives the same tarball too.
  const copy = fixture(join(work, 'copy'));
  const c = await buildRelease({ root: copy, out: join(work, 'c.tar.gz'), paths: [...TREE_PATHS, 'package-lock.json'], commit: 'f'.repeat(40) });
  t.equal(c.sha256, a.sha256, 'a fresh checkout elsewhere builds the same bytes');
});

t.test('production node_modules only, and the installer accepts the build exactly', async (t) => {
  const tree = fixture(join(work, 'tree2'));
  t.same(productionPackages(tree).sort(), ['node_modules/prod-a', 'node_modules/prod-a/node_modules/nested-b']);
  const r = await buildRelease({ root: tree, out: join(work, 'r.tar.gz'), paths: TREE_PATHS, commit: null });
  const dest = join(work, 'slot');
  const m = await extractRelease(r.path, dest);
  t.equal(m.version, '1.2.3');
  const paths = m.files.map((f) => f.path);
  t.ok(paths.includes('node_modules/prod-a/index.js') && paths.includes('node_modules/prod-a/node_modules/nested-b/index.js'), 'production packages included');
  t.notOk(paths.some((p) => p.includes('dev-c')), 'development packages left out');
  t.ok(paths.some((p) => p.length > 100), 'a path longer than ustar allows made it through (pax)');
  t.equal(lstatSync(join(dest, 'bin', 'start.mjs')).mode & 0o777, 0o755, 'executable stays executable');
  t.equal(lstatSync(join(dest, 'lib', 'payload.bin')).mode & 0o777, 0o644, 'others are 0644');
  t.equal(readlinkSync(join(dest, 'lib', 'link.json')), 'release.json', 'symlink kept');
  t.same(Object.keys(m).sort(), ['files', 'format', 'name', 'symlinks', 'version']);
  await t.rejects(buildRelease({ root: tree, out: join(work, 'v.tar.gz'), paths: TREE_PATHS, version: '9.9.9', commit: null }), { code: 'release_build_failed', message: /package.json says version 1.2.3/ }, 'the manifest and package.json cannot disagree on the version');
});

t.test('the installer refuses a tarball that does not match its manifest, and unsafe manifests', async (t) => {
  const tree = makeTree(join(work, 'tree3'), '2.0.0');
  const good = await buildRelease({ root: tree, out: join(work, 'g.tar.gz'), paths: TREE_PATHS, commit: null });
  const bad = join(work, 'bad.tar.gz');
  await tamperedRelease(good.path, bad);
  const dest = join(work, 'slot-bad');
  await t.rejects(extractRelease(bad, dest), { code: 'update_manifest_mismatch', message: /lib\/payload\.bin's sha256 differs/ });
  const garbage = join(work, 'garbage.tar.gz');
  writeFileSync(garbage, Buffer.from('not a gzip at all'));
  await t.rejects(extractRelease(garbage, join(work, 'slot-garbage')), { code: 'update_manifest_mismatch' });
  // A chain of links that each look contained but together climb out of the slot.
  const chain = await craft(join(work, 'chain.tar.gz'), [], [{ path: 'd/e', target: '..' }, { path: 'f', target: 'd/e/..' }]);
  await t.rejects(extractRelease(chain, join(work, 'slot-chain')), { code: 'update_manifest_mismatch', message: /symlink f resolves outside the release/ });
  // A file written through a link of the release.
  const through = await craft(join(work, 'through.tar.gz'), [{ path: 'lnk/x', data: 'x' }], [{ path: 'lnk', target: 'lib' }]);
  await t.rejects(extractRelease(through, join(work, 'slot-through')), { code: 'update_manifest_mismatch', message: /lnk\/x lies under a symlink/ });
  t.notOk(isSafeRelativePath('../etc/passwd'));
  t.notOk(isSafeRelativePath('/etc/passwd'));
  t.notOk(isSafeRelativePath('a//b'));
  t.ok(isSafeRelativePath('a/b.c'));
  t.notOk(isContainedLink('lib/x', '../../etc'));
  t.ok(isContainedLink('lib/x', '../bin/y'));
  t.throws(() => parseManifest(Buffer.from(JSON.stringify({ format: 'phantoma-release/1', name: 'phantoma', version: '1.0.0', files: [{ path: '../x', mode: 420, size: 0, sha256: '0'.repeat(64) }], symlinks: [] }))), /file path/);
});
