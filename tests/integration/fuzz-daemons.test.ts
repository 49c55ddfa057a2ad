// Bad input at the running daemons' doors, while a real migration goes on: hundreds of random and
// mutated handoffs at the dest's socket and random frames at the source's page server. Each is
// refused with a coded error (or the connection dropped), and the migration still verifies.
import t from 'tap';
import { mkdtempSync, openSync, closeSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import WebSocket from 'ws';
import * as uffd from '../../daemon/uffd/uffd.js';
import { encodeHandoff } from '../../protocol/handoff.js';
import { decodeFrame } from '../../protocol/page-codec.js';
import { HANDOFF_ERROR_CODES, PAGE_ERROR_CODES } from '../../protocol/errors.js';
import { FrameType } from '../../protocol/wire.js';
import { generateImage } from '../../scripts/image/gen-image.js';
import { runVmSim } from '../../scripts/vm-sim/vm-sim.js';
import {
  migrationState,
  registerMigration,
  startDest,
  startSource,
  type Daemon,
} from '../../scripts/lib/daemons.js';
import { connectHandoff, sendRaw } from '../helpers/vmm-client.js';
import { Rng, encodeFrame, randomFrame, randomHandoff } from '../unit/protocol-gen.js';

const dir = mkdtempSync('/dev/shm/yabusame-fuzzd-');
const daemons: Daemon[] = [];
t.teardown(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
  rmSync(dir, { recursive: true, force: true });
});

/** A random handoff line, sometimes damaged; its source always points at loopback. */
function handoffBytes(rng: Rng): Buffer {
  const req = randomHandoff(rng);
  req.source = 'ws://127.0.0.1:9';
  const line = encodeHandoff(req);
  const roll = rng.int(4);
  if (roll === 0) return line;
  const b = Buffer.from(line);
  if (roll === 1) b[rng.int(b.length - 1)] = rng.int(256);
  if (roll === 2) return Buffer.concat([b.subarray(0, rng.int(b.length - 1)), Buffer.from('\n')]);
  if (roll === 3) return Buffer.concat([Buffer.from(rng.bytes(rng.int(200))), Buffer.from('\n')]);
  return b;
}

t.test('bad input everywhere; the migration in flight still verifies', async (t) => {
  const image = join(dir, 'vm.ram');
  await generateImage({ path: image, sizeBytes: 32 << 20, seed: 5 });
  const source = await startSource(dir);
  daemons.push(source);
  await registerMigration(source, { id: 'vm-busy', image, frozen: true });
  const config = join(dir, 'dest.json');
  writeFileSync(config, JSON.stringify({ backgroundWindowBytes: 65536, handoffTimeoutMs: 1000 }));
  const dest = await startDest(dir, ['--config', config]);
  daemons.push(dest);

  const migration = runVmSim({
    image,
    migrationId: 'vm-busy',
    secret: source.secretOf('vm-busy'),
    source: source.ws,
    destSocket: dest.socket,
    workers: 2,
    timeoutMs: 120_000,
  });

  const rng = new Rng(0xf022);
  const handoffCodes = new Map<string, number>();
  const allowed = new Set<string>(HANDOFF_ERROR_CODES);
  for (let i = 0; i < 300; i++) {
    const c = await connectHandoff(dest.socket);
    // 0, 1 or 2 fds: a real uffd, or /dev/null.
    const fds: number[] = [];
    const nfds = rng.int(3);
    for (let k = 0; k < nfds; k++) {
      fds.push(rng.chance(0.5) ? uffd.create(0).fd : openSync('/dev/null', 'r'));
    }
    sendRaw(c, handoffBytes(rng), fds);
    const reply = await c.next().catch(() => null);
    const code = reply?.type === 'error' ? reply.code : `no error reply (${reply?.type})`;
    handoffCodes.set(code, (handoffCodes.get(code) ?? 0) + 1);
    c.close();
    for (const fd of fds) closeSync(fd);
  }
  const unexpected = [...handoffCodes.keys()].filter((c) => !allowed.has(c));
  t.same(
    unexpected,
    [],
    `300 bad handoffs, all refused with documented codes: ${JSON.stringify(Object.fromEntries(handoffCodes))}`,
  );

  const frameCodes = new Map<string, number>();
  const pageCodes = new Set<string>(PAGE_ERROR_CODES);
  for (let i = 0; i < 200; i++) {
    const ws = new WebSocket(`${source.ws}/v1/pages`);
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    const f = encodeFrame(randomFrame(rng));
    if (rng.chance(0.5)) {
      const at = rng.int(f.length);
      f[at] = f[at]! ^ (1 << rng.int(8));
    }
    const answer = new Promise<string>((resolve) => {
      ws.on('message', (data: Buffer) => {
        try {
          const frame = decodeFrame(data);
          resolve(frame.type === FrameType.ERROR ? frame.code : `frame ${frame.type}`);
        } catch {
          resolve('undecodable answer');
        }
      });
      ws.once('close', () => resolve('closed'));
    });
    ws.send(rng.chance(0.1) ? 'text' : f);
    const code = await answer;
    frameCodes.set(code, (frameCodes.get(code) ?? 0) + 1);
    ws.terminate();
  }
  // A random HELLO may name no migration (UNKNOWN_MIGRATION); a valid WELCOME is possible only
  // for 'vm-busy', which random ids never are.
  const badFrames = [...frameCodes.keys()].filter((c) => !pageCodes.has(c) && c !== 'closed');
  t.same(
    badFrames,
    [],
    `200 bad frames, all refused: ${JSON.stringify(Object.fromEntries(frameCodes))}`,
  );

  const r = await migration;
  t.equal(r.mismatchCount, 0, 'no page mismatched');
  t.equal(r.missingPages, 0, 'no page missing');
  t.equal(r.pagesVerified, r.totalPages, `all ${r.totalPages} pages verified`);
  t.ok((await fetch(`${dest.http}/healthz`)).ok, 'the dest still answers');
  t.equal(await migrationState(source, 'vm-busy'), 'complete', 'the source still answers');
});
