import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runPhantoma } from '../helpers.ts';
import { runCli } from '../../src/cli/main.ts';

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-cli-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));

t.test('--help works for phantoma and every command', async (t) => {
  const top = await runPhantoma(['--help']);
  t.equal(top.code, 0);
  t.match(top.stdout, /usage: phantoma <command>/);
  t.match(top.stdout, /--inference\.threads=<integer>/, 'settings are listed as flags');
  const section = top.stdout.split("commands:\n")[1]!.split("\n\n")[0]!;
  const commands = [...section.matchAll(/^ {2}([a-z][a-z-]*) {2,}/gm)].map((m) => m[1]!);
  t.ok(commands.length >= 3, `commands listed: ${commands}`);
  // Each command's help in this process (runCli is what bin/phantoma runs): a process per command would
  // cost ≈ 20 Node start-ups for what the one spawn above already shows.
  for (const c of commands) {
    const out: string[] = [];
    const code = await runCli([c, '--help'], { out: (s) => out.push(s), err: (s) => out.push(s) });
    t.equal(code, 0, `${c} --help exits 0`);
    t.match(out.join('\n'), /usage: phantoma /, `${c} --help prints usage`);
  }
});

t.test('usage errors exit 2 with cli_usage', async (t) => {
  const r = await runPhantoma(['frobnicate']);
  t.equal(r.code, 2);
  t.match(r.stderr, /unknown command "frobnicate".*\[cli_usage\]/);
  const flag = await runPhantoma(['models', 'list', '--no-such-flag']);
  t.equal(flag.code, 2);
  t.match(flag.stderr, /\[cli_usage\]/);
  const noPrompt = await runPhantoma(['local-chat']);
  t.equal(noPrompt.code, 2);
  t.match(noPrompt.stderr, /a prompt is required.*\[cli_usage\]/);
});

t.test('configuration errors exit 2 and name the key; --json gives a machine-readable error', async (t) => {
  const file = join(tmp, 'bad.json');
  writeFileSync(file, JSON.stringify({ inference: { threads: 0, colour: 'red' } }));
  const r = await runPhantoma(['config', 'check', '--config', file]);
  t.equal(r.code, 2);
  t.match(r.stderr, /inference\.threads: expected integer to be greater or equal to 1, got 0/);
  t.match(r.stderr, /inference\.colour: unknown key/);
  const j = await runPhantoma(['config', 'check', '--config', file, '--json']);
  t.equal(j.code, 2);
  const err = JSON.parse(j.stderr).error;
  t.equal(err.code, 'config_invalid');
  t.same(err.details.issues.map((i: { key: string }) => i.key).sort(), ['inference.colour', 'inference.threads']);
  const ok = await runPhantoma(['config', 'check', '--json', '--inference.threads=1']);
  t.equal(ok.code, 0);
  t.equal(JSON.parse(ok.stdout).inference.threads, 1);
});

t.test('a corrupt model file configured by path is refused with exit 3, not a crash', async (t) => {
  const bad = join(tmp, 'bad.gguf');
  writeFileSync(bad, Buffer.concat([Buffer.from('GGUF'), Buffer.alloc(60, 0xff)]));
  const models = JSON.stringify([{ name: 'bad', path: bad }]);
  const r = await runPhantoma(['local-chat', `--models=${models}`, '--defaultModel=bad', 'hi']);
  t.equal(r.code, 3);
  t.match(r.stderr, /not a valid GGUF model.*\[model_file_invalid\]/);
  const check = await runPhantoma(['models', 'check', bad, '--json']);
  t.equal(check.code, 3);
  t.equal(JSON.parse(check.stderr).error.code, 'model_file_invalid');
  const digest = await runPhantoma(['local-chat', `--models=${JSON.stringify([{ name: 'x', path: bad, sha256: '0'.repeat(64) }])}`, '--defaultModel=x', 'hi']);
  t.equal(digest.code, 3);
  t.match(digest.stderr, /\[model_(file_invalid|digest_mismatch)\]/);
});

t.test('local-chat streams an answer from the tiny model', async (t) => {
  const r = await runPhantoma(['local-chat', '--max-tokens', '12', 'hello there']);
  t.equal(r.code, 0, r.stderr);
  t.ok(r.stdout.trim().length > 0, 'some text was printed');
  t.match(r.stderr, /\[tiny: 12 tokens in [\d.]+ s, finish_reason length\]/);
  const list = await runPhantoma(['models', 'list', '--json']);
  t.equal(list.code, 0);
  t.equal(JSON.parse(list.stdout)[0].contextLength, 4096);
});
