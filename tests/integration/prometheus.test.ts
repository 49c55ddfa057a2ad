// The metrics as Prometheus sees them: Debian's real `prometheus` server (a temporary config and
// storage, a free port, 1 s scrapes, ops/prometheus/yabusame-rules.yml loaded) scrapes a running
// `yabusame dest` and `yabusame source` while vm-sim migrates through a paced proxy, and the test
// asks its HTTP API for the per-migration series: pages present and total on the dest, a rate()
// of the migration's received bytes, the source's pages, build_info from both, then the series
// gone once the migration completed. `promtool check metrics` runs on both daemons' live
// exposition during the migration, and every alert rule must evaluate without error. Every wait
// polls, bounded; nothing is timed.
import t from 'tap';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import {
  createWriteStream,
  existsSync,
  mkdirSync,
  mkdtempSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { once } from 'node:events';
import { generateImage } from '../../scripts/image/gen-image.js';
import { runVmSim } from '../../scripts/vm-sim/vm-sim.js';
import { ChaosProxy } from '../../scripts/chaos/proxy.js';
import {
  freePort,
  registerMigration,
  startDest,
  startSource,
  type Daemon,
} from '../../scripts/lib/daemons.js';
import { VERSION } from '../../daemon/cli/version.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const RULES = join(ROOT, 'ops', 'prometheus', 'yabusame-rules.yml');
const PROMETHEUS = '/usr/bin/prometheus';
const noPrometheus =
  !existsSync(PROMETHEUS) &&
  `${PROMETHEUS} not installed (Debian: apt-get install prometheus; .ci/run installs it)`;
const hasPromtool = !spawnSync('promtool', ['--version']).error;

const SIZE = 16 << 20;
const TOTAL_PAGES = SIZE / 4096;
/** Slow enough that the migration is still running whenever Prometheus is asked (see below). */
const PACE = 64 * 1024;
const WAIT_MS = 60_000;
const ID = 'prom-vm';

interface Sample {
  metric: Record<string, string>;
  value: [number, string];
}

t.test(
  'a real Prometheus scrapes both daemons during a migration',
  { skip: noPrometheus },
  async (t) => {
    const dir = mkdtempSync('/dev/shm/yabusame-prom-');
    const daemons: Daemon[] = [];
    const proxies: ChaosProxy[] = [];
    let prometheus: ChildProcess | null = null;
    t.teardown(async () => {
      if (prometheus && prometheus.exitCode === null && prometheus.signalCode === null) {
        const exited = once(prometheus, 'exit');
        prometheus.kill('SIGTERM');
        await exited;
      }
      await Promise.all(proxies.map((p) => p.close()));
      await Promise.all(daemons.map((d) => d.stop()));
      rmSync(dir, { recursive: true, force: true });
    });

    const source = await startSource(dir);
    daemons.push(source);
    const dest = await startDest(dir);
    daemons.push(dest);
    const image = join(dir, 'vm.ram');
    await generateImage({ path: image, sizeBytes: SIZE, seed: 11 });
    await registerMigration(source, { id: ID, image, frozen: true });

    // Prometheus: 1 s scrapes of both daemons, the shipped alert rules evaluated every second.
    const promPort = await freePort();
    const api = `http://127.0.0.1:${promPort}`;
    const config = join(dir, 'prometheus.yml');
    writeFileSync(
      config,
      [
        'global:',
        '  scrape_interval: 1s',
        '  scrape_timeout: 1s',
        '  evaluation_interval: 1s',
        'rule_files:',
        `  - ${JSON.stringify(RULES)}`,
        'scrape_configs:',
        '  - job_name: yabusame-dest',
        '    static_configs:',
        `      - targets: ["${new URL(dest.http).host}"]`,
        '  - job_name: yabusame-source',
        '    static_configs:',
        `      - targets: ["${new URL(source.http).host}"]`,
        '',
      ].join('\n'),
    );
    mkdirSync(join(dir, 'tsdb'));
    prometheus = spawn(
      PROMETHEUS,
      [
        `--config.file=${config}`,
        `--storage.tsdb.path=${join(dir, 'tsdb')}`,
        `--web.listen-address=127.0.0.1:${promPort}`,
        '--log.level=warn',
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    prometheus.stderr!.pipe(createWriteStream(join(dir, 'prometheus.log')));

    /** Polls `probe` until it returns a value (not undefined); bounded. */
    const poll = async <T>(what: string, probe: () => Promise<T | undefined>): Promise<T> => {
      const deadline = Date.now() + WAIT_MS;
      for (;;) {
        if (prometheus!.exitCode !== null) throw new Error(`prometheus exited (${what})`);
        const v = await probe().catch(() => undefined);
        if (v !== undefined) return v;
        if (Date.now() > deadline) throw new Error(`${what}: not within ${WAIT_MS} ms`);
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    /** An instant query through the HTTP API. */
    const query = async (promql: string): Promise<Sample[]> => {
      const res = await fetch(`${api}/api/v1/query?query=${encodeURIComponent(promql)}`);
      const body = (await res.json()) as { status: string; data: { result: Sample[] } };
      if (body.status !== 'success') throw new Error(`query ${promql}: ${JSON.stringify(body)}`);
      return body.data.result;
    };
    const one = (promql: string) =>
      poll(promql, async () => {
        const r = await query(promql);
        return r.length === 1 ? r[0] : undefined;
      });

    await poll('prometheus ready', async () =>
      (await fetch(`${api}/-/ready`)).ok ? true : undefined,
    );
    // Both targets scraped once before the migration starts: from then on a scrape comes every
    // second while the paced migration needs minutes.
    await poll('both targets up', async () => {
      const up = await query('up == 1');
      return up.length === 2 ? up : undefined;
    });
    const builds = await query('yabusame_build_info');
    t.same(
      builds.map((s) => [s.metric['job'], s.metric['version'], s.metric['node']]).sort(),
      [
        ['yabusame-dest', VERSION, process.version],
        ['yabusame-source', VERSION, process.version],
      ],
      'yabusame_build_info{version,node} from both daemons',
    );

    const proxy = await ChaosProxy.start({ target: { port: source.port }, downBytesPerSec: PACE });
    proxies.push(proxy);
    const migration = runVmSim({
      image,
      migrationId: ID,
      secret: source.secretOf(ID),
      source: proxy.url,
      destSocket: dest.socket,
      workers: 2,
      timeoutMs: 180_000,
    });
    try {
      const total = await one(`yabusame_dest_migration_pages{migration="${ID}"}`);
      t.equal(Number(total.value[1]), TOTAL_PAGES, 'the dest: the migration has its pages');
      t.equal(total.metric['job'], 'yabusame-dest');
      const present = await one(`yabusame_dest_migration_present_pages{migration="${ID}"}`);
      const n = Number(present.value[1]);
      t.ok(n >= 0 && n < TOTAL_PAGES, `mid-migration: ${n} of ${TOTAL_PAGES} pages present`);
      const rate = await poll('a received-bytes rate above 0', async () => {
        const r = await query(
          `rate(yabusame_dest_migration_received_bytes_total{migration="${ID}"}[10s])`,
        );
        return r.length === 1 && Number(r[0]!.value[1]) > 0 ? r[0] : undefined;
      });
      t.ok(Number(rate.value[1]) > 0, `rate() of the migration's bytes: ${rate.value[1]} B/s`);
      const links = await query(`yabusame_dest_migration_link_up{migration="${ID}"}`);
      t.same(
        links.map((s) => s.metric['channel']).sort(),
        ['background', 'demand'],
        'link_up per channel',
      );
      const src = await one(`yabusame_source_migration_pages{migration="${ID}"}`);
      t.equal(Number(src.value[1]), TOTAL_PAGES, 'the source: the migration has its pages');
      const frozen = await one(`yabusame_source_migration_state{migration="${ID}",state="frozen"}`);
      t.equal(frozen.value[1], '1', 'the source: frozen');

      // promtool on what both daemons serve right now, per-migration series included.
      for (const d of [
        { name: 'dest', url: dest.http },
        { name: 'source', url: source.http },
      ]) {
        const body = await (await fetch(`${d.url}/metrics`)).text();
        t.match(body, `migration="${ID}"`, `${d.name}: the exposition has the migration's series`);
        if (!hasPromtool) continue;
        const r = spawnSync('promtool', ['check', 'metrics'], { input: body, encoding: 'utf8' });
        t.equal(r.status, 0, `${d.name}: promtool check metrics exits 0`);
        t.equal(`${r.stdout}${r.stderr}`, '', `${d.name}: no findings`);
      }
    } catch (err) {
      await migration.catch(() => undefined);
      throw err;
    }
    proxy.setPace(0);
    const result = await migration;
    t.equal(result.pagesVerified, TOTAL_PAGES, 'vm-sim verified every page');

    // The migration ended: its series leave the scrape, and Prometheus marks them stale.
    await poll('the series gone', async () =>
      (await query(`yabusame_dest_migration_present_pages{migration="${ID}"}`)).length === 0
        ? true
        : undefined,
    );
    t.pass('the per-migration series are gone after completion');
    const ended = await one('yabusame_dest_sessions_ended_total{result="complete"} == 1');
    t.equal(ended.metric['job'], 'yabusame-dest', 'and the completion is counted');

    // Every shipped alert rule evaluated against the live data without an error.
    const rules = await poll('every rule evaluated', async () => {
      const res = await fetch(`${api}/api/v1/rules`);
      const body = (await res.json()) as {
        data: {
          groups: Array<{ rules: Array<{ name: string; health: string; lastError?: string }> }>;
        };
      };
      const list = body.data.groups.flatMap((g) => g.rules);
      return list.length > 0 && list.every((r) => r.health !== 'unknown') ? list : undefined;
    });
    t.equal(rules.length, 6, 'the six rules are loaded');
    for (const r of rules) t.equal(r.health, 'ok', `${r.name}: ${r.lastError ?? 'ok'}`);
  },
);
