import t from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ERRORS, PhantomaError, ConfigError } from '../src/errors.ts';
import { ROOT } from './helpers.ts';

t.test('every error code is unique and well-formed', async (t) => {
  const codes = Object.values(ERRORS).map((e) => e.code);
  t.equal(new Set(codes).size, codes.length, 'no code is used twice');
  for (const e of Object.values(ERRORS)) {
    t.match(e.code, /^[a-z][a-z0-9_]+$/, `${e.code} is snake_case`);
    t.ok(e.status >= 400 && e.status <= 599, `${e.code} has an HTTP error status`);
    t.ok(Number.isInteger(e.exit) && e.exit > 0, `${e.code} has a non-zero exit status`);
  }
});

t.test('every error code is documented in docs/errors.md', async (t) => {
  const doc = readFileSync(join(ROOT, 'docs', 'errors.md'), 'utf8');
  for (const e of Object.values(ERRORS)) {
    t.match(doc, new RegExp(`^\\| \`${e.code}\` \\| ${e.status} \\|`, 'm'), `${e.code} has a row with its status`);
  }
  const documented = [...doc.matchAll(/^\| `([a-z0-9_]+)` \|/gm)].map((m) => m[1]);
  const known = new Set(Object.values(ERRORS).map((e) => e.code));
  t.same(documented.filter((c) => !known.has(c!)), [], 'the doc lists no code that does not exist');
});

t.test('typed errors carry their definition', async (t) => {
  const e = new ConfigError(ERRORS.CONFIG_INVALID, 'bad', { details: { key: 'x' } });
  t.ok(e instanceof PhantomaError);
  t.equal(e.name, 'ConfigError');
  t.equal(e.code, 'config_invalid');
  t.equal(e.exit, 2);
  t.same(e.details, { key: 'x' });
  t.ok(Object.isFrozen(e.details));
});
