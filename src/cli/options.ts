// Parsing of command-specific numeric flags (settings flags are typed by the config schema instead).
import { ERRORS, UsageError } from '../errors.ts';

export function intOption(v: string | boolean | undefined, name: string, fallback: number, min: number, max: number): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max) throw new UsageError(ERRORS.CLI_USAGE, `--${name} must be an integer from ${min} to ${max}`);
  return n;
}
