// phantoma keyd: holds the vault's private keys and answers on a unix socket (src/vault/keyd.ts). Started
// by `phantoma serve` when a vault exists (or as its own unit). Prints one JSON line {"ready":...} when
// listening, then one {"audit":{...}} line per refusal or decapsulation, which the gateway relays into the
// audit log. No network, non-dumpable (no core file, no same-uid ptrace of its keys).
import type { Command } from './main.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { createLogger } from '../logger.ts';
import { setDumpable } from '../native/addon.ts';
import { readVault } from '../vault/store.ts';
import { vaultPathOf } from '../vault/settings.ts';
import { createKeyService, listenKeyd, pruneExpiredInVault, watchedVault } from '../vault/keyd.ts';
import { CREDENTIAL_OPTIONS, vaultCredential } from './vault.ts';
import { intOption } from './options.ts';
import { createNotifier } from '../service/notify.ts';

export const keydCommand: Command = {
  summary: 'run keyd, the process that holds the vault keys (started by serve when a vault exists)',
  usage: 'phantoma keyd [--gateway-uid UID] [--passphrase-file F | --key-file F] [--exit-with-parent] [--docker-cgroup-parent PATH]  (socket: --vault.keydSocket)',
  options: { ...CREDENTIAL_OPTIONS, 'gateway-uid': { type: 'string' }, 'exit-with-parent': { type: 'boolean' }, 'docker-cgroup-parent': { type: 'string' } },
  async run(ctx, { values, positionals }) {
    if (positionals.length) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const config = ctx.config();
    setDumpable(false);
    const logger = createLogger({ level: config.logLevel });
    const gatewayUid = intOption(values['gateway-uid'], 'gateway-uid', process.getuid!(), 0, 2 ** 31);
    const path = vaultPathOf(config);
    const opened = readVault(path, vaultCredential(config, values));
    const contents = watchedVault(path, opened.keys, opened.contents, logger);
    const service = createKeyService({
      contents,
      policy: {
        gatewayUid,
        workerUids: { from: config.warden.uidFrom, to: config.warden.uidTo },
        cgroupName: config.warden.cgroupName,
        ...(typeof values['docker-cgroup-parent'] === 'string' ? { dockerCgroupParent: values['docker-cgroup-parent'] } : {}),
      },
      audit: (e) => ctx.out(JSON.stringify({ audit: e })),
    });
    const server = await listenKeyd({ socketPath: config.vault.keydSocket, service, logger });
    // Keys past their rotation overlap leave the vault file too, not only keyd's use (docs/threat-model.md).
    const prune = (): void => {
      try {
        const removed = pruneExpiredInVault(path, opened.keys, new Date());
        if (removed.length) logger.info({ removed }, 'keyd: expired request keys removed from the vault');
      } catch (err) {
        logger.warn({ code: (err as { code?: string }).code }, 'keyd: could not prune expired request keys; will retry');
      }
    };
    prune();
    const pruneTimer = setInterval(prune, 60_000);
    pruneTimer.unref();
    ctx.out(JSON.stringify({ ready: true, pid: process.pid, socket: config.vault.keydSocket }));
    // As its own systemd unit (Type=notify, issue 13): READY=1 once the socket listens. No-op otherwise.
    const notifier = createNotifier(process.env);
    notifier.ready(`keyd listening on ${config.vault.keydSocket}`);
    const stopped = Promise.withResolvers<void>();
    const stop = (): void => {
      notifier.stopping('keyd stopping');
      void server.close().then(() => stopped.resolve());
    };
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
    // Started by the gateway: its end closes our stdin, and keyd must not outlive it holding the keys.
    if (values['exit-with-parent']) {
      process.stdin.once('end', stop).once('error', stop).resume();
    }
    await stopped.promise;
    return 0;
  },
};
