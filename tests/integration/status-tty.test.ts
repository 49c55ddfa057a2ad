// `yabusame status` as a person sees it: `status --watch` runs in a real terminal (a detached
// tmux session, 120x30) against the real daemons while vm-sim migrates through a paced chaos
// proxy, and the test reads the screen with `tmux capture-pane`: a bar, a percentage and
// `running` mid-migration; `reconnecting` while the source cannot be reached; `done` at 100.0%
// after completion; a failed handoff as `failed` with its code; Ctrl-C ends the watch with exit
// status 0 and the cursor shown again. The source's view (on a terminal and as a table) and the
// plain table of a dest (stdout not a terminal) are checked along the way. Every wait polls the
// screen or the daemons, bounded; nothing is timed.
import t from 'tap';
import { execFile, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { generateImage } from '../../scripts/image/gen-image.js';
import { runVmSim } from '../../scripts/vm-sim/vm-sim.js';
import { ChaosProxy } from '../../scripts/chaos/proxy.js';
import {
  CLI,
  destSessions,
  registerMigration,
  startDest,
  startSource,
  type Daemon,
  type SourceDaemon,
} from '../../scripts/lib/daemons.js';

const haveTmux = !spawnSync('tmux', ['-V']).error;
const noTmux = !haveTmux && 'tmux not installed (Debian: apt-get install tmux)';

const MiB = 1 << 20;
const SIZE = 16 * MiB;
const TOTAL_PAGES = SIZE / 4096;
/** Source→dest bytes per second and connection until the outage is over (see below). */
const PACE = 128 * 1024;
const WAIT_MS = 60_000;

const run = promisify(execFile);

t.test('status --watch in a terminal during a migration', { skip: noTmux }, async (t) => {
  const dir = mkdtempSync('/dev/shm/yabusame-status-');
  const tmuxSocket = join(dir, 'tmux.sock');
  const daemons: Daemon[] = [];
  const proxies: ChaosProxy[] = [];
  // The terminal: a private tmux server, UTF-8, no user config.
  const tmux = (...args: string[]): string => {
    const r = spawnSync('tmux', ['-S', tmuxSocket, '-f', '/dev/null', ...args], {
      encoding: 'utf8',
      env: { ...process.env, LANG: 'C.UTF-8' },
    });
    if (r.error) throw r.error;
    if (r.status !== 0) throw new Error(`tmux ${args[0]}: ${r.stderr}`);
    return r.stdout;
  };
  t.teardown(async () => {
    spawnSync('tmux', ['-S', tmuxSocket, 'kill-server']);
    await Promise.all(proxies.map((p) => p.close()));
    await Promise.all(daemons.map((d) => d.stop()));
    rmSync(dir, { recursive: true, force: true });
  });

  const source: SourceDaemon = await startSource(dir);
  daemons.push(source);
  const config = join(dir, 'dest.json');
  // Patient reconnection and a small background window. The outage below closes connections
  // (noticed at once); heartbeats stay long enough that a pong queued behind paced frames is
  // not taken for a silent link.
  writeFileSync(
    config,
    JSON.stringify({
      heartbeatMs: 2000,
      reconnectTimeoutMs: 60_000,
      backgroundWindowBytes: 64 * 1024,
    }),
  );
  const dest = await startDest(dir, ['--config', config]);
  daemons.push(dest);
  const image = join(dir, 'vm.ram');
  await generateImage({ path: image, sizeBytes: SIZE, seed: 7 });
  await registerMigration(source, { id: 'tty-vm', image, frozen: true });
  await registerMigration(source, { id: 'tty-bad', image, frozen: true });

  /** The yabusame command line in a shell command, with the node that runs this test. */
  const yabusame = (args: string): string => `'${process.execPath}' '${CLI}' ${args}`;
  /** A shell command in a new 120x30 tmux session; the pane stays after it exits. */
  const terminal = (name: string, command: string): void => {
    tmux(
      'new-session',
      '-d',
      '-s',
      name,
      '-x',
      '120',
      '-y',
      '30',
      `env LANG=C.UTF-8 ${command}; echo "[exit status $?]"; exec sleep 3600`,
    );
  };
  const screen = (name: string): string => tmux('capture-pane', '-p', '-t', name).trimEnd() + '\n';
  /** Polls the screen until `pred` holds; returns that screen. */
  const waitScreen = async (
    name: string,
    what: string,
    pred: (s: string) => boolean,
  ): Promise<string> => {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const s = screen(name);
      if (pred(s)) return s;
      if (Date.now() > deadline) throw new Error(`never saw ${what}; the screen:\n${s}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  /** The migration's line on a screen: its state, the bar and the percentage. */
  const rowOf = (s: string, id: string): { state: string; bar: string; pct: number } | null => {
    const m = new RegExp(`^${id}\\s+(\\S+)\\s+\\[([█░]+)\\]\\s+(\\d+\\.\\d)%`, 'm').exec(s);
    return m ? { state: m[1]!, bar: m[2]!, pct: Number(m[3]) } : null;
  };

  terminal('watch', yabusame(`status --watch --interval 0.2 --dest '${dest.control}'`));
  await waitScreen('watch', 'the empty dest', (s) => /no migrations/.test(s));
  t.equal(tmux('display', '-p', '-t', 'watch', '#{cursor_flag}').trim(), '0', 'cursor hidden');

  // Paced, so the migration is in the middle whenever the screen is read until the pace lifts.
  let proxy = await ChaosProxy.start({ target: { port: source.port }, downBytesPerSec: PACE });
  proxies.push(proxy);
  const port = proxy.port;
  const migration = runVmSim({
    image,
    migrationId: 'tty-vm',
    secret: source.secretOf('tty-vm'),
    source: proxy.url,
    destSocket: dest.socket,
    workers: 2,
    timeoutMs: 120_000,
  });
  let finished = false;
  void migration.then(
    () => (finished = true),
    () => (finished = true),
  );
  try {
    // Pages arrive on the demand channel before the background one is up: wait for both.
    const s = await waitScreen(
      'watch',
      'a running migration, pages present, both links up',
      (s) => {
        const row = rowOf(s, 'tty-vm');
        return row?.state === 'running' && row.pct > 0 && /links: demand up, background up/.test(s);
      },
    );
    const row = rowOf(s, 'tty-vm')!;
    t.ok(row.pct > 0 && row.pct < 100, `mid-migration: ${row.pct}%`);
    t.match(row.bar, /^█*░+$/, 'a bar, partly filled');
    t.match(s, /faults waiting \d+/, 'faults waiting shown');
    t.match(s, /every 0\.2s · Ctrl-C to quit/, 'the watch footer');
    t.comment(`mid-migration screen:\n${s}`);

    // The source's view, now: frozen, pages sent of the image's (not 0/0), its dest connected.
    const table = (await run(process.execPath, [CLI, 'status', '--source', source.control])).stdout;
    const line = table.split('\n').find((l) => l.startsWith('tty-vm '));
    const m = /^tty-vm\s+frozen\s+(\d+)\s+(\d+)\s+\d+\.\d%/.exec(line ?? '');
    t.ok(m, `the source's table: ${table}`);
    t.equal(Number(m?.[2]), TOTAL_PAGES, "total: the image's pages");
    t.ok(Number(m?.[1]) > 0, `pages sent: ${m?.[1]}`);
    t.match(line, /demand=up,background=up/, 'its dest is connected');
    t.match(table, /^MIGRATION\s+STATE\s+SENT\s+TOTAL\s+PCT\s+RATE\s+ETA\s+CONNECTIONS/m);

    // The source becomes unreachable: both connections cut, new ones refused.
    await proxy.close();
    // One lost link is enough for `reconnecting`; the dest notices each channel's loss on its
    // own, so wait for the screen that shows both.
    const down = await waitScreen('watch', 'both links reconnecting', (s) => {
      return (
        rowOf(s, 'tty-vm')?.state === 'reconnecting' &&
        /links: demand reconnecting \S+, background reconnecting/.test(s)
      );
    });
    t.equal(rowOf(down, 'tty-vm')?.state, 'reconnecting', 'shown as reconnecting');
    t.comment(`during the outage:\n${down}`);
    const during = await destSessions<{ active: Array<{ state: string; links: unknown }> }>(dest);
    t.equal(during.active[0]?.state, 'running', '/v1/sessions: the session state is running...');
    t.match(
      during.active[0]?.links,
      { demand: { state: 'reconnecting' }, background: { state: 'reconnecting' } },
      '... and its links say reconnecting',
    );

    // The source is back (same port), unpaced: the migration completes.
    proxy = await ChaosProxy.start({ target: { port: source.port }, port, downBytesPerSec: 0 });
    proxies.push(proxy);
  } catch (err) {
    t.comment(`screen at the failure:\n${screen('watch')}`);
    await migration.catch(() => undefined);
    throw err;
  }
  const result = await migration;
  t.equal(result.pagesVerified, TOTAL_PAGES, 'vm-sim verified every page');
  t.equal(result.mismatchCount, 0);
  t.ok(finished);
  const done = await waitScreen('watch', 'done', (s) => rowOf(s, 'tty-vm')?.state === 'done');
  const row = rowOf(done, 'tty-vm')!;
  t.equal(row.pct, 100, '100.0%');
  t.match(row.bar, /^█+$/, 'a full bar');
  t.match(done, /reconnects [1-9]/, 'the reconnects are counted');

  // A handoff that fails: the wrong secret. It stays on screen as failed, with its code.
  await t.rejects(
    runVmSim({
      image,
      migrationId: 'tty-bad',
      secret: 'ab'.repeat(32),
      source: source.ws,
      destSocket: dest.socket,
      workers: 1,
    }),
    { code: 'AUTH_FAILED' },
  );
  const failed = await waitScreen('watch', 'the failed session', (s) => /AUTH_FAILED/.test(s));
  t.equal(rowOf(failed, 'tty-bad')?.state, 'failed', 'shown as failed');
  t.match(failed, /^\s+AUTH_FAILED: /m, 'with its code and message');
  t.match(failed, /: (1 done, 1 failed|1 failed, 1 done)$/m, 'the header counts them');
  t.comment(`after both:\n${failed}`);

  // Ctrl-C: the watch exits 0, the cursor is back, the last frame stays.
  tmux('send-keys', '-t', 'watch', 'C-c');
  const exited = await waitScreen('watch', 'the exit', (s) => /\[exit status \d+\]/.test(s));
  t.match(exited, /\[exit status 0\]/, 'exit status 0');
  t.equal(tmux('display', '-p', '-t', 'watch', '#{cursor_flag}').trim(), '1', 'cursor shown');
  t.equal(rowOf(exited, 'tty-vm')?.state, 'done', 'the last frame stays on screen');

  // The source on a terminal: the complete migration and the one nobody finished.
  terminal('source', yabusame(`status --source '${source.control}'`));
  const src = await waitScreen('source', 'the source', (s) => /\[exit status \d+\]/.test(s));
  t.match(src, /\[exit status 0\]/);
  t.equal(rowOf(src, 'tty-vm')?.state, 'complete');
  t.equal(rowOf(src, 'tty-vm')?.pct, 100);
  t.equal(rowOf(src, 'tty-bad')?.state, 'frozen', 'the other is still frozen, nothing sent');
  t.equal(rowOf(src, 'tty-bad')?.pct, 0);

  // Not a terminal: a plain table, no escape codes, the failed session with its error.
  const plain = (await run(process.execPath, [CLI, 'status', '--dest', dest.control])).stdout;
  t.notOk(plain.includes('\x1b'), 'no escape codes');
  t.match(plain, /^MIGRATION\s+STATE\s+PRESENT\s+TOTAL\s+PCT/m, 'a header');
  t.match(
    plain,
    new RegExp(`^tty-vm\\s+done\\s+${TOTAL_PAGES}\\s+${TOTAL_PAGES}\\s+100\\.0%`, 'm'),
  );
  t.match(plain, /^tty-bad\s+failed\s+.*AUTH_FAILED: /m);
});
