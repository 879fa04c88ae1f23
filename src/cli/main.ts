#!/usr/bin/env node
// The phantoma command line. Each subcommand parses its own flags; every configuration setting is also
// accepted as a flag (--inference.threads=2). Exit codes: 0 ok, 1 internal error, 2 usage or
// configuration error, 3 model error, 4 auth/limits, 5 node could not serve, 6 unreachable or pin mismatch,
// 7 audit log broken, 8 a host check failed, 9 vault or keyd refused, 10 control plane or license (docs/errors.md).
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { configFlags, loadConfig } from '../config/load.ts';
import type { Config } from '../config/schema.ts';
import { ERRORS, UsageError, isPhantomaError, PhantomaError } from '../errors.ts';

export interface CommandContext {
  args: string[];
  config: () => Readonly<Config>;
  json: boolean;
  out: (line: string) => void;
  err: (line: string) => void;
}

export interface Command {
  summary: string;
  usage: string;
  options?: ParseArgsConfig['options'];
  run(ctx: CommandContext, parsed: { values: Record<string, string | boolean | undefined>; positionals: string[] }): Promise<number>;
}

// Each command's module is loaded only when that command runs (or for `phantoma --help`): the modules of
// serve, models and local-chat pull in fastify and node-llama-cpp, ≈ 1 s of CPU that `phantoma keys show`
// or a health probe should not pay.
const COMMANDS: Record<string, () => Promise<Command>> = {
  serve: async () => (await import('./serve.ts')).serveCommand,
  chat: async () => (await import('./chat.ts')).chatCommand,
  proxy: async () => (await import('./proxy.ts')).proxyCommand,
  'client-key': async () => (await import('./client-key.ts')).clientKeyCommand,
  apikeys: async () => (await import('./apikeys.ts')).apikeysCommand,
  keys: async () => (await import('./keys.ts')).keysCommand,
  vault: async () => (await import('./vault.ts')).vaultCommand,
  clients: async () => (await import('./clients.ts')).clientsCommand,
  enroll: async () => (await import('./enroll.ts')).enrollCommand,
  heartbeat: async () => (await import('./heartbeat.ts')).heartbeatCommand,
  keyd: async () => (await import('./keyd.ts')).keydCommand,
  update: async () => (await import('./update.ts')).updateCommand,
  audit: async () => (await import('./audit.ts')).auditCommand,
  doctor: async () => (await import('./doctor.ts')).doctorCommand,
  docker: async () => (await import('./docker.ts')).dockerCommand,
  egress: async () => (await import('./egress.ts')).egressCommand,
  models: async () => (await import('./models.ts')).modelsCommand,
  model: async () => (await import('./model.ts')).modelCommand,
  'local-chat': async () => (await import('./local-chat.ts')).localChatCommand,
  config: async () => CONFIG_COMMAND,
};

const CONFIG_COMMAND: Command = {
  summary: 'validate the configuration and print it with defaults filled in',
  usage: 'phantoma config check [--config FILE] [--json]',
  async run(ctx, parsed) {
    if (parsed.positionals[0] !== 'check') throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const config = ctx.config();
    ctx.out(ctx.json ? JSON.stringify(config) : `configuration is valid\n${JSON.stringify(config, null, 2)}`);
    return 0;
  },
};

const GLOBAL_OPTIONS = {
  config: { type: 'string' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const satisfies ParseArgsConfig['options'];

function settingOptions(): ParseArgsConfig['options'] {
  return Object.fromEntries(configFlags().map((f) => [f.flag.slice(2), { type: 'string' as const }]));
}

async function mainHelp(): Promise<string> {
  const loaded = await Promise.all(Object.entries(COMMANDS).map(async ([name, load]) => [name, await load()] as const));
  const cmds = loaded.map(([name, c]) => `  ${name.padEnd(12)} ${c.summary}`).join('\n');
  const settings = configFlags().map((f) => `  ${`${f.flag}=<${f.kind}>`.padEnd(28)} ${f.description}`).join('\n');
  return `phantoma — private LLM inference appliance\n\nusage: phantoma <command> [options]\n\ncommands:\n${cmds}\n\nglobal options:\n  --config FILE               JSON configuration file\n  --json                      machine-readable output\n  -h, --help                  help for phantoma or a command\n\nsettings (override the config file):\n${settings}\n\nexit codes: 0 ok, 1 internal error, 2 usage or configuration error, 3 model error,\n  4 authentication or rate limit, 5 node could not serve, 6 node unreachable or TLS pin mismatch,\n  7 audit log failed verification, 8 a host check failed, 9 vault or keyd refused,\n  10 control plane or license refused`;
}

export async function runCli(argv: string[], io: { out: (s: string) => void; err: (s: string) => void }): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    io.out(await mainHelp());
    return name === undefined ? 2 : 0;
  }
  if (name === '--version') {
    io.out('phantoma 0.1.0');
    return 0;
  }
  try {
    const [major, minor] = process.versions.node.split('.').map(Number) as [number, number];
    if (major !== 24 || minor < 15) {
      throw new PhantomaError(ERRORS.RUNTIME_UNSUPPORTED, `Node ${process.versions.node} is not the pinned Node 24 LTS (>= 24.15); run scripts/setup.sh and use bin/phantoma`);
    }
    const load = Object.hasOwn(COMMANDS, name) ? COMMANDS[name] : undefined;
    if (!load) throw new UsageError(ERRORS.CLI_USAGE, `unknown command "${name}" (try phantoma --help)`);
    const command = await load();
    let parsed;
    try {
      parsed = parseArgs({ args: rest, options: { ...GLOBAL_OPTIONS, ...settingOptions(), ...command.options }, allowPositionals: true, strict: true });
    } catch (err) {
      throw new UsageError(ERRORS.CLI_USAGE, `${(err as Error).message} (usage: ${command.usage})`);
    }
    const values = parsed.values as Record<string, string | boolean | undefined>;
    if (values.help) {
      io.out(`${command.summary}\n\nusage: ${command.usage}\n\nAll settings of \`phantoma --help\` are accepted as flags too.`);
      return 0;
    }
    const settingNames = new Set(configFlags().map((f) => f.flag.slice(2)));
    const flags = Object.fromEntries(Object.entries(values).filter(([k, v]) => settingNames.has(k) && typeof v === 'string')) as Record<string, string>;
    let config: Readonly<Config> | undefined;
    const ctx: CommandContext = {
      args: rest,
      json: values.json === true,
      out: io.out,
      err: io.err,
      config: () => (config ??= loadConfig({ ...(typeof values.config === 'string' ? { file: values.config } : {}), flags })),
    };
    return await command.run(ctx, { values, positionals: parsed.positionals });
  } catch (err) {
    const e = isPhantomaError(err) ? err : new PhantomaError(ERRORS.INTERNAL, (err as Error)?.stack ?? String(err));
    if (argv.includes('--json')) io.err(JSON.stringify({ error: { code: e.code, message: e.message, ...(e.details ? { details: e.details } : {}) } }));
    else io.err(`phantoma: ${e.message} [${e.code}]`);
    return e.exit;
  }
}

if (import.meta.main) {
  const code = await runCli(process.argv.slice(2), {
    out: (s) => process.stdout.write(s + '\n'),
    err: (s) => process.stderr.write(s + '\n'),
  });
  process.exitCode = code;
}
