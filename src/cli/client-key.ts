// phantoma client-key new FILE | show FILE: a sealed-API client's key pair, made on the client machine.
import type { Command } from './main.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { generateClientKey, loadClientKey, publicKeyBase64 } from '../client/client-key.ts';

export const clientKeyCommand: Command = {
  summary: "make or show a sealed-API client key (the node operator registers its public half with 'phantoma clients add')",
  usage: 'phantoma client-key new FILE | show FILE [--json]',
  async run(ctx, { positionals }) {
    const [verb, file, ...rest] = positionals;
    if ((verb !== 'new' && verb !== 'show') || !file || rest.length > 0) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const key = verb === 'new' ? generateClientKey(file) : loadClientKey(file);
    const pub = publicKeyBase64(key);
    ctx.out(ctx.json ? JSON.stringify({ file, publicKey: pub }) : `${verb === 'new' ? 'made' : 'client key'} ${file}\npublic key (for phantoma clients add NAME KEY): ${pub}`);
    return 0;
  },
};
