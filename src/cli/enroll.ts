// phantoma enroll --url https://cp:8444 --pin sha256:… : enrols this node with its control plane. The
// one-time token is read from stdin (or --token-fd N): never an argument (it would sit in /proc/*/cmdline
// and shell history) and never written to disk (the ledger records its SHA-256 only). The node's identity
// key signs the claim; it comes from the vault, opened here with the vault credential.
import { readSync } from 'node:fs';
import type { Command } from './main.ts';
import { ERRORS, UsageError, PhantomaError } from '../errors.ts';
import { resolveFromRoot } from '../paths.ts';
import { readVault } from '../vault/store.ts';
import { identityPrivateKey } from '../vault/contents.ts';
import { vaultPathOf } from '../vault/settings.ts';
import { CREDENTIAL_OPTIONS, vaultCredential } from './vault.ts';
import { enrolNode, signerFromPrivateKey } from '../control/node.ts';

const TOKEN_MAX = 256;

/** Reads at most TOKEN_MAX bytes from fd until EOF or a newline. */
export function readTokenFrom(fd: number): string {
  const buf = Buffer.alloc(TOKEN_MAX + 1);
  let off = 0;
  for (let i = 0; i < TOKEN_MAX + 1 && off <= TOKEN_MAX; i++) {
    let n: number;
    try {
      n = readSync(fd, buf, off, buf.length - off, null);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EAGAIN') continue;
      throw new UsageError(ERRORS.CLI_USAGE, `cannot read the enrolment token from fd ${fd}: ${(err as NodeJS.ErrnoException).code}`);
    }
    if (n === 0) break;
    off += n;
    if (buf.subarray(0, off).includes(0x0a)) break;
  }
  const token = buf.subarray(0, off).toString('utf8').split('\n')[0]!.trim();
  buf.fill(0);
  if (off > TOKEN_MAX) throw new UsageError(ERRORS.CLI_USAGE, 'the enrolment token input is too long');
  if (!token) throw new UsageError(ERRORS.CLI_USAGE, `no enrolment token on fd ${fd} (pipe it in: phantoma-cp tokens create --node NAME | phantoma enroll --url … --pin …)`);
  return token;
}

export const enrollCommand: Command = {
  summary: 'enrol this node with its control plane (token on stdin, never an argument)',
  usage: 'phantoma enroll --url https://HOST:PORT --pin sha256:HEX [--token-fd N] [--passphrase-file F | --key-file F] [--json]',
  options: { url: { type: 'string' }, pin: { type: 'string' }, 'token-fd': { type: 'string' }, ...CREDENTIAL_OPTIONS },
  async run(ctx, { values, positionals }) {
    if (positionals.length > 0 || typeof values.url !== 'string' || typeof values.pin !== 'string') throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const fdText = typeof values['token-fd'] === 'string' ? values['token-fd'] : '0';
    if (!/^[0-9]{1,4}$/.test(fdText)) throw new UsageError(ERRORS.CLI_USAGE, '--token-fd takes a file descriptor number');
    const config = ctx.config();
    const token = readTokenFrom(Number(fdText));
    const { contents } = readVault(vaultPathOf(config), vaultCredential(config, values));
    const signer = signerFromPrivateKey(identityPrivateKey(contents));
    let state;
    try {
      state = await enrolNode({ url: values.url, pin: values.pin, token, signer, stateDir: resolveFromRoot(config.stateDir), version: '0.1.0' });
    } catch (err) {
      if (err instanceof PhantomaError) throw err;
      throw new PhantomaError(ERRORS.INTERNAL, (err as Error).message, { cause: err });
    }
    const l = state.lease.lease;
    ctx.out(
      ctx.json
        ? JSON.stringify({ node: state.node, url: state.url, pin: state.pin, expiresAt: l.expiresAt, graceSeconds: l.graceSeconds, heartbeatIntervalSeconds: l.heartbeatIntervalSeconds })
        : `enrolled as ${state.node} with ${state.url}; lease valid until ${l.expiresAt} (+${l.graceSeconds} s grace); heartbeats every ${l.heartbeatIntervalSeconds} s`,
    );
    return 0;
  },
};
