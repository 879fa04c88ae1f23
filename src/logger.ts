// The one logger factory. Redaction is declared once, by path, for every place a secret or content
// could appear in a log object; code logs ids, sizes, durations and codes, never bodies.
import { pino, type Logger, type DestinationStream } from 'pino';

export const REDACT_PATHS = [
  'req.headers.authorization',
  'req.headers.cookie',
  'headers.authorization',
  'authorization',
  'apiKey',
  'prompt',
  'messages',
  'content',
  'body',
  'text',
  '*.prompt',
  '*.messages',
  '*.content',
  '*.body',
  '*.text',
];

export function createLogger(opts: { level: string; destination?: DestinationStream }): Logger {
  return pino(
    {
      level: opts.level,
      base: { pid: process.pid },
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    },
    opts.destination ?? pino.destination({ fd: 2, sync: true }),
  );
}

export type { Logger };
