// The one configuration schema. Defaults live here; src/config/load.ts validates a file plus CLI flags
// against it once at start-up and freezes the result. Nothing else reads process.env for settings.
import { Type, type Static } from '@sinclair/typebox';

const ModelName = Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$', description: 'name clients use in "model"' });

/** Per-model pool settings (issue 15); each absent one falls back to pool.* / inference.*. */
const ModelPoolSchema = Type.Object(
  {
    size: Type.Optional(Type.Integer({ minimum: 1, maximum: 64, description: 'warm workers kept ready for this model (default pool.size)' })),
    maxActive: Type.Optional(Type.Integer({ minimum: 1, maximum: 64, description: 'requests generating at once for this model (default pool.maxActive)' })),
    threads: Type.Optional(Type.Integer({ minimum: 1, maximum: 256, description: 'CPU threads per generation (default inference.threads); never more than the cores' })),
    contextSize: Type.Optional(Type.Integer({ minimum: 64, maximum: 131072, description: 'tokens of context per request (default inference.contextSize)' })),
    batchSize: Type.Optional(Type.Integer({ minimum: 1, maximum: 8192, description: 'prompt evaluation batch size (default inference.batchSize)' })),
    load: Type.Optional(Type.Union([Type.Literal('eager'), Type.Literal('lazy')], { description: 'eager (default): warm at start; lazy: no worker until the first request' })),
    idleSeconds: Type.Optional(Type.Integer({ minimum: 1, maximum: 604_800, description: 'after this long without a request the pool scales to zero; the next request starts a worker (default: never)' })),
  },
  { additionalProperties: false },
);

export const BuiltinModelSchema = Type.Object(
  {
    name: ModelName,
    builtin: Type.Union([Type.Literal('tiny'), Type.Literal('tiny-wide'), Type.Literal('bench')], { description: 'a test model Phantoma generates itself' }),
    pool: Type.Optional(ModelPoolSchema),
  },
  { additionalProperties: false },
);

export const FileModelSchema = Type.Object(
  {
    name: ModelName,
    path: Type.String({ minLength: 1, description: 'absolute path of a GGUF file' }),
    sha256: Type.Optional(Type.String({ pattern: '^[0-9a-f]{64}$', description: 'expected digest, checked before loading' })),
    pool: Type.Optional(ModelPoolSchema),
  },
  { additionalProperties: false },
);

export const ConfigSchema = Type.Object(
  {
    logLevel: Type.Union(
      ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((l) => Type.Literal(l)),
      { default: 'info', description: 'pino log level' },
    ),
    cacheDir: Type.String({ minLength: 1, default: '.cache', description: 'where generated test models are cached (relative to the project root)' }),
    models: Type.Array(Type.Union([BuiltinModelSchema, FileModelSchema]), {
      minItems: 1,
      maxItems: 16,
      default: [{ name: 'tiny', builtin: 'tiny' }],
      description: 'models this node serves (JSON array on the command line)',
    }),
    defaultModel: Type.String({ default: 'tiny', description: 'model used when a command names none' }),
    stateDir: Type.String({ minLength: 1, default: '.state', description: 'node state: API key hashes, TLS key and certificate (relative to the project root)' }),
    gateway: Type.Object(
      {
        host: Type.String({ minLength: 1, default: '0.0.0.0', description: 'address the API listens on' }),
        port: Type.Integer({ minimum: 0, maximum: 65535, default: 8443, description: 'API port (0 picks a free one)' }),
        tls: Type.Union([Type.Literal('self-signed'), Type.Literal('provided'), Type.Literal('off')], {
          default: 'self-signed',
          description: 'self-signed: made on first start; provided: tlsCertPath/tlsKeyPath; off: plain HTTP, loopback only',
        }),
        tlsCertPath: Type.Optional(Type.String({ minLength: 1, description: 'PEM certificate when tls is provided' })),
        tlsKeyPath: Type.Optional(Type.String({ minLength: 1, description: 'PEM private key when tls is provided' })),
        auth: Type.Union([Type.Literal('api-keys'), Type.Literal('none')], { default: 'api-keys', description: 'none is allowed only on a loopback host' }),
        bodyLimitBytes: Type.Integer({ minimum: 1024, maximum: 64 << 20, default: 1 << 20, description: 'largest request body accepted' }),
        requestTimeoutMs: Type.Integer({ minimum: 100, maximum: 3_600_000, default: 120_000, description: 'a request running longer is ended with its worker' }),
        maxQueue: Type.Integer({ minimum: 0, maximum: 10_000, default: 16, description: 'requests waiting for a worker before 503' }),
        rateLimitPerMinute: Type.Integer({ minimum: 1, maximum: 1_000_000, default: 120, description: 'requests per minute per API key' }),
        maxConcurrentPerKey: Type.Integer({ minimum: 1, maximum: 10_000, default: 4, description: 'requests in flight per API key' }),
        metricsHost: Type.String({ minLength: 1, default: '127.0.0.1', description: 'metrics listener address' }),
        metricsPort: Type.Integer({ minimum: 0, maximum: 65535, default: 9464, description: 'metrics port (0 picks a free one)' }),
        shutdownGraceMs: Type.Integer({ minimum: 0, maximum: 600_000, default: 30_000, description: 'how long SIGTERM waits for requests in flight' }),
        plaintextApi: Type.Boolean({ default: true, description: 'serve the plaintext OpenAI API (/v1/...); false: sealed requests only (docs/protocol.md)' }),
      },
      { additionalProperties: false, default: {} },
    ),
    audit: Type.Object(
      {
        maxFileBytes: Type.Integer({ minimum: 4096, maximum: 1 << 30, default: 16 << 20, description: 'audit.log is rotated before it grows past this' }),
        maxFiles: Type.Integer({ minimum: 1, maximum: 1000, default: 10, description: 'rotated audit files kept' }),
      },
      { additionalProperties: false, default: {} },
    ),
    workers: Type.Object(
      {
        backend: Type.Union([Type.Literal('warden'), Type.Literal('process'), Type.Literal('docker')], {
          default: 'warden',
          description: 'warden: isolated workers (own uid, namespaces, cgroups, tmpfs); docker: the same in throwaway containers (see docker.*); process: plain child processes, no isolation',
        }),
        memoryMaxBytes: Type.Integer({ minimum: 64 << 20, maximum: 2 ** 40, default: 4 * 2 ** 30, description: 'memory limit per worker (warden)' }),
        pidsMax: Type.Integer({ minimum: 8, maximum: 65536, default: 128, description: 'process/thread limit per worker (warden)' }),
        tmpfsBytes: Type.Integer({ minimum: 1 << 20, maximum: 2 ** 36, default: 64 << 20, description: "size of a worker's private tmpfs (warden)" }),
      },
      { additionalProperties: false, default: {} },
    ),
    warden: Type.Object(
      {
        socket: Type.String({ minLength: 1, default: '/run/phantoma/warden.sock', description: "the warden's unix socket" }),
        start: Type.Boolean({ default: false, description: 'start the warden as a child of this process (needs root; production runs it as its own unit)' }),
        cgroupName: Type.String({ pattern: '^[A-Za-z0-9._-]{1,64}$', default: 'phantoma', description: "the warden's cgroup subtree name" }),
        uidFrom: Type.Integer({ minimum: 1000, maximum: 2 ** 31, default: 61000, description: 'first worker uid' }),
        uidTo: Type.Integer({ minimum: 1000, maximum: 2 ** 31, default: 61999, description: 'last worker uid' }),
        downloadUid: Type.Integer({ minimum: 1000, maximum: 2 ** 31, default: 62000, description: 'uid (and gid) of the model download helper (issue 10); outside the worker range' }),
      },
      { additionalProperties: false, default: {} },
    ),
    egress: Type.Object(
      {
        mode: Type.Union([Type.Literal('enforce'), Type.Literal('off')], {
          default: 'enforce',
          description: 'enforce: workers only start while the kernel egress filter is verified; off: development only (loud warning, shown in the policy hash)',
        }),
        checkIntervalMs: Type.Integer({ minimum: 200, maximum: 600_000, default: 5000, description: "how often the filter's attachment is re-checked (BPF_PROG_QUERY via the warden)" }),
        probeIntervalMs: Type.Integer({ minimum: 1000, maximum: 86_400_000, default: 60_000, description: 'how often the live probe runs (also at start and after any failure)' }),
        confineGateway: Type.Boolean({
          default: false,
          description:
            "the gateway's own outbound connections limited to the warden's --gateway-egress allowlist (its control plane) by the socket BPF programs on its cgroup; no worker starts until that is verified (the packaged systemd units turn it on; needs the warden as its own service)",
        }),
      },
      { additionalProperties: false, default: {} },
    ),
    docker: Type.Object(
      {
        socket: Type.String({ minLength: 1, default: '/var/run/docker.sock', description: "dockerd's API socket (workers.backend docker); never mounted into a worker" }),
        image: Type.String({
          pattern: '^(auto|[a-z0-9][a-z0-9._/-]*:[A-Za-z0-9._-]+)$',
          default: 'auto',
          description: 'worker image; auto: phantoma-worker:<digest of this installation\'s files>, made by `phantoma docker build-image`',
        }),
        cgroupParent: Type.String({
          pattern: '^/[A-Za-z0-9._/-]{1,200}$',
          default: '/phantoma/workers',
          description: "CgroupParent of worker containers: the warden's workers/ cgroup, so its egress filter applies (cgroupfs driver path)",
        }),
        cpus: Type.Number({ minimum: 0.01, maximum: 256, default: 2, description: 'CPU limit per worker container (NanoCpus)' }),
        keydSocket: Type.Optional(Type.String({ pattern: '^/', description: "host path of keyd's worker socket, bind-mounted at /run/phantoma/keyd.sock in each worker (unset: not mounted)" })),
      },
      { additionalProperties: false, default: {} },
    ),
    pool: Type.Object(
      {
        size: Type.Integer({ minimum: 1, maximum: 64, default: 2, description: 'warm workers kept ready per model' }),
        maxActive: Type.Integer({ minimum: 1, maximum: 64, default: 1, description: 'requests generating at once per model' }),
        allowUnencryptedSwap: Type.Boolean({ default: false, description: 'start workers even though unencrypted swap is on (worker memory may reach the disk)' }),
      },
      { additionalProperties: false, default: {} },
    ),
    vault: Type.Object(
      {
        path: Type.Optional(Type.String({ minLength: 1, description: 'the vault file (default: <stateDir>/vault.phv)' })),
        credentialName: Type.String({ pattern: '^[A-Za-z0-9._-]{1,64}$', default: 'phantoma-vault-key', description: 'systemd credential holding the vault key file ($CREDENTIALS_DIRECTORY/<name>)' }),
        kdfLog2N: Type.Integer({ minimum: 10, maximum: 20, default: 17, description: 'scrypt cost log2(N) for a new vault or backup (17 = 128 MiB with r=8); below 15 needs allowWeakKdf' }),
        kdfR: Type.Integer({ minimum: 1, maximum: 16, default: 8, description: 'scrypt block size r' }),
        kdfP: Type.Integer({ minimum: 1, maximum: 4, default: 1, description: 'scrypt parallelism p' }),
        allowWeakKdf: Type.Boolean({ default: false, description: 'TESTS ONLY: allow kdfLog2N below 15 (fast, weak)' }),
        requestKeyValidityDays: Type.Integer({ minimum: 1, maximum: 3650, default: 90, description: 'validity of a new request key' }),
        rotationOverlapSeconds: Type.Integer({ minimum: 0, maximum: 30 * 86400, default: 86400, description: 'after phantoma keys rotate, the previous request keys still open requests this long' }),
        keydSocket: Type.String({ minLength: 1, default: '/run/phantoma/keyd/keyd.sock', description: "keyd's unix socket (bind-mounted into each worker's view by the warden)" }),
        keydStart: Type.Boolean({ default: true, description: 'phantoma serve starts keyd as a child when a vault exists' }),
      },
      { additionalProperties: false, default: {} },
    ),
    sealed: Type.Object(
      {
        maxEnvelopeBytes: Type.Integer({ minimum: 4096, maximum: 64 << 20, default: 4 << 20, description: 'largest sealed envelope accepted (413 sealed_envelope_too_large beyond)' }),
        windowMs: Type.Integer({ minimum: 1000, maximum: 3_600_000, default: 120_000, description: "accepted distance between an envelope's timestamp and the node's clock, either way" }),
        maxRememberedNonces: Type.Integer({ minimum: 1000, maximum: 10_000_000, default: 1_000_000, description: 'nonces kept for replay detection within the window; when full, new envelopes are refused (503)' }),
      },
      { additionalProperties: false, default: {} },
    ),
    control: Type.Object(
      {
        required: Type.Boolean({ default: false, description: 'refuse inference (not_enrolled) until the node holds a lease from the control plane (docs/licensing.md)' }),
        heartbeats: Type.Boolean({ default: true, description: 'phantoma serve sends heartbeats (signed by keyd) when the node is enrolled' }),
        heartbeatIntervalSeconds: Type.Optional(Type.Integer({ minimum: 10, maximum: 86400, description: "overrides the interval the control plane's lease asks for" })),
        heartbeatJitter: Type.Number({ minimum: 0, maximum: 0.5, default: 0.2, description: 'fraction of the interval each delay varies by, either way' }),
      },
      { additionalProperties: false, default: {} },
    ),
    updates: Type.Object(
      {
        root: Type.String({ minLength: 1, default: '/opt/phantoma', description: 'the A/B slot layout: slots/a, slots/b, the current symlink and update-state.json' }),
        trustedRoot: Type.String({ minLength: 1, default: 'deploy/update-root.json', description: "the pinned TUF root.json (version 1 or any later one the node verified); copied into <stateDir>/updates/tuf on first use" }),
        repositoryUrl: Type.Optional(Type.String({ pattern: '^(https?|file)://', maxLength: 300, description: "the TUF repository; default the enrolled control plane's /v1/updates/ (pinned like heartbeats)" })),
        trialSeconds: Type.Integer({ minimum: 5, maximum: 3600, default: 120, description: 'a new release must mark itself good within this, or the supervisor switches back' }),
      },
      { additionalProperties: false, default: {} },
    ),
    inference: Type.Object(
      {
        threads: Type.Integer({ minimum: 1, maximum: 256, default: 2, description: 'CPU threads per generation; never more than the cores' }),
        contextSize: Type.Integer({ minimum: 64, maximum: 131072, default: 2048, description: 'tokens of context per request' }),
        batchSize: Type.Integer({ minimum: 1, maximum: 8192, default: 512, description: 'prompt evaluation batch size' }),
        memoryBudgetBytes: Type.Optional(Type.Integer({
          minimum: 16 << 20,
          maximum: 2 ** 50,
          description: "RAM every model's pool may use when warm (estimate: weights once per model, KV cache and runtime per worker); default 90% of the host's RAM; a config over it is refused",
        })),
        persistentThreadpool: Type.Boolean({
          default: true,
          description: 'give each worker context a persistent CPU threadpool (native/threadpool), as llama-server does',
        }),
      },
      { additionalProperties: false, default: {} },
    ),
  },
  { additionalProperties: false },
);

export type Config = Static<typeof ConfigSchema>;
export type ModelConfig = Config['models'][number];
