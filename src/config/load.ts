// Loads the configuration: file (JSON) → CLI overrides → schema defaults → validation → deep freeze.
// Every error names the offending key and why, so an operator can fix it without reading code.
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { Value, ValueErrorType } from '@sinclair/typebox/value';
import { type TSchema, Kind } from '@sinclair/typebox';
import { ConfigSchema, type Config } from './schema.ts';
import { ConfigError, ERRORS } from '../errors.ts';

export interface ConfigIssue {
  /** Dotted key, e.g. "inference.threads". */
  key: string;
  message: string;
}

function dotted(path: string): string {
  return path.replace(/^\//, '').replaceAll('/', '.') || '(root)';
}

function describe(e: { type: ValueErrorType; message: string; value: unknown }): string {
  if (e.type === ValueErrorType.ObjectAdditionalProperties) return 'unknown key';
  const got = e.value === undefined ? 'nothing' : JSON.stringify(e.value);
  return `${e.message.replace(/^Expected/, 'expected')}, got ${got}`;
}

/** Pure: validates an already-parsed object; returns the frozen config or the list of issues. */
export function validateConfig(input: unknown): { ok: true; config: Readonly<Config> } | { ok: false; issues: ConfigIssue[] } {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) {
    return { ok: false, issues: [{ key: '(root)', message: 'the configuration must be a JSON object' }] };
  }
  const withDefaults = Value.Default(ConfigSchema, structuredClone(input));
  const issues: ConfigIssue[] = [];
  const seen = new Set<string>();
  for (const e of Value.Errors(ConfigSchema, withDefaults)) {
    const key = dotted(e.path);
    // A union reports one error per branch; the first names the key well enough.
    if (seen.has(key)) continue;
    seen.add(key);
    issues.push({ key, message: describe(e) });
  }
  if (issues.length === 0) {
    const config = withDefaults as Config;
    const names = config.models.map((m) => m.name);
    const dup = names.find((n, i) => names.indexOf(n) !== i);
    if (dup) issues.push({ key: 'models', message: `model name "${dup}" is used twice` });
    if (!names.includes(config.defaultModel)) {
      issues.push({ key: 'defaultModel', message: `"${config.defaultModel}" is not one of the configured models (${names.join(', ')})` });
    }
  }
  if (issues.length === 0) {
    const g = (withDefaults as Config).gateway;
    if (g.tls === 'off' && !isLoopbackHost(g.host)) issues.push({ key: 'gateway.tls', message: `"off" (plain HTTP) is allowed only on a loopback host, not ${g.host}` });
    if (g.auth === 'none' && !isLoopbackHost(g.host)) issues.push({ key: 'gateway.auth', message: `"none" is allowed only on a loopback host, not ${g.host}` });
    if (g.tls === 'provided' && (!g.tlsCertPath || !g.tlsKeyPath)) issues.push({ key: 'gateway.tls', message: '"provided" needs gateway.tlsCertPath and gateway.tlsKeyPath' });
    if (!isLoopbackHost(g.metricsHost)) issues.push({ key: 'gateway.metricsHost', message: `metrics are served on loopback only, not ${g.metricsHost}` });
    const c = withDefaults as Config;
    if (c.egress.confineGateway) {
      // The filter goes on the gateway's own cgroup: a warden started by the gateway would be inside it
      // (the warden refuses), and without the warden (process backend) nobody attaches it.
      if (c.workers.backend === 'process') issues.push({ key: 'egress.confineGateway', message: 'needs workers.backend "warden" or "docker" (the warden attaches the filter)' });
      else if (c.warden.start) issues.push({ key: 'egress.confineGateway', message: 'needs the warden as its own service (warden.start false): a warden started by the gateway shares its cgroup' });
      if (c.egress.mode !== 'enforce') issues.push({ key: 'egress.confineGateway', message: 'needs egress.mode "enforce"' });
    }
  }
  if (issues.length > 0) return { ok: false, issues };
  return { ok: true, config: deepFreeze(withDefaults as Config) };
}

export function isLoopbackHost(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

export function deepFreeze<T>(value: T): Readonly<T> {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value)) deepFreeze(v);
  }
  return value;
}

/** Each leaf setting of the schema as a CLI flag: "--inference.threads" etc., with its JSON Schema type. */
export interface ConfigFlag {
  flag: string;
  path: string[];
  kind: 'string' | 'integer' | 'number' | 'boolean' | 'json';
  description: string;
}

export function configFlags(schema: TSchema = ConfigSchema, prefix: string[] = []): ConfigFlag[] {
  const out: ConfigFlag[] = [];
  const props = (schema as { properties?: Record<string, TSchema> }).properties ?? {};
  for (const [name, sub] of Object.entries(props)) {
    const path = [...prefix, name];
    if (sub[Kind] === 'Object') {
      out.push(...configFlags(sub, path));
      continue;
    }
    const kind = sub[Kind] === 'Integer' ? 'integer' : sub[Kind] === 'Number' ? 'number' : sub[Kind] === 'Boolean' ? 'boolean' : sub[Kind] === 'String' || (sub[Kind] === 'Union' && (sub.anyOf as TSchema[]).every((b) => b[Kind] === 'Literal' && typeof b.const === 'string')) ? 'string' : 'json';
    out.push({ flag: `--${path.join('.')}`, path, kind, description: String(sub.description ?? '') });
  }
  return out;
}

/** Turns "--key=value" CLI overrides into a nested object; values are typed by the schema. */
export function overridesFromFlags(values: Readonly<Record<string, string>>): Record<string, unknown> {
  const flags = new Map(configFlags().map((f) => [f.flag.slice(2), f]));
  const out: Record<string, unknown> = {};
  for (const [name, raw] of Object.entries(values)) {
    const flag = flags.get(name);
    if (!flag) throw new ConfigError(ERRORS.CLI_USAGE, `unknown setting --${name}`);
    let value: unknown = raw;
    if (flag.kind === 'integer' || flag.kind === 'number') value = raw.trim() === '' ? raw : Number(raw);
    if (flag.kind === 'integer' || flag.kind === 'number') value = Number.isNaN(value) ? raw : value;
    if (flag.kind === 'boolean') value = raw === 'true' ? true : raw === 'false' ? false : raw;
    if (flag.kind === 'json') {
      try {
        value = JSON.parse(raw);
      } catch {
        throw new ConfigError(ERRORS.CONFIG_INVALID, `--${name}: not valid JSON`, { details: { key: name } });
      }
    }
    let node = out;
    for (const p of flag.path.slice(0, -1)) node = (node[p] ??= {}) as Record<string, unknown>;
    node[flag.path.at(-1)!] = value;
  }
  return out;
}

function merge(base: Record<string, unknown>, over: Record<string, unknown>): Record<string, unknown> {
  const out = { ...base };
  for (const [k, v] of Object.entries(over)) {
    const b = out[k];
    out[k] = v && typeof v === 'object' && !Array.isArray(v) && b && typeof b === 'object' && !Array.isArray(b)
      ? merge(b as Record<string, unknown>, v as Record<string, unknown>)
      : v;
  }
  return out;
}

export interface LoadConfigOptions {
  /** Path of a JSON config file; none means defaults plus flags. */
  file?: string;
  flags?: Readonly<Record<string, string>>;
}

export function loadConfig(opts: LoadConfigOptions): Readonly<Config> {
  let fromFile: unknown = {};
  if (opts.file) {
    const path = resolve(opts.file);
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (err) {
      throw new ConfigError(ERRORS.CONFIG_UNREADABLE, `cannot read config file ${path}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`, { details: { path } });
    }
    try {
      fromFile = JSON.parse(text);
    } catch (err) {
      throw new ConfigError(ERRORS.CONFIG_INVALID, `config file ${path} is not valid JSON: ${(err as Error).message}`, { details: { path } });
    }
  }
  const overrides = overridesFromFlags(opts.flags ?? {});
  const combined = typeof fromFile === 'object' && fromFile !== null && !Array.isArray(fromFile) ? merge(fromFile as Record<string, unknown>, overrides) : fromFile;
  const result = validateConfig(combined);
  if (!result.ok) {
    const lines = result.issues.map((i) => `  ${i.key}: ${i.message}`).join('\n');
    throw new ConfigError(ERRORS.CONFIG_INVALID, `invalid configuration:\n${lines}`, { details: { issues: result.issues } });
  }
  return result.config;
}
