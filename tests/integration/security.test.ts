// The security issue's attacks, each against the real daemons (`yabusame source` and
// `yabusame dest` as child processes): every one is refused with a coded error and no page
// data, and a legitimate migration beside it (vm-sim, with the secret the source gave) still
// completes with every page verified byte for byte. Waits are on events and states, never on
// sleeps; the one measurement over time is the EMFILE test's 2 s CPU window, whose bound lies
// far from both outcomes (an idle dest, a spinning one). KEEP=1 keeps the folder and its logs.
import t, { type Test } from 'tap';
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import http from 'node:http';
import type { IncomingMessage } from 'node:http';
import { join } from 'node:path';
import { WebSocketServer, type WebSocket } from 'ws';
import * as sys from '../../daemon/linux/sys.js';
import { requestJson } from '../../daemon/cli/common.js';
import { helloProof, NONCE_BYTES, NONCE_HEADER } from '../../protocol/auth.js';
import { encodeHandoff, type HandoffReply } from '../../protocol/handoff.js';
import {
  decodeFrame,
  encodeComplete,
  encodeData,
  encodeHello,
  encodeProgress,
  encodeWelcome,
  encodeZero,
} from '../../protocol/page-codec.js';
import {
  Channel,
  channelName,
  FrameType,
  HaveFlag,
  ProgressFlag,
  PROTOCOL_VERSION,
  type ChannelKind,
  type Frame,
  type FrameOf,
} from '../../protocol/wire.js';
import { generateImage } from '../../scripts/image/gen-image.js';
import { runVmSim, type VmSimResult } from '../../scripts/vm-sim/vm-sim.js';
import {
  CLI,
  destSessions,
  freePort,
  freezeMigration,
  migrationState,
  migrationStatus,
  registerMigration,
  startDest,
  startSource,
  type Daemon,
  type SourceDaemon,
} from '../../scripts/lib/daemons.js';
import { RawDest } from '../fixtures/raw-dest.js';
import { guestRam } from '../helpers/dest.js';
import { connectHandoff, sendRaw, type HandoffClient } from '../helpers/vmm-client.js';
import { makePki, type Pki } from '../helpers/tls.js';

const MiB = 1 << 20;
const PAGE = 4096;
const dir = mkdtempSync('/dev/shm/yabusame-sec-');
// Other uids may reach the dest's socket through this folder (the peer-credential test); the
// secret files in it stay 0600.
chmodSync(dir, 0o711);
/** A folder beside the image root whose name starts like it (a prefix check would let it in). */
const sibling = `${dir}-sibling`;
const daemons: Daemon[] = [];
t.teardown(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
  if (!process.env['KEEP']) rmSync(dir, { recursive: true, force: true });
  rmSync(sibling, { recursive: true, force: true });
});

type DestDaemon = Awaited<ReturnType<typeof startDest>>;
interface SessionView {
  migrationId: string;
  state: string;
  reconnects: number;
  error?: { code: string; message: string };
}
interface Sessions {
  active: SessionView[];
  ended: SessionView[];
  process: { fds: number; rssBytes: number };
}

let pki: Pki;
/** The source of the legitimate migrations (defaults: secrets, image root `dir`). */
let source: SourceDaemon;
/** --max-migrations 4, and its control API on TCP too, with a bearer token. */
let capped: SourceDaemon;
let cappedUrl: string;
let token: string;
/** wss, and wss that requires client certificates signed by the test CA. */
let tlsSource: SourceDaemon;
let mtlsSource: SourceDaemon;
/** Trusts the test CA and presents a client certificate. */
let dest: DestDaemon;
/** One session per uid, 8 pending handoffs per uid and 16 in all; trusts the CA, no client cert. */
let limited: DestDaemon;
/** --allowed-sources 10.0.0.0/8. */
let fenced: DestDaemon;
/** Trusts only the other CA; takes up to 1000 idle handoff connections (the EMFILE test). */
let otherCa: DestDaemon;

/** Every secret this file handed out or made up, to look for in logs and status. */
const secrets = new Set<string>();
const CREDENTIAL = 's3cret';

/** Keeps a daemon for the teardown as soon as it is up (even if another fails to start). */
function track<D extends Daemon>(started: Promise<D>): Promise<D> {
  return started.then((d) => {
    daemons.push(d);
    return d;
  });
}

/**
 * Starts the daemons one after the other: eight node processes starting at once on a busy
 * 2-core machine each take the CPU the others need to come up.
 */
async function inOrder<T extends unknown[]>(starts: {
  [K in keyof T]: () => Promise<T[K]>;
}): Promise<T> {
  const up: unknown[] = [];
  for (const start of starts) up.push(await start());
  return up as T;
}

t.before(async () => {
  pki = makePki(join(dir, 'pki'));
  token = randomBytes(24).toString('hex');
  const tokenFile = join(dir, 'control.token');
  writeFileSync(tokenFile, token + '\n', { mode: 0o600 });
  const controlPort = await freePort();
  cappedUrl = `http://127.0.0.1:${controlPort}`;
  const tls = ['--tls-cert-file', pki.server.cert, '--tls-key-file', pki.server.key];
  // With TLS the bulk thread listens on a port of its own (WELCOME names it): any free one.
  const bg = ['--background-listen', '127.0.0.1:0'];
  const sources = () =>
    inOrder([
      () => track(startSource(dir)),
      () =>
        track(
          startSource(
            dir,
            [
              '--max-migrations',
              '4',
              '--control-listen',
              `127.0.0.1:${controlPort}`,
              '--control-token-file',
              tokenFile,
            ],
            'source-capped',
          ),
        ),
      () => track(startSource(dir, [...tls, ...bg], 'source-tls')),
      () => track(startSource(dir, [...tls, ...bg, '--tls-client-ca-file', pki.ca], 'source-mtls')),
    ]);
  const clientCert = ['--client-cert-file', pki.client.cert, '--client-key-file', pki.client.key];
  const limits = [
    '--max-sessions-per-uid',
    '1',
    '--max-pending-handoffs',
    '16',
    '--max-pending-handoffs-per-uid',
    '8',
    // Idle connections of the pending test must not time out while it runs.
    '--handoff-timeout-ms',
    '60000',
  ];
  const dests = () =>
    inOrder([
      // A window (8 MiB) below the largest frame (16 MiB): the flooding source's oversized frame
      // exceeds any balance it could have (the default window is the whole ring, 16 MiB).
      () =>
        track(
          startDest(dir, [
            '--source-ca-file',
            pki.ca,
            ...clientCert,
            '--background-window-bytes',
            String(8 * MiB),
          ]),
        ),
      () => track(startDest(dir, [...limits, '--source-ca-file', pki.ca], 'dest-limited')),
      () => track(startDest(dir, ['--allowed-sources', '10.0.0.0/8'], 'dest-fenced')),
      () =>
        track(
          startDest(
            dir,
            [
              '--source-ca-file',
              pki.otherCa,
              '--max-pending-handoffs',
              '1000',
              '--max-pending-handoffs-per-uid',
              '1000',
              '--handoff-timeout-ms',
              '60000',
            ],
            'dest-other-ca',
          ),
        ),
    ]);
  [source, capped, tlsSource, mtlsSource] = await sources();
  [dest, limited, fenced, otherCa] = await dests();
});

// --- helpers ---

let seed = 1;
/** A generated memory image in the image root. */
async function image(name: string, sizeBytes: number): Promise<string> {
  const path = join(dir, `${name}.ram`);
  await generateImage({ path, sizeBytes, seed: seed++ });
  return path;
}

/** Polls `check` (with backoff) until it returns true; fails after `timeoutMs`. */
async function until(what: string, check: () => Promise<boolean>, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  for (let delayMs = 5; ; delayMs = Math.min(delayMs * 2, 100)) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, delayMs));
  }
}

async function sessionOf(d: DestDaemon, id: string): Promise<SessionView | undefined> {
  return (await destSessions<Sessions>(d)).active.find((s) => s.migrationId === id);
}

/** Resolves once the dest runs migration `id` (acked: the guest may run). */
function running(d: DestDaemon, id: string): Promise<void> {
  return until(`${id} runs`, async () => (await sessionOf(d, id))?.state === 'running');
}

function verified(t: Test, r: VmSimResult): void {
  t.equal(r.mismatchCount, 0, 'no page mismatched');
  t.equal(r.missingPages, 0, 'no page missing');
  t.equal(r.pagesVerified, r.totalPages, `all ${r.totalPages} pages verified byte for byte`);
}

/** The legitimate VMM: vm-sim with the secret the source gave. */
function vmSim(id: string, img: string, d: DestDaemon, src = source.ws, s = source) {
  return runVmSim({
    image: img,
    migrationId: id,
    secret: s.secretOf(id),
    source: src,
    destSocket: d.socket,
    workers: 2,
    timeoutMs: 120_000,
  });
}

/** A registered migration on `s` whose secret this file knows (and watches for in logs). */
async function register(
  s: SourceDaemon,
  id: string,
  img: string,
  frozen: boolean,
): Promise<string> {
  const secret = await registerMigration(s, { id, image: img, frozen });
  secrets.add(secret);
  return secret;
}

interface HttpAnswer {
  status: number;
  text: string;
  json: { error?: { code: string; message: string } } & Record<string, unknown>;
}

/** One HTTP request with exactly these headers and body (a UNIX socket or a TCP port). */
function request(
  where: { socketPath: string } | { port: number },
  method: string,
  path: string,
  body?: string,
  headers: Record<string, string> = {},
): Promise<HttpAnswer> {
  return new Promise((resolve, reject) => {
    const target = 'socketPath' in where ? where : { host: '127.0.0.1', port: where.port };
    // A connection of its own: a reused one the server has just closed would fail the request.
    const req = http.request({ ...target, agent: false, method, path, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString();
        let json: HttpAnswer['json'] = {};
        try {
          json = JSON.parse(text) as HttpAnswer['json'];
        } catch {
          // not JSON
        }
        resolve({ status: res.statusCode ?? 0, text, json });
      });
    });
    // A request that hangs (a FIFO opened for reading) fails the test instead of stalling it.
    req.setTimeout(15_000, () => req.destroy(new Error(`${method} ${path}: no answer in 15 s`)));
    req.on('error', reject);
    req.end(body);
  });
}

const json = { 'content-type': 'application/json' };

/** A hex secret nobody registered. */
const madeUpSecret = (): string => {
  const s = randomBytes(32).toString('hex');
  secrets.add(s);
  return s;
};

/**
 * Hands `socket` a handoff for `size` bytes of fresh guest RAM (a real userfaultfd), and
 * returns the first reply; the connection, the uffd and the RAM are let go afterwards.
 */
async function handoff(
  socket: string,
  req: { migrationId: string; source: string; secret?: string | undefined },
  size = 4 * MiB,
): Promise<HandoffReply> {
  const { base, fd } = guestRam(size);
  const c = await connectHandoff(socket);
  try {
    sendRaw(
      c,
      encodeHandoff({
        type: 'handoff',
        version: 1,
        migrationId: req.migrationId,
        source: req.source,
        ...(req.secret !== undefined ? { secret: req.secret } : {}),
        regions: [{ name: 'ram0', base, sizeBytes: size, offset: 0, pageSizeBytes: PAGE }],
      }),
      [fd],
    );
    return await c.next();
  } finally {
    c.close();
    sys.close(fd);
    sys.munmap(base, size);
  }
}

function refusedWith(t: Test, reply: HandoffReply, code: string, what: string): void {
  t.equal(reply.type, 'error', `${what}: refused before ack (${JSON.stringify(reply)})`);
  t.equal(reply.type === 'error' && reply.code, code, `${what}: ${code}`);
}

/**
 * A raw page connection to `port` that says HELLO with `auth(nonce)` as its proof, then sends
 * `after`; resolves with every frame it got once the source closed it.
 */
async function hello(
  port: number,
  channel: ChannelKind,
  id: string,
  auth: (nonce: Buffer) => Uint8Array | undefined,
  after: Uint8Array[] = [],
): Promise<Frame[]> {
  const c = await RawDest.connect(port, {}, `/v1/pages?channel=${channelName(channel)}`);
  c.send(encodeHello(channel, PROTOCOL_VERSION, id, auth(c.nonce!)));
  for (const f of after) c.send(f);
  await c.closed;
  return c.frames;
}

/** Asserts the connection got exactly one ERROR `code` and nothing of the migration. */
function refusedFrames(t: Test, frames: Frame[], code: string, what: string): void {
  const first = frames[0];
  t.equal(first?.type === FrameType.ERROR && first.code, code, `${what}: ERROR ${code}`);
  t.same(
    frames.map((f) => f.type),
    [FrameType.ERROR],
    `${what}: no WELCOME, DATA, ZERO or PROGRESS`,
  );
}

// --- 1. images: only regular files beneath the image root ---

t.test('the control API opens no file outside the image root, and only JSON', async (t) => {
  await image('inside', 4 * PAGE);
  mkdirSync(sibling, { recursive: true });
  writeFileSync(join(sibling, 'evil.ram'), Buffer.alloc(4 * PAGE, 1));
  symlinkSync('/etc/passwd', join(dir, 'link-absolute.ram'));
  symlinkSync('../../../../../../etc/passwd', join(dir, 'link-relative.ram'));
  symlinkSync('/nonexistent/yabusame/secret.ram', join(dir, 'link-nowhere.ram'));
  symlinkSync(join(sibling, 'evil.ram'), join(dir, 'link-sibling.ram'));
  execFileSync('mkfifo', [join(dir, 'fifo.ram')]);
  mkdirSync(join(dir, 'a-directory.ram'));
  const control = { socketPath: source.control };
  const register = (img: string): Promise<HttpAnswer> =>
    request(
      control,
      'POST',
      '/v1/migrations',
      JSON.stringify({ id: 'vm-files', image: img }),
      json,
    );

  const outside = [
    '/etc/passwd',
    '/etc/yabusame-no-such-file',
    '../../../../../../etc/passwd',
    '../no-such-file',
    `${dir}/../../../etc/shadow`,
    join(sibling, 'evil.ram'),
    'link-absolute.ram',
    'link-relative.ram',
    'link-nowhere.ram',
    'link-sibling.ram',
    '/proc/self/root/etc/passwd',
  ];
  const messages = new Set<string>();
  const passwdSize = String(statSync('/etc/passwd').size);
  for (const img of outside) {
    const res = await register(img);
    t.equal(res.status, 403, `${img}: 403`);
    t.equal(res.json.error?.code, 'IMAGE_OUTSIDE_ROOT', `${img}: IMAGE_OUTSIDE_ROOT`);
    const message = res.json.error?.message ?? '';
    t.notMatch(message, passwdSize, `${img}: the message tells no size`);
    messages.add(message.replace(img, '<image>'));
  }
  t.equal(messages.size, 1, `one message whatever lies outside: ${[...messages].join(' | ')}`);

  const notFound = await register('no-such-image.ram');
  t.equal(notFound.status, 404);
  t.equal(notFound.json.error?.code, 'IMAGE_NOT_FOUND', 'a missing image inside: IMAGE_NOT_FOUND');
  // A FIFO would block a reading open() for ever: the source opens non-blocking and checks.
  const fifo = await register('fifo.ram');
  t.equal(fifo.json.error?.code, 'IMAGE_NOT_REGULAR', 'a FIFO: IMAGE_NOT_REGULAR, at once');
  const list = await request(control, 'GET', '/v1/migrations');
  t.equal(list.status, 200, 'the control API answers right after the FIFO');
  const directory = await register('a-directory.ram');
  t.equal(directory.json.error?.code, 'IMAGE_NOT_REGULAR', 'a directory: IMAGE_NOT_REGULAR');

  // A browser can send these across origins without a preflight: refused.
  const body = JSON.stringify({ id: 'vm-files', image: 'inside.ram' });
  for (const [what, headers] of [
    ['a form post', { 'content-type': 'application/x-www-form-urlencoded' }],
    ['text/plain', { 'content-type': 'text/plain' }],
    ['no content type', {}],
  ] as const) {
    const res = await request(control, 'POST', '/v1/migrations', body, headers);
    t.equal(res.status, 415, `${what}: 415`);
    t.equal(res.json.error?.code, 'UNSUPPORTED_MEDIA_TYPE', `${what}: UNSUPPORTED_MEDIA_TYPE`);
  }
  t.same(
    (await request(control, 'GET', '/v1/migrations')).json['migrations'],
    [],
    'nothing was registered',
  );

  // The page port is plain HTTP: it serves /v1/pages upgrades and nothing else.
  const page = { port: source.port };
  t.equal((await request(page, 'GET', '/v1/migrations')).status, 404, 'page port: GET 404');
  t.equal((await request(page, 'POST', '/v1/migrations', body, json)).status, 404, 'POST 404');
  t.equal((await request(page, 'GET', '/v1/migrations/vm-files')).status, 404, 'status 404');
});

// --- 2. page connections prove the secret ---

t.test('HELLO without, with a wrong, replayed or misdirected proof: AUTH_FAILED', async (t) => {
  const id = 'vm-hello';
  const img = await image(id, 8 * MiB);
  const secret = Buffer.from(await register(source, id, img, false), 'hex');
  // The real dest connects both channels and waits for the freeze (its faults are held).
  const migration = vmSim(id, img, dest);
  await running(dest, id);
  const p = source.port;
  const { DEMAND, BACKGROUND } = Channel;

  for (const channel of [DEMAND, BACKGROUND]) {
    const name = channelName(channel);
    refusedFrames(
      t,
      await hello(p, channel, id, () => undefined),
      'AUTH_FAILED',
      `${name}, no proof`,
    );
    refusedFrames(
      t,
      await hello(p, channel, id, () => randomBytes(32)),
      'AUTH_FAILED',
      `${name}, random proof`,
    );
    refusedFrames(
      t,
      await hello(p, channel, id, (n) => helloProof(randomBytes(32), n, channel, id)),
      'AUTH_FAILED',
      `${name}, proof of another secret`,
    );
    // A HELLO recorded on one connection, replayed on another: that one's nonce differs.
    const recorded = await RawDest.connect(p, {}, `/v1/pages?channel=${name}`);
    const replay = helloProof(secret, recorded.nonce!, channel, id);
    refusedFrames(t, await hello(p, channel, id, () => replay), 'AUTH_FAILED', `${name}, replay`);
    await recorded.close();
    // A good proof for the other channel.
    const other = channel === DEMAND ? BACKGROUND : DEMAND;
    refusedFrames(
      t,
      await hello(p, channel, id, (n) => helloProof(secret, n, other, id)),
      'AUTH_FAILED',
      `${name}, the other channel's proof`,
    );
  }
  // A forged COMPLETE: as the first frame, or behind an unproven HELLO.
  refusedFrames(
    t,
    await (async () => {
      const c = await RawDest.connect(p, {}, '/v1/pages?channel=demand');
      c.send(encodeComplete(2048));
      await c.closed;
      return c.frames;
    })(),
    'BAD_STATE',
    'COMPLETE before HELLO',
  );
  refusedFrames(
    t,
    await hello(p, DEMAND, id, () => undefined, [encodeComplete(2048)]),
    'AUTH_FAILED',
    'COMPLETE behind an unproven HELLO',
  );

  const status = await migrationStatus<{
    state: string;
    connections: { demand: boolean; background: boolean };
    pages: { sent: number };
  }>(source, id);
  t.equal(status?.state, 'registered', 'the migration is untouched');
  t.same(status?.connections, { demand: true, background: true }, 'the real dest is connected');
  t.equal(status?.pages.sent, 0, 'no page went anywhere before the freeze');
  t.equal((await sessionOf(dest, id))?.reconnects, 0, 'the real dest never lost a connection');
  await freezeMigration(source, id);
  verified(t, await migration);
  t.equal(await migrationState(source, id), 'complete', 'then it completes');
});

t.test('a forged or early COMPLETE never makes the source release the image', async (t) => {
  const id = 'vm-complete';
  const img = await image(id, 4 * MiB);
  const secret = await register(source, id, img, true);
  const pages = (4 * MiB) / PAGE;
  const p = source.port;
  refusedFrames(
    t,
    await hello(p, Channel.DEMAND, id, () => randomBytes(32), [encodeComplete(pages)]),
    'AUTH_FAILED',
    'a forged COMPLETE from an unauthenticated peer',
  );
  t.equal(await migrationState(source, id), 'frozen', 'the image is kept');

  // An authenticated dest that has received nothing says COMPLETE.
  RawDest.secrets.set(id, Buffer.from(secret, 'hex'));
  for (const [what, count] of [
    ['COMPLETE before any page was sent', pages],
    ['COMPLETE for another page count', pages + 1],
  ] as const) {
    const { dest: early } = await RawDest.open(p, Channel.DEMAND, id);
    early.send(encodeComplete(count));
    await early.closed;
    const answer = early.frames.slice(1);
    t.equal(
      answer[0]?.type === FrameType.ERROR && answer[0].code,
      'BAD_STATE',
      `${what}: BAD_STATE`,
    );
    t.notOk(
      answer.some((f) => f.type === FrameType.COMPLETE),
      `${what}: not acknowledged`,
    );
    t.equal(await migrationState(source, id), 'frozen', `${what}: the image is kept`);
  }
  RawDest.secrets.delete(id);
  verified(t, await vmSim(id, img, dest));
  t.equal(await migrationState(source, id), 'complete', 'released once the real dest has it all');
});

// --- 3. control: a UNIX socket of mode 0660, or TCP with a bearer token ---

t.test('control sockets are 0660; the TCP control API wants the bearer token', async (t) => {
  for (const [what, path] of [
    ['source control socket', source.control],
    ['dest sessions socket', dest.control],
  ] as const) {
    const st = statSync(path);
    t.ok(st.isSocket(), `${what} is a UNIX socket`);
    t.equal((st.mode & 0o777).toString(8), '660', `${what}: mode 0660`);
  }
  const port = Number(new URL(cappedUrl).port);
  for (const [what, auth] of [
    ['no authorization', undefined],
    ['a wrong token', `Bearer ${'0'.repeat(token.length)}`],
    ['a token one character short', `Bearer ${token.slice(0, -1)}`],
    ['the token as Basic', `Basic ${token}`],
    ['the bare token', token],
  ] as const) {
    const headers: Record<string, string> = auth === undefined ? {} : { authorization: auth };
    const get = await request({ port }, 'GET', '/v1/migrations', undefined, headers);
    t.equal(get.status, 401, `${what}: GET 401`);
    t.equal(get.json.error?.code, 'UNAUTHORIZED', `${what}: UNAUTHORIZED`);
    const del = await request({ port }, 'DELETE', '/v1/migrations/any', undefined, headers);
    t.equal(del.status, 401, `${what}: DELETE 401`);
  }
  const ok = await request({ port }, 'GET', '/v1/migrations', undefined, {
    authorization: `Bearer ${token}`,
  });
  t.equal(ok.status, 200, 'the right token: 200');
});

t.test('a control token or secret file others can read stops the source at startup', async (t) => {
  const img = await image('startup', 4 * PAGE);
  const run = async (args: string[]): Promise<{ code: number | null; stderr: string }> => {
    const child = spawn(process.execPath, [CLI, 'source', ...args], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    const [code] = (await once(child, 'exit')) as [number | null];
    return { code, stderr };
  };
  const common = (name: string): string[] => [
    '--listen',
    '127.0.0.1:0',
    '--image-root',
    dir,
    '--control-socket',
    join(dir, `${name}.control`),
    '--metrics-listen',
    'off',
  ];
  const cases: Array<[string, number, (file: string) => string[], string]> = [
    [
      'token 0640',
      0o640,
      (f) => ['--control-listen', '127.0.0.1:0', '--control-token-file', f],
      'controlTokenFile',
    ],
    [
      'token 0604',
      0o604,
      (f) => ['--control-listen', '127.0.0.1:0', '--control-token-file', f],
      'controlTokenFile',
    ],
    [
      'secret file 0644',
      0o644,
      (f) => ['--migration', `id=vm-startup,image=${img},secret-file=${f}`],
      'secretFile',
    ],
  ];
  await Promise.all(
    cases.map(async ([what, mode, args, key], i) => {
      const file = join(dir, `loose-${i}.secret`);
      writeFileSync(file, randomBytes(24).toString('hex') + '\n');
      chmodSync(file, mode);
      const name = `refused-${i}`;
      const r = await run([...common(name), ...args(file)]);
      t.equal(r.code, 2, `${what}: exit 2 (configuration)`);
      t.match(r.stderr, key, `${what}: the message names ${key}`);
      t.match(r.stderr, /chmod 600/, `${what}: and says what to do`);
      t.throws(() => statSync(join(dir, `${name}.control`)), `${what}: nothing was bound`);
    }),
  );
});

// --- 7. registration cap ---

t.test('--max-migrations 4: the fifth registration gets 429 TOO_MANY_MIGRATIONS', async (t) => {
  const img = await image('capped', 16 * PAGE);
  const target = { url: cappedUrl, token };
  const reg = async (id: string) => {
    const res = await requestJson(target, 'POST', '/v1/migrations', { id, image: img });
    const told = (res.body as { secret?: string }).secret;
    if (told) secrets.add(told);
    return res;
  };
  for (let i = 1; i <= 4; i++) t.equal((await reg(`vm-cap-${i}`)).status, 201, `#${i}: 201`);
  const fifth = await reg('vm-cap-5');
  t.equal(fifth.status, 429, 'the fifth: 429');
  t.equal(
    (fifth.body as HttpAnswer['json']).error?.code,
    'TOO_MANY_MIGRATIONS',
    'TOO_MANY_MIGRATIONS',
  );
  t.equal((await requestJson(target, 'DELETE', '/v1/migrations/vm-cap-1')).status, 200);
  t.equal((await reg('vm-cap-5')).status, 201, 'after a delete, one more fits');
  const local = await request({ socketPath: capped.control }, 'GET', '/v1/migrations');
  t.equal((local.json['migrations'] as unknown[]).length, 4, 'its UNIX socket lists the same 4');
  // These registrations had no secret: each 201 carried the generated one, this once.
  const listed = await requestJson(target, 'GET', '/v1/migrations');
  t.notMatch(JSON.stringify(listed.body), /secret/, 'the list shows no secret');
});

// --- 4. who may hand over to the dest ---

/**
 * A handoff client run as another user: connects to `socket`, sends `line` (none: sends
 * nothing), prints whatever the daemon answers, and exits when the daemon closes.
 */
const PEER = `
const c = require('node:net').connect(process.env.SOCK);
let out = '';
c.setEncoding('utf8');
c.on('connect', () => { if (process.env.LINE) c.write(process.env.LINE); });
c.on('data', (d) => (out += d));
c.on('error', (e) => (out += JSON.stringify({ type: 'error', code: 'CLIENT_' + e.code }) + '\\n'));
c.on('close', () => process.stdout.write(out));
`;

/** Runs PEER as uid:gid; resolves with its first reply line. */
async function peerHandoff(uid: number, gid: number, socket: string, line = ''): Promise<unknown> {
  const child = spawn(process.execPath, ['-e', PEER], {
    uid,
    gid,
    cwd: '/',
    env: { SOCK: socket, LINE: line },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
  await once(child, 'exit');
  return JSON.parse(out.split('\n')[0] || '{}');
}

t.test('SO_PEERCRED: a uid and gid not allowed get HANDOFF_PEER_DENIED', async (t) => {
  // The socket's mode is the first barrier; opened to everyone here, the uid check is the only one.
  chmodSync(limited.socket, 0o666);
  const stranger = await peerHandoff(12345, 12345, limited.socket);
  t.match(stranger, { type: 'error', code: 'HANDOFF_PEER_DENIED' }, 'uid 12345 gid 12345: denied');
  // The primary gid is enough (the default allows our own gid): admitted, then refused for
  // what it sent (a line without the uffd).
  const line = encodeHandoff({
    type: 'handoff',
    version: 1,
    migrationId: 'vm-peer',
    source: source.ws,
    secret: madeUpSecret(),
    regions: [{ base: 0x10000000, sizeBytes: PAGE, offset: 0, pageSizeBytes: PAGE }],
  }).toString();
  const member = await peerHandoff(12345, 0, limited.socket, line);
  t.match(member, { type: 'error', code: 'HANDOFF_NO_FD' }, 'uid 12345 gid 0: admitted');
});

t.test('--max-sessions-per-uid 1: a second migration of the uid gets HANDOFF_QUOTA', async (t) => {
  const img = await image('vm-quota', 4 * MiB);
  await register(source, 'vm-quota', img, false);
  await register(source, 'vm-quota-2', img, true);
  const first = vmSim('vm-quota', img, limited);
  await running(limited, 'vm-quota');
  const second = await handoff(limited.socket, {
    migrationId: 'vm-quota-2',
    source: source.ws,
    secret: source.secretOf('vm-quota-2'),
  });
  refusedWith(t, second, 'HANDOFF_QUOTA', 'a second concurrent migration of uid 0');
  await freezeMigration(source, 'vm-quota');
  verified(t, await first);
  await until('the first session ended', async () => {
    return (await destSessions<Sessions>(limited)).active.length === 0;
  });
  verified(t, await vmSim('vm-quota-2', img, limited));
});

/** The dest's handoffs_total{result} counter. */
async function handoffs(d: DestDaemon, result: string): Promise<number> {
  const text = await (await fetch(`${d.http}/metrics`)).text();
  const m = new RegExp(`^yabusame_dest_handoffs_total\\{result="${result}"\\} (\\d+)$`, 'm').exec(
    text,
  );
  return m ? Number(m[1]) : 0;
}

/** Holds `n` idle handoff connections as uid:gid until its stdin closes; "ready" once queued. */
const HOLDER = `
const net = require('node:net');
const n = Number(process.env.N);
const socks = [];
let up = 0;
for (let i = 0; i < n; i++) {
  const c = net.connect(process.env.SOCK);
  c.on('connect', () => { if (++up === n) process.stdout.write('ready\\n'); });
  c.on('data', (d) => process.stdout.write('reply ' + d));
  c.on('error', () => {});
  socks.push(c);
}
process.stdin.on('end', () => { for (const c of socks) c.destroy(); });
process.stdin.resume();
`;

t.test('idle handoff connections: past 8 per uid or 16 in all, HANDOFF_BUSY', async (t) => {
  const eofBefore = await handoffs(limited, 'HANDOFF_EOF');
  // uid 0 holds 8 connections without a word: its pending budget.
  const idle: HandoffClient[] = [];
  for (let i = 0; i < 8; i++) idle.push(await connectHandoff(limited.socket));
  // Connections are accepted in order: these come after the 8.
  for (let i = 0; i < 3; i++) {
    const c = await connectHandoff(limited.socket);
    const reply = await c.next();
    refusedWith(t, reply, 'HANDOFF_BUSY', `uid 0's connection ${9 + i}`);
    t.match(reply.type === 'error' && reply.message, /uid 0 already has 8/, 'per uid');
    c.close();
  }
  // Another uid (admitted by its gid) takes the other 8 of the 16.
  const holder = spawn(process.execPath, ['-e', HOLDER], {
    uid: 20001,
    gid: 0,
    cwd: '/',
    env: { SOCK: limited.socket, N: '8' },
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  let held = '';
  holder.stdout.setEncoding('utf8');
  await new Promise<void>((resolve) =>
    holder.stdout.on('data', (s: string) => {
      held += s;
      if (held.includes('ready\n')) resolve();
    }),
  );
  const third = await peerHandoff(20002, 0, limited.socket);
  t.match(third, { type: 'error', code: 'HANDOFF_BUSY' }, 'a third uid: HANDOFF_BUSY');
  t.match((third as { message?: string }).message, /16 handoffs/, 'the daemon-wide limit');
  t.notMatch(held, /reply/, "the holder's 8 connections were all admitted");

  for (const c of idle) c.close();
  holder.stdin!.end();
  await once(holder, 'exit');
  await until('the dest let go of the 16 idle connections', async () => {
    return (await handoffs(limited, 'HANDOFF_EOF')) >= eofBefore + 16;
  });
  const img = await image('vm-after-busy', 4 * MiB);
  await register(source, 'vm-after-busy', img, true);
  verified(t, await vmSim('vm-after-busy', img, limited));
});

t.test('squatting a migration id: AUTH_FAILED before ack; the VMM is served', async (t) => {
  const id = 'vm-squat';
  const img = await image(id, 4 * MiB);
  await register(source, id, img, false);
  const squat = () =>
    handoff(dest.socket, { migrationId: id, source: source.ws, secret: madeUpSecret() });
  refusedWith(t, await squat(), 'AUTH_FAILED', 'a handoff with a wrong secret');
  refusedWith(
    t,
    await handoff(dest.socket, { migrationId: id, source: source.ws }),
    'HANDOFF_NO_SECRET',
    'a handoff without a secret',
  );
  const migration = vmSim(id, img, dest);
  await running(dest, id);
  refusedWith(t, await squat(), 'AUTH_FAILED', 'squatting the running migration');
  t.equal((await sessionOf(dest, id))?.reconnects, 0, 'the real session never noticed');
  await freezeMigration(source, id);
  verified(t, await migration);
});

// --- 8. the dest connects only where it may ---

t.test('SSRF: a source URL with credentials, path or query, or off the allowlist', async (t) => {
  let connections = 0;
  const server = http.createServer((_req, res) => res.end('admin'));
  server.on('connection', () => connections++);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  const port = (server.address() as { port: number }).port;
  const secret = madeUpSecret();
  for (const url of [
    `ws://user:${CREDENTIAL}@127.0.0.1:${port}/internal/admin?x=`,
    `ws://user:${CREDENTIAL}@127.0.0.1:${port}`,
    `ws://127.0.0.1:${port}/internal/admin`,
    `ws://127.0.0.1:${port}/?x=1`,
    `ws://127.0.0.1:${port}/#admin`,
    `http://127.0.0.1:${port}`,
  ]) {
    const reply = await handoff(dest.socket, { migrationId: 'vm-ssrf', source: url, secret });
    refusedWith(t, reply, 'HANDOFF_INVALID', url);
    t.notMatch(JSON.stringify(reply), CREDENTIAL, `${url}: the reply repeats no credential`);
  }
  for (const url of [`ws://127.0.0.1:${port}`, `ws://localhost:${port}`]) {
    const reply = await handoff(fenced.socket, { migrationId: 'vm-ssrf', source: url, secret });
    refusedWith(t, reply, 'SOURCE_DENIED', `${url} with --allowed-sources 10.0.0.0/8`);
  }
  // Both dests answer on: every refusal above is behind us, and no connection was made.
  t.ok((await fetch(`${dest.http}/healthz`)).ok);
  t.ok((await fetch(`${fenced.http}/healthz`)).ok);
  t.equal(connections, 0, 'the HTTP server behind those URLs saw no connection');
});

// --- 5. a malicious source ---

t.test('a flooding source does not exhaust the dest; a migration beside it verifies', async (t) => {
  const SIZE = 16 * MiB;
  const nonces = new WeakMap<IncomingMessage, Buffer>();
  const wss = new WebSocketServer({
    host: '127.0.0.1',
    port: 0,
    path: '/v1/pages',
    perMessageDeflate: false,
  });
  // As the real source does: a fresh nonce in every upgrade response, echoed in WELCOME. The
  // proof in HELLO is not checked: this source lets anyone in.
  wss.on('headers', (headers: string[], req: IncomingMessage) => {
    const nonce = randomBytes(NONCE_BYTES);
    nonces.set(req, nonce);
    headers.push(`${NONCE_HEADER}: ${nonce.toString('hex')}`);
  });
  await once(wss, 'listening');
  t.teardown(() => new Promise<void>((r) => wss.close(() => r())));
  /** What the dest sent on background connections, and how many it opened. */
  const haves: Array<FrameOf<typeof FrameType.HAVE>> = [];
  const errors: Array<FrameOf<typeof FrameType.ERROR>> = [];
  let credit = 0;
  let connections = 0;
  let wake = (): void => {};
  let background: WebSocket | null = null;
  wss.on('connection', (ws: WebSocket, req: IncomingMessage) => {
    const nonce = nonces.get(req)!;
    ws.once('message', (data: Buffer) => {
      const hello = decodeFrame(data);
      if (hello.type !== FrameType.HELLO) return;
      ws.send(
        encodeWelcome(hello.channel, PROTOCOL_VERSION, nonce, [
          { offset: 0, sizeBytes: SIZE, pageSizeBytes: PAGE, name: 'ram0' },
        ]),
      );
      if (hello.channel !== Channel.BACKGROUND) return;
      background = ws;
      connections++;
      credit = 0;
      ws.on('message', (m: Buffer) => {
        const f = decodeFrame(m);
        if (f.type === FrameType.HAVE) haves.push(f);
        if (f.type === FrameType.CREDIT) credit += f.bytes;
        if (f.type === FrameType.ERROR) errors.push(f);
        wake();
      });
      wake();
    });
  });
  /** Resolves once `cond` holds after some frame or connection (fails after 30 s instead). */
  const heard = (what: string, cond: () => boolean): Promise<void> =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the dest never sent ${what}`)), 30_000);
      wake = () => {
        if (!cond()) return;
        wake = () => {};
        clearTimeout(timer);
        resolve();
      };
      wake();
    });
  /**
   * Sends frames as fast as the connection takes them, up to 16 MiB queued here at a time (the
   * flood is paced by TCP only). Rejects if the dest closes the connection.
   */
  const flood = async (frames: Iterable<Uint8Array>): Promise<void> => {
    const ws = background!;
    let last: Promise<void> = Promise.resolve();
    for (const f of frames) {
      if (ws.readyState !== ws.OPEN) throw new Error('the dest closed the connection');
      last = new Promise<void>((resolve, reject) =>
        ws.send(f, (err) => (err ? reject(err) : resolve())),
      );
      if (ws.bufferedAmount > 16 * MiB) await last;
    }
    await last;
  };

  const ram = guestRam(SIZE);
  const vmm = await connectHandoff(dest.socket);
  sendRaw(
    vmm,
    encodeHandoff({
      type: 'handoff',
      version: 1,
      migrationId: 'vm-flooded',
      source: `ws://127.0.0.1:${(wss.address() as { port: number }).port}`,
      secret: madeUpSecret(),
      regions: [{ name: 'ram0', base: ram.base, sizeBytes: SIZE, offset: 0, pageSizeBytes: PAGE }],
    }),
    [ram.fd],
  );
  t.equal((await vmm.next()).type, 'ack', 'the scripted source got its session');
  await heard(
    'its HAVE sync and credit',
    () => haves.some((h) => h.flags & HaveFlag.LAST) && credit > 0,
  );
  const rssCold = (await destSessions<Sessions>(dest)).process.rssBytes;
  // The legitimate migration streams through the same dest (and its bulk thread) meanwhile.
  const img = await image('vm-beside', 32 * MiB);
  await register(source, 'vm-beside', img, true);
  const beside = vmSim('vm-beside', img, dest);

  // DATA without regard to credit: 64 MiB as fast as TCP takes it, then one frame larger than
  // the whole window (8 MiB), which no balance can cover. Refused (BAD_STATE) and the
  // connection dropped; the dest connects again, syncs and grants a new window.
  const payload = randomBytes(MiB);
  const huge = encodeData(0, 0, randomBytes(12 * MiB));
  let rounds = 0;
  const dataFlood = async (): Promise<void> => {
    const conn = connections;
    const errorsBefore = errors.length;
    rounds++;
    await flood(
      (function* () {
        for (let i = 0; i < 64; i++) yield encodeData(0, ((i % 8) + 8) * MiB, payload);
        yield huge;
      })(),
    ).catch(() => {
      // the dest dropped the connection mid-flood
    });
    await heard('an ERROR', () => errors.length > errorsBefore);
    const refusal = errors.at(-1);
    t.equal(refusal?.code, 'BAD_STATE', `DATA flood ${rounds}: BAD_STATE`);
    t.match(refusal?.message, /credit/, `DATA flood ${rounds}: ${refusal?.message}`);
    await heard('credit on a new connection', () => connections > conn && credit > 0);
  };
  // The first flood also brings every buffer of the dest into use (the payload ring, ws's
  // message buffers): what the dest holds after it is its working set, the baseline.
  await dataFlood();
  const rss0 = (await destSessions<Sessions>(dest)).process.rssBytes;

  const done = encodeProgress(ProgressFlag.DONE, SIZE, SIZE);
  /** A HAVE sync listing [0, pages × PAGE) as held: the dest has placed those pages. */
  const holds = (pages: number) => (): boolean =>
    haves.some((h) => h.ranges[0]?.offset === 0 && h.ranges[0].length >= pages * PAGE);

  // DONE again and again while pages are missing: one resync, not one per DONE.
  const DONES = 50_000;
  let before = haves.length;
  await flood(Array.from({ length: DONES }, () => done));
  // A marker: one page, then DONE. Its resync lists page 0, after every DONE above was heard.
  await flood([encodeZero(0, 0, PAGE), done]);
  await heard('a resync holding page 0', holds(1));
  const doneResyncs = haves.length - before - 1;
  t.ok(doneResyncs <= 1, `${DONES} PROGRESS DONE frames: ${doneResyncs} HAVE resync`);

  // A page, then DONE, 2000 times: every DONE finds pages missing after a run, and asks for a
  // resync; the dest sends them at most once a second.
  const PAIRS = 2000;
  before = haves.length;
  await flood(
    (function* () {
      for (let page = 1; page <= PAIRS; page++) {
        yield encodeZero(0, page * PAGE, PAGE);
        yield done;
      }
    })(),
  );
  await flood([encodeZero(0, (PAIRS + 1) * PAGE, PAGE), done]);
  await heard(`a resync holding ${PAIRS + 2} pages`, holds(PAIRS + 2));
  const pairResyncs = haves.length - before;
  t.ok(pairResyncs <= PAIRS / 20, `${PAIRS} DONEs each behind a run: ${pairResyncs} HAVE resyncs`);

  for (let i = 0; i < 3; i++) await dataFlood();
  const rss1 = (await destSessions<Sessions>(dest)).process.rssBytes;
  const growth = (rss1 - rss0) / MiB;
  t.ok(growth < 64, `the dest's RSS grew ${growth.toFixed(1)} MiB under the floods (bound 64 MiB)`);
  t.comment(
    `flood: ${DONES} DONE -> ${doneResyncs} resync; ${PAIRS} run+DONE -> ${pairResyncs} ` +
      `resyncs; ${rounds} DATA floods of 76 MiB -> BAD_STATE each; RSS +${growth.toFixed(1)} MiB ` +
      `after the first (+${((rss1 - rssCold) / MiB).toFixed(1)} MiB from before it)`,
  );
  t.equal((await sessionOf(dest, 'vm-flooded'))?.state, 'running', 'its session still runs');

  vmm.close();
  await vmm.closed;
  sys.close(ram.fd);
  sys.munmap(ram.base, SIZE);
  verified(t, await beside);
  t.equal(await migrationState(source, 'vm-beside'), 'complete');
});

// --- 6. file descriptors ---

/** utime + stime of process `pid`, seconds. */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
}
const CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;

t.test('out of file descriptors: the dest drops what it cannot take, does not spin', async (t) => {
  const d = otherCa;
  const pid = d.child.pid!;
  const fds = (): number => readdirSync(`/proc/${pid}/fd`).length;
  const fdsBefore = fds();
  // Room for 32 more descriptors: far fewer than the connections below.
  const limit = fdsBefore + 32;
  execFileSync('prlimit', ['--pid', String(pid), `--nofile=${limit}:${limit}`]);
  const logBefore = statSync(d.logPath).size;

  const open = async (n: number, into: HandoffClient[]): Promise<() => number> => {
    let dropped = 0;
    for (let i = 0; i < n; i++) {
      const c = await connectHandoff(d.socket);
      into.push(c);
      void c.closed.then(() => dropped++);
    }
    return () => dropped;
  };
  // 100 idle connections: the dest holds those its descriptors allow, and drops the others
  // (a descriptor kept in reserve lets it accept one to close it).
  const idle: HandoffClient[] = [];
  const droppedIdle = await open(100, idle);
  await until('every connection was held or dropped', async () => {
    return droppedIdle() + fds() - fdsBefore >= 100;
  });
  const held = fds() - fdsBefore;
  t.ok(droppedIdle() > 0 && held > 0, `held ${held}, dropped ${droppedIdle()}`);

  // 20 more while it is out of descriptors, then 2 s of its CPU time: a dest that left them in
  // its accept queue would be woken for them again and again, and one that kept retrying
  // accept (EMFILE comes before accept looks at the queue) would never leave its loop.
  const cpu0 = cpuSeconds(pid);
  const more: HandoffClient[] = [];
  const droppedMore = await open(20, more);
  await until('the 20 were dropped', async () => droppedMore() === 20);
  await new Promise((r) => setTimeout(r, 2000));
  const cpu = cpuSeconds(pid) - cpu0;
  t.ok(cpu < 0.3, `the dest used ${cpu.toFixed(2)} s of CPU in that window`);
  const log = readFileSync(d.logPath, 'utf8').slice(logBefore);
  const lines = log.split('\n').filter(Boolean);
  const emfile = lines.filter((l) => l.includes('out of file descriptors')).length;
  t.ok(emfile <= 11, `${emfile} log lines about it (rate-limited), ${log.length} bytes in all`);
  t.ok(log.length < 16 * 1024, 'the log did not explode');
  t.comment(`EMFILE: held ${held}, dropped ${droppedIdle() + 20}; CPU ${cpu.toFixed(2)} s / 2 s`);

  for (const c of [...idle, ...more]) c.close();
  await until('the dest let go of the idle connections', async () => fds() <= fdsBefore + 1);
  // Still under the low limit: a VMM's handoff is served.
  const img = await image('vm-after-emfile', 4 * MiB);
  await register(source, 'vm-after-emfile', img, true);
  verified(t, await vmSim('vm-after-emfile', img, d));
});

// --- 9. the dest's endpoints ---

t.test("the dest's sessions: its control socket, GET only; metrics: two routes", async (t) => {
  const get = (path: string, method = 'GET') => fetch(`${dest.http}${path}`, { method });
  t.equal((await get('/v1/sessions')).status, 404, 'metrics port: /v1/sessions 404');
  t.equal((await get('/')).status, 404, 'metrics port: / 404');
  t.equal((await get('/metrics')).status, 200, 'metrics port: /metrics');
  t.equal((await get('/healthz')).status, 200, 'metrics port: /healthz');
  t.equal((await get('/metrics', 'POST')).status, 405, 'metrics port: POST 405');
  t.equal((await fetch(`${source.http}/v1/migrations`)).status, 404, "source's metrics port: 404");
  const control = { socketPath: dest.control };
  const sessions = await request(control, 'GET', '/v1/sessions');
  t.equal(sessions.status, 200, 'control socket: GET /v1/sessions');
  for (const method of ['POST', 'PUT', 'DELETE', 'PATCH']) {
    const res = await request(control, method, '/v1/sessions', '{}', json);
    t.equal(res.status, 405, `control socket: ${method} 405`);
  }
  const leaked = [...secrets, CREDENTIAL].filter((s) => sessions.text.includes(s));
  t.same(leaked, [], 'the sessions show no secret');
});

// --- TLS ---

t.test('wss: the source verified by its CA; client certificates when required', async (t) => {
  const img = await image('vm-tls', 8 * MiB);
  await register(tlsSource, 'vm-tls', img, true);
  const wss = `wss://127.0.0.1:${tlsSource.port}`;
  const untrusted = await handoff(otherCa.socket, {
    migrationId: 'vm-tls',
    source: wss,
    secret: tlsSource.secretOf('vm-tls'),
  });
  refusedWith(t, untrusted, 'SOURCE_UNREACHABLE', 'a dest that trusts another CA');
  t.match(untrusted.type === 'error' && untrusted.message, /certificate/i, 'a certificate error');
  verified(t, await vmSim('vm-tls', img, dest, wss, tlsSource));
  t.equal(await migrationState(tlsSource, 'vm-tls'), 'complete', 'over wss, to the end');

  await register(mtlsSource, 'vm-mtls', img, true);
  const mwss = `wss://127.0.0.1:${mtlsSource.port}`;
  const anonymous = await handoff(limited.socket, {
    migrationId: 'vm-mtls',
    source: mwss,
    secret: mtlsSource.secretOf('vm-mtls'),
  });
  t.equal(anonymous.type, 'error', `no client certificate: refused (${JSON.stringify(anonymous)})`);
  t.match(
    anonymous.type === 'error' && anonymous.code,
    /^SOURCE_(UNREACHABLE|CLOSED)$/,
    'the TLS handshake failed',
  );
  verified(t, await vmSim('vm-mtls', img, dest, mwss, mtlsSource));
  t.equal(await migrationState(mtlsSource, 'vm-mtls'), 'complete', 'with one: to the end');
});

// --- secrets stay secret ---

t.test('no secret in status, listings or any log', async (t) => {
  const control = { socketPath: source.control };
  const one = await request(control, 'GET', '/v1/migrations/vm-hello');
  const list = await request(control, 'GET', '/v1/migrations');
  t.equal(one.status, 200);
  t.notOk('secret' in one.json, 'a status has no secret field');
  t.notMatch(list.text, /"secret"/, 'the list has no secret field');
  // A registration without a secret gets a generated one: in its 201 answer, once.
  const img = await image('vm-told-once', 4 * PAGE);
  const body = JSON.stringify({ id: 'vm-told-once', image: img });
  const created = await request(control, 'POST', '/v1/migrations', body, json);
  t.equal(created.status, 201);
  const told = created.json['secret'];
  t.match(told, /^[0-9a-f]{64}$/, 'the 201 answer carries the generated secret');
  secrets.add(told as string);
  const later = await request(control, 'GET', '/v1/migrations/vm-told-once');
  t.notOk('secret' in later.json, 'its status does not');
  for (const s of source.secrets.values()) secrets.add(s);
  const leaks = (text: string): string[] =>
    [...secrets, token, CREDENTIAL].filter((s) => text.includes(s));
  t.same([one.text, list.text, later.text].flatMap(leaks), [], 'no secret in any answer');

  // Stopped, so that every log line is written.
  await Promise.all(daemons.map((d) => d.stop()));
  const logs = readdirSync(dir).filter((f) => f.endsWith('.log'));
  t.equal(logs.length, daemons.length, `${logs.length} daemon logs`);
  for (const f of logs) {
    t.same(leaks(readFileSync(join(dir, f), 'utf8')), [], `${f}: no secret, token or credential`);
  }
});
