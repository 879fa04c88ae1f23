// The version this installation runs: package.json's, which `phantoma-release build` requires to equal the
// release's manifest version. So after an update the heartbeat, the audit log's node_started and receipts
// report the release the A/B slot holds.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { projectRoot } from './paths.ts';

export function installedVersion(root: string = projectRoot()): string {
  try {
    const v = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version?: unknown }).version;
    return typeof v === 'string' && /^[0-9A-Za-z.+-]{1,32}$/.test(v) ? v : '0.0.0';
  } catch {
    return '0.0.0';
  }
}
