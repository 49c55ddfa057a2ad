/** The version of this package (package.json), for --version and the start-up log line. */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export const VERSION = (
  JSON.parse(
    readFileSync(fileURLToPath(new URL('../../../package.json', import.meta.url)), 'utf8'),
  ) as { version: string }
).version;
