// The control plane's one configuration schema (TypeBox, defaults in the schema), validated once and frozen.
// `phantoma-cp` reads a JSON file (--config) and a few flags; nothing later reads process.env for settings.
import { readFileSync } from 'node:fs';
import { Type, type Static } from '@sinclair/typebox';
import { Value, ValueErrorType } from '@sinclair/typebox/value';
import { CP_ERRORS, CpError } from './errors.ts';

export const CpConfigSchema = Type.Object(
  {
    logLevel: Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((l) => Type.Literal(l)), { default: 'info' }),
    dataDir: Type.String({ minLength: 1, default: 'cp-data', description: 'the sealed lease key, its public half, the admin socket and (by default) the PGlite database' }),
    database: Type.String({
      minLength: 1,
      default: 'pglite',
      description: '"pglite" (embedded, in <dataDir>/db), "pglite:memory" (tests), or a postgres:// URL of a real server shared by N instances',
    }),
    host: Type.String({ minLength: 1, default: '0.0.0.0', description: 'address the node-facing HTTPS API listens on' }),
    port: Type.Integer({ minimum: 0, maximum: 65535, default: 8444 }),
    bodyLimitBytes: Type.Integer({ minimum: 1024, maximum: 65536, default: 4096, description: 'largest enrolment or heartbeat body read' }),
    metricsHost: Type.String({ minLength: 1, default: '127.0.0.1' }),
    metricsPort: Type.Integer({ minimum: 0, maximum: 65535, default: 9465 }),
    heartbeat: Type.Object(
      {
        intervalSeconds: Type.Integer({ minimum: 10, maximum: 86400, default: 600, description: 'told to nodes in every lease' }),
        historyDays: Type.Integer({ minimum: 1, maximum: 3650, default: 30, description: 'heartbeat history kept, then pruned' }),
        maxClockSkewSeconds: Type.Integer({ minimum: 0, maximum: 3600, default: 300, description: "a heartbeat whose time is further than this from the control plane's clock is refused" }),
      },
      { additionalProperties: false, default: {} },
    ),
    lease: Type.Object(
      {
        validitySeconds: Type.Integer({ minimum: 60, maximum: 365 * 86400, default: 7 * 86400, description: 'a lease is valid this long from issue' }),
        graceSeconds: Type.Integer({ minimum: 0, maximum: 90 * 86400, default: 3 * 86400, description: 'after expiry the node keeps serving this long' }),
        plan: Type.Object(
          {
            name: Type.String({ pattern: '^[A-Za-z0-9._-]{1,32}$', default: 'standard' }),
            maxModels: Type.Integer({ minimum: 0, maximum: 1024, default: 16 }),
            maxWorkers: Type.Integer({ minimum: 0, maximum: 65536, default: 64 }),
          },
          { additionalProperties: false, default: {} },
        ),
        newestRelease: Type.String({ pattern: '^[0-9A-Za-z.+-]{1,32}$', default: '0.1.0', description: 'the newest release nodes may install' }),
      },
      { additionalProperties: false, default: {} },
    ),
    updates: Type.Object(
      {
        repoDir: Type.Optional(Type.String({ minLength: 1, description: 'a TUF repository directory (phantoma-release init-repo) served under /v1/updates/' })),
        timestampKeyFile: Type.Optional(Type.String({ minLength: 1, description: 'the online TUF timestamp key; with it, the instance holding the advisory lock re-signs the timestamp' })),
        resignEverySeconds: Type.Integer({ minimum: 1, maximum: 86400, default: 300 }),
        timestampExpirySeconds: Type.Integer({ minimum: 60, maximum: 30 * 86400, default: 86400 }),
        renewBeforeSeconds: Type.Integer({ minimum: 0, maximum: 30 * 86400, default: 43200 }),
      },
      { additionalProperties: false, default: {} },
    ),
    key: Type.Object(
      {
        kdfLog2N: Type.Integer({ minimum: 10, maximum: 20, default: 17, description: 'scrypt cost for the sealed lease key' }),
        kdfR: Type.Integer({ minimum: 1, maximum: 16, default: 8 }),
        kdfP: Type.Integer({ minimum: 1, maximum: 4, default: 1 }),
        allowWeakKdf: Type.Boolean({ default: false, description: 'TESTS ONLY: allow kdfLog2N below 15' }),
        credentialName: Type.String({ pattern: '^[A-Za-z0-9._-]{1,64}$', default: 'phantoma-cp-key', description: 'systemd credential holding the key passphrase' }),
      },
      { additionalProperties: false, default: {} },
    ),
  },
  { additionalProperties: false },
);

export type CpConfig = Static<typeof CpConfigSchema>;

function deepFreeze<T>(value: T): Readonly<T> {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value)) deepFreeze(v);
  }
  return value;
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

/** Pure: defaults, validation (each problem names its key), cross-checks, freeze. */
export function validateCpConfig(input: unknown): Readonly<CpConfig> {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) throw new CpError(CP_ERRORS.CONFIG_INVALID, 'the configuration must be a JSON object');
  const withDefaults = Value.Default(CpConfigSchema, structuredClone(input)) as CpConfig;
  const issues: string[] = [];
  const seen = new Set<string>();
  for (const e of Value.Errors(CpConfigSchema, withDefaults)) {
    const key = e.path.replace(/^\//, '').replaceAll('/', '.') || '(root)';
    if (seen.has(key)) continue;
    seen.add(key);
    issues.push(`${key}: ${e.type === ValueErrorType.ObjectAdditionalProperties ? 'unknown key' : e.message}`);
  }
  if (issues.length === 0) {
    if (!isLoopback(withDefaults.metricsHost)) issues.push(`metricsHost: metrics are served on loopback only, not ${withDefaults.metricsHost}`);
    if (withDefaults.key.kdfLog2N < 15 && !withDefaults.key.allowWeakKdf) issues.push('key.kdfLog2N: below 15 needs key.allowWeakKdf (tests only)');
    const db = withDefaults.database;
    if (!(db === 'pglite' || db === 'pglite:memory' || db.startsWith('pglite:') || /^postgres(ql)?:\/\//.test(db))) issues.push('database: expected "pglite", "pglite:<dir>", "pglite:memory" or a postgres:// URL');
  }
  if (issues.length > 0) throw new CpError(CP_ERRORS.CONFIG_INVALID, `invalid control-plane configuration: ${issues.join('; ')}`, { details: { issues } });
  return deepFreeze(withDefaults);
}

export function loadCpConfig(file: string | undefined, overrides: Record<string, unknown>): Readonly<CpConfig> {
  let base: Record<string, unknown> = {};
  if (file !== undefined) {
    try {
      base = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
    } catch (err) {
      throw new CpError(CP_ERRORS.CONFIG_INVALID, `cannot read the configuration ${file}: ${(err as Error).message}`);
    }
  }
  return validateCpConfig({ ...base, ...overrides });
}
