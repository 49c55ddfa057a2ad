/**
 * The client commands: `status` (a dest's sessions or a source's migrations: status.ts),
 * `register`, `freeze` and `unregister` (a source's control API). They speak to the daemons'
 * UNIX sockets (or a source's TCP control listener, with its bearer token).
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { call, parse, str, UsageError, type Target } from './common.js';

// `status` has a file of its own (status.ts, with its rendering in status-view.ts).
export { runStatus, STATUS_USAGE } from './status.js';

const CONTROL_OPTIONS = {
  control: { type: 'string' },
  'control-url': { type: 'string' },
  'token-file': { type: 'string' },
} as const;

const CONTROL_HELP = `  --control PATH         the source's control socket (default /run/yabusame/source.sock)
  --control-url URL      or its TCP listener (e.g. http://10.0.0.5:7071) ...
  --token-file FILE      ... with the bearer token in this file`;

/** The source's control API from the options (the socket by default). */
function sourceTarget(v: Record<string, unknown>): Target {
  const url = str(v['control-url']);
  if (url) {
    if (!URL.canParse(url) || !/^https?:$/.test(new URL(url).protocol)) {
      throw new UsageError(`--control-url: expected http://host:port, got "${url}"`);
    }
    const tokenFile = str(v['token-file']);
    const token = tokenFile ? readFileSync(tokenFile, 'utf8').trim() : undefined;
    return { url, token };
  }
  return { socketPath: str(v['control']) ?? '/run/yabusame/source.sock' };
}

export const REGISTER_USAGE = `Usage: yabusame register --id ID --image PATH [--frozen] [--secret-file FILE]
                         [--qmp SOCKET] [control]

Registers a migration with a source. Without --secret-file the source generates the secret and
this prints it, once: give it to the destination's VMM (the handoff's "secret"). With --qmp the
source follows that QEMU's QMP socket (an absolute path) and marks the migration frozen when
QEMU stops the VM for its migration.

${CONTROL_HELP}
`;

export async function runRegister(args: string[]): Promise<void> {
  const v = parse(
    args,
    {
      ...CONTROL_OPTIONS,
      id: { type: 'string' },
      image: { type: 'string' },
      frozen: { type: 'boolean' },
      'secret-file': { type: 'string' },
      qmp: { type: 'string' },
    },
    REGISTER_USAGE,
  );
  const id = str(v['id']);
  const image = str(v['image']);
  if (!id || !image) throw new UsageError(REGISTER_USAGE);
  const secretFile = str(v['secret-file']);
  const body = (await call(sourceTarget(v), 'POST', '/v1/migrations', {
    id,
    image,
    frozen: v['frozen'] === true,
    ...(secretFile ? { secret: readFileSync(secretFile, 'utf8').trim() } : {}),
    ...(str(v['qmp']) ? { qmp: resolve(str(v['qmp'])!) } : {}),
  })) as { secret?: string; state: string };
  process.stdout.write(`${id}: ${body.state}\n`);
  if (body.secret) process.stdout.write(`secret ${body.secret}\n`);
}

export const FREEZE_USAGE = `Usage: yabusame freeze --id ID [control]

Marks the migration frozen on the source: its VM is stopped, so pages can no longer change and
held requests are answered.

${CONTROL_HELP}
`;

export async function runFreeze(args: string[]): Promise<void> {
  const v = parse(args, { ...CONTROL_OPTIONS, id: { type: 'string' } }, FREEZE_USAGE);
  const id = str(v['id']);
  if (!id) throw new UsageError(FREEZE_USAGE);
  await call(sourceTarget(v), 'POST', `/v1/migrations/${encodeURIComponent(id)}/freeze`);
  process.stdout.write(`${id}: frozen\n`);
}

export const UNREGISTER_USAGE = `Usage: yabusame unregister --id ID [control]

Aborts the migration on the source (if it is not complete) and forgets it; answers once the
image file is closed.

${CONTROL_HELP}
`;

export async function runUnregister(args: string[]): Promise<void> {
  const v = parse(args, { ...CONTROL_OPTIONS, id: { type: 'string' } }, UNREGISTER_USAGE);
  const id = str(v['id']);
  if (!id) throw new UsageError(UNREGISTER_USAGE);
  await call(sourceTarget(v), 'DELETE', `/v1/migrations/${encodeURIComponent(id)}`);
  process.stdout.write(`${id}: removed\n`);
}
