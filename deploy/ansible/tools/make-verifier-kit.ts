// Makes the verifier kit the Ansible roles carry to a target (a fresh VPS has no Phantoma yet, so nothing
// on it could verify a release): the pinned Node runtime, Phantoma's own verifier (src/), exactly the npm
// packages it loads, and tools/verify-install.ts — a plain tar, byte-identical for identical inputs, so
// its sha256 can be pinned in the inventory (phantoma_release_kit_sha256) and checked on the target.
//
//   .runtime/bin/node deploy/ansible/tools/make-verifier-kit.ts --out FILE.tar   (from a built checkout)
//
// Prints {"path", "sha256", "bytes", "files", "packages"} as JSON. Which packages: the ones the verifier
// actually resolves when it loads (recorded by a module.registerHooks resolve hook in a child process),
// so the kit cannot silently miss one and carries nothing else.
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const checkout = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
const ENTRY = 'deploy/ansible/tools/verify-install.ts';

/** This process's environment without NODE_OPTIONS: a test runner's --import hooks would be recorded too. */
function cleanEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  return env;
}

/** Package root directories (relative to the checkout) that loading the verifier resolves into. */
export function loadedPackages(root: string): string[] {
  const work = mkdtempSync(join(tmpdir(), 'phantoma-kit-'));
  try {
    const log = join(work, 'resolved.txt');
    const hook = [
      "import { registerHooks } from 'node:module';",
      "import { appendFileSync } from 'node:fs';",
      `const log = ${JSON.stringify(log)};`,
      'registerHooks({ resolve(s, c, next) { const r = next(s, c); if (r.url.includes("/node_modules/")) appendFileSync(log, r.url + "\\n"); return r; } });',
    ].join('\n');
    // No arguments: the module graph loads in full (static imports), then main() prints usage and exits 2.
    const r = spawnSync(join(root, '.runtime/bin/node'), ['--disable-warning=ExperimentalWarning', '--import', `data:text/javascript,${encodeURIComponent(hook)}`, join(root, ENTRY)], { encoding: 'utf8', timeout: 60_000, env: cleanEnv() });
    if (r.status !== 2 || !/usage: verify-install/.test(r.stderr)) throw new Error(`loading the verifier failed (${r.status}): ${r.stderr.slice(-2000)}`);
    const roots = new Set<string>();
    for (const url of readFileSync(log, 'utf8').split('\n').filter(Boolean)) {
      if (!url.startsWith('file:')) continue;
      const rel = relative(root, fileURLToPath(url));
      const m = /^(.*node_modules\/(?:@[^/]+\/)?[^/]+)\//.exec(rel);
      if (m) roots.add(m[1]!);
    }
    return [...roots].sort();
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

function walk(root: string, rel: string, out: string[]): void {
  const st = statSync(join(root, rel));
  if (st.isDirectory()) {
    for (const n of readdirSync(join(root, rel))) {
      // A package's own nested node_modules are separate packages: included only when loaded.
      if (n === 'node_modules' && rel.includes('node_modules')) continue;
      walk(root, `${rel}/${n}`, out);
    }
  } else if (st.isFile()) out.push(rel);
}

export function kitFiles(root: string): { files: string[]; packages: string[] } {
  const packages = loadedPackages(root);
  const files: string[] = ['.runtime/bin/node', 'package.json', ENTRY];
  walk(root, 'src', files);
  for (const p of packages) walk(root, p, files);
  return { files: [...new Set(files)].sort(), packages };
}

async function sha256Of(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(path)) h.update(c as Buffer);
  return h.digest('hex');
}

export async function makeVerifierKit(root: string, out: string): Promise<{ path: string; sha256: string; bytes: number; files: number; packages: string[] }> {
  const { files, packages } = kitFiles(root);
  const list = `${out}.list-${process.pid}`;
  const tmp = `${out}.tmp-${process.pid}`;
  writeFileSync(list, files.join('\0') + '\0');
  try {
    // GNU tar, normalised: sorted names, mtime 0, owner 0:0 without names, no group/other write.
    const r = spawnSync('tar', ['--sort=name', '--mtime=@0', '--owner=0', '--group=0', '--numeric-owner', '--mode=go-w', '--format=gnu', '-C', root, '--null', '-T', list, '-cf', tmp], { encoding: 'utf8', timeout: 300_000 });
    if (r.status !== 0) throw new Error(`tar failed (${r.status}): ${r.stderr}`);
    renameSync(tmp, out);
  } finally {
    rmSync(list, { force: true });
    rmSync(tmp, { force: true });
  }
  return { path: out, sha256: await sha256Of(out), bytes: statSync(out).size, files: files.length, packages };
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { out: { type: 'string' } }, strict: true });
  if (!values.out) {
    process.stderr.write('usage: make-verifier-kit.ts --out FILE.tar\n');
    process.exit(2);
  }
  if (!existsSync(join(checkout, '.runtime/bin/node'))) {
    process.stderr.write('make-verifier-kit: no .runtime/bin/node here; run scripts/setup.sh first\n');
    process.exit(2);
  }
  const r = await makeVerifierKit(checkout, resolve(values.out));
  process.stdout.write(JSON.stringify(r) + '\n');
}
