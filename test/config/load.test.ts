import t from 'tap';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { validateConfig, loadConfig, configFlags, overridesFromFlags } from '../../src/config/load.ts';
import { ConfigError } from '../../src/errors.ts';

t.test('defaults fill an empty config, and the result is frozen', async (t) => {
  const r = validateConfig({});
  t.ok(r.ok);
  if (!r.ok) return;
  t.equal(r.config.inference.threads, 2);
  t.equal(r.config.defaultModel, 'tiny');
  t.same(r.config.models, [{ name: 'tiny', builtin: 'tiny' }]);
  t.ok(Object.isFrozen(r.config) && Object.isFrozen(r.config.inference) && Object.isFrozen(r.config.models[0]));
  t.throws(() => {
    (r.config.inference as { threads: number }).threads = 9;
  }, TypeError);
});

const bad: Array<[string, unknown, string, RegExp]> = [
  ['unknown key', { inferense: { threads: 2 } }, 'inferense', /^unknown key$/],
  ['unknown nested key', { inference: { thread: 2 } }, 'inference.thread', /^unknown key$/],
  ['wrong type', { inference: { threads: 'two' } }, 'inference.threads', /expected integer, got "two"/],
  ['out of range (above)', { inference: { threads: 1000 } }, 'inference.threads', /less or equal to 256, got 1000/],
  ['out of range (below)', { inference: { contextSize: 8 } }, 'inference.contextSize', /greater or equal to 64, got 8/],
  ['not an enum value', { logLevel: 'loud' }, 'logLevel', /got "loud"/],
  ['bad digest', { models: [{ name: 'm', path: '/x.gguf', sha256: 'abc' }], defaultModel: 'm' }, 'models.0', /got/],
  ['default model not configured', { defaultModel: 'nope' }, 'defaultModel', /"nope" is not one of the configured models \(tiny\)/],
  ['plain HTTP off loopback', { gateway: { host: '0.0.0.0', tls: 'off' } }, 'gateway.tls', /allowed only on a loopback host, not 0\.0\.0\.0/],
  ['no auth off loopback', { gateway: { host: '10.1.2.3', auth: 'none' } }, 'gateway.auth', /allowed only on a loopback host/],
  ['metrics off loopback', { gateway: { metricsHost: '0.0.0.0' } }, 'gateway.metricsHost', /loopback only/],
  ['duplicate model names', { models: [{ name: 'a', builtin: 'tiny' }, { name: 'a', builtin: 'bench' }], defaultModel: 'a' }, 'models', /used twice/],
  ['gateway confinement with the process backend', { workers: { backend: 'process' }, egress: { confineGateway: true } }, 'egress.confineGateway', /needs workers\.backend "warden" or "docker"/],
  ['gateway confinement with a warden the gateway starts', { warden: { start: true }, egress: { confineGateway: true } }, 'egress.confineGateway', /needs the warden as its own service/],
  ['gateway confinement without the filter', { egress: { mode: 'off', confineGateway: true } }, 'egress.confineGateway', /needs egress\.mode "enforce"/],
];

for (const [kind, input, key, message] of bad) {
  t.test(`bad config: ${kind} names the key and why`, async (t) => {
    const r = validateConfig(input);
    t.notOk(r.ok);
    if (r.ok) return;
    const issue = r.issues.find((i) => i.key === key);
    t.ok(issue, `an issue names ${key} (got ${JSON.stringify(r.issues)})`);
    t.match(issue?.message, message);
  });
}

t.test('a config that is not an object is refused', async (t) => {
  const r = validateConfig([1, 2]);
  t.notOk(r.ok);
});

t.test('loadConfig reads a file, applies flags over it, and reports errors with config_invalid', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'phantoma-config-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = join(dir, 'config.json');
  writeFileSync(file, JSON.stringify({ inference: { threads: 1, contextSize: 1024 } }));
  const c = loadConfig({ file, flags: { 'inference.threads': '2' } });
  t.equal(c.inference.threads, 2, 'flag overrides file');
  t.equal(c.inference.contextSize, 1024, 'file overrides default');

  writeFileSync(file, '{ not json');
  t.throws(() => loadConfig({ file }), { code: 'config_invalid', message: /not valid JSON/ });
  t.throws(() => loadConfig({ file: join(dir, 'missing.json') }), { code: 'config_unreadable' });
  t.throws(() => loadConfig({ flags: { 'inference.threads': 'x' } }), { code: 'config_invalid', message: /inference\.threads: expected integer, got "x"/ });
  t.throws(() => loadConfig({ flags: { nope: '1' } }), ConfigError);
});

t.test('every leaf setting is a CLI flag', async (t) => {
  const flags = configFlags().map((f) => f.flag);
  for (const f of ['--cacheDir', '--defaultModel', '--inference.batchSize', '--inference.contextSize', '--inference.threads', '--logLevel', '--models', '--gateway.port', '--gateway.tls', '--pool.size']) {
    t.ok(flags.includes(f), `${f} is a flag`);
  }
  t.same(overridesFromFlags({ models: '[{"name":"m","builtin":"tiny"}]', 'inference.threads': '1' }), { models: [{ name: 'm', builtin: 'tiny' }], inference: { threads: 1 } });
  t.throws(() => overridesFromFlags({ models: '[oops' }), { code: 'config_invalid' });
});
