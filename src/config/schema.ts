// The one configuration schema. Defaults live here; src/config/load.ts validates a file plus CLI flags
// against it once at start-up and freezes the result. Nothing else reads process.env for settings.
import { Type, type Static } from '@sinclair/typebox';

const ModelName = Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$', description: 'name clients use in "model"' });

export const BuiltinModelSchema = Type.Object(
  {
    name: ModelName,
    builtin: Type.Union([Type.Literal('tiny'), Type.Literal('bench')], { description: 'a test model Phantoma generates itself' }),
  },
  { additionalProperties: false },
);

export const FileModelSchema = Type.Object(
  {
    name: ModelName,
    path: Type.String({ minLength: 1, description: 'absolute path of a GGUF file' }),
    sha256: Type.Optional(Type.String({ pattern: '^[0-9a-f]{64}$', description: 'expected digest, checked before loading' })),
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
    inference: Type.Object(
      {
        threads: Type.Integer({ minimum: 1, maximum: 256, default: 2, description: 'CPU threads per generation; never more than the cores' }),
        contextSize: Type.Integer({ minimum: 64, maximum: 131072, default: 2048, description: 'tokens of context per request' }),
        batchSize: Type.Integer({ minimum: 1, maximum: 8192, default: 512, description: 'prompt evaluation batch size' }),
      },
      { additionalProperties: false, default: {} },
    ),
  },
  { additionalProperties: false },
);

export type Config = Static<typeof ConfigSchema>;
export type ModelConfig = Config['models'][number];
