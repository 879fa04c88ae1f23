// The vault settings of a validated config, resolved: its path, the KDF parameters for new files (the
// weak test-only bound enforced here), key validity and overlap.
import { join } from 'node:path';
import type { Config } from '../config/schema.ts';
import { ConfigError, ERRORS } from '../errors.ts';
import { resolveFromRoot } from '../paths.ts';
import { SCRYPT_MIN_STRONG_LOG2N, checkScryptParams, type ScryptParams } from './format.ts';

export function vaultPathOf(config: Readonly<Config>): string {
  return config.vault.path ? resolveFromRoot(config.vault.path) : join(resolveFromRoot(config.stateDir), 'vault.phv');
}

export function scryptParamsOf(config: Readonly<Config>): ScryptParams {
  const v = config.vault;
  const params = { log2N: v.kdfLog2N, r: v.kdfR, p: v.kdfP };
  if (v.kdfLog2N < SCRYPT_MIN_STRONG_LOG2N && !v.allowWeakKdf) {
    throw new ConfigError(ERRORS.CONFIG_INVALID, `vault.kdfLog2N ${v.kdfLog2N} is below ${SCRYPT_MIN_STRONG_LOG2N}: allowed for tests only, with vault.allowWeakKdf=true`);
  }
  const problem = checkScryptParams(params);
  if (problem) throw new ConfigError(ERRORS.CONFIG_INVALID, `vault.kdf*: ${problem}`);
  return params;
}

export const DAY_MS = 86_400_000;

export function keyTimingOf(config: Readonly<Config>): { validityMs: number; overlapMs: number } {
  return { validityMs: config.vault.requestKeyValidityDays * DAY_MS, overlapMs: config.vault.rotationOverlapSeconds * 1000 };
}
