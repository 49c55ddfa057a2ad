// The README's install section, followed on this machine: `npm pack` the checkout, install the
// tarball globally into a temp prefix, run the installed command (--version, --check-config on
// the example configs, a small demo migration through the installed daemons), and
// `yabusame install` the units into a temp root, which systemd-analyze verifies.
import t from 'tap';
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

// dist/tests/integration/ → the repository root (package.json, the built dist/).
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const VERSION = (
  JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }
).version;
const work = mkdtempSync(join(tmpdir(), 'yabusame-install-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));

function run(cmd: string, args: string[], cwd = work): SpawnSyncReturns<string> {
  return spawnSync(cmd, args, { cwd, encoding: 'utf8', timeout: 180_000 });
}
const out = (r: SpawnSyncReturns<string>): string => `${r.stdout ?? ''}${r.stderr ?? ''}`.trim();
/** Asserts exit 0; the command's output is shown only when it failed. */
function succeeded(t: Tap, r: SpawnSyncReturns<string>, what: string): void {
  t.equal(r.status, 0, what);
  if (r.status !== 0) t.comment(out(r).slice(-3000));
}
type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

const prefix = join(work, 'prefix');
const bin = join(prefix, 'bin', 'yabusame');

t.test('npm pack gives a tarball with the built code, and it installs globally', async (t) => {
  // dist/ is built by `npm test` (tsc) before the tests run; packing does not rebuild it.
  const pack = run('npm', ['pack', '--ignore-scripts', '--pack-destination', work], ROOT);
  succeeded(t, pack, 'npm pack');
  const tarball = readdirSync(work).find((f) => f.endsWith('.tgz'));
  t.ok(tarball, `tarball ${tarball}`);
  const list = run('tar', ['-tzf', join(work, tarball!)]);
  const files = list.stdout.split('\n');
  for (const f of [
    'package/bin/yabusame.js',
    'package/dist/daemon/cli.js',
    'package/dist/scripts/demo.js',
    // `yabusame migrate` builds the destination QEMU's preload library from it with cc.
    'package/scripts/qemu/preload.c',
    'package/systemd/yabusame-dest.service',
    'package/examples/dest.json',
    'package/ops/grafana/yabusame-dashboard.json',
    'package/ops/prometheus/yabusame-rules.yml',
    'package/LICENSE',
  ]) {
    t.ok(files.includes(f), `the tarball holds ${f}`);
  }
  t.notOk(
    files.some((f) => f.startsWith('package/dist/tests/')),
    'and not the tests',
  );
  const install = run('npm', [
    'install',
    '--global',
    '--prefix',
    prefix,
    '--prefer-offline',
    '--no-audit',
    '--no-fund',
    '--ignore-scripts',
    join(work, tarball!),
  ]);
  succeeded(t, install, 'npm install --global the tarball');
  t.ok(existsSync(bin), `${bin} installed`);
});

t.test('the installed command runs', async (t) => {
  const version = run(bin, ['--version']);
  succeeded(t, version, 'yabusame --version');
  t.equal(version.stdout.trim(), VERSION, '--version');
  const examples = join(prefix, 'lib', 'node_modules', 'yabusame', 'examples');
  const dest = run(bin, ['dest', '--check-config', '--config', join(examples, 'dest.json')]);
  succeeded(t, dest, 'yabusame dest --check-config on the example');
  t.match(dest.stdout, /yabusame dest: configuration ok/);
  const images = mkdtempSync(join(work, 'images-'));
  const source = run(bin, [
    'source',
    '--check-config',
    '--config',
    join(examples, 'source.json'),
    '--image-root',
    images,
  ]);
  succeeded(t, source, 'yabusame source --check-config on the example');
  const bad = run(bin, ['dest', '--check-config', '--max-sessions', 'lots']);
  t.equal(bad.status, 2, 'a config error exits 2');
  t.match(bad.stderr, /CONFIG_INVALID: .*--max-sessions: expected an integer/);
});

t.test('the installed package migrates (a small demo, every page verified)', async (t) => {
  const demo = run(bin, ['demo', '--size', '32M', '--workers', '1', '--json']);
  succeeded(t, demo, 'yabusame demo --size 32M');
  const result = JSON.parse(demo.stdout) as { verified: boolean; pagesVerified: number };
  t.equal(result.verified, true, `${result.pagesVerified} pages verified`);
});

t.test('yabusame install puts units and configs in place', async (t) => {
  const root = join(work, 'root');
  const r = run(bin, ['install', '--root', root]);
  succeeded(t, r, 'yabusame install --root');
  const units = join(root, 'etc', 'systemd', 'system');
  for (const f of [
    join(units, 'yabusame-dest.service'),
    join(units, 'yabusame-dest.socket'),
    join(units, 'yabusame-source.service'),
    join(root, 'usr', 'lib', 'sysusers.d', 'yabusame.conf'),
    join(root, 'usr', 'lib', 'tmpfiles.d', 'yabusame.conf'),
    join(root, 'etc', 'yabusame', 'dest.json'),
    join(root, 'etc', 'yabusame', 'source.json'),
  ]) {
    t.ok(existsSync(f), f);
  }
  const service = readFileSync(join(units, 'yabusame-dest.service'), 'utf8');
  const exec = /^ExecStart=(\S+) dest /m.exec(service)?.[1];
  t.ok(exec && existsSync(exec), `ExecStart runs the installed command (${exec})`);
  const again = run(bin, ['install', '--root', root]);
  t.match(again.stdout, /kept\s+\S+dest\.json \(exists\)/, 'configs are never overwritten');
  if (spawnSync('systemd-analyze', ['--version']).error) return;
  const verify = run(
    'systemd-analyze',
    ['verify', './yabusame-dest.service', './yabusame-dest.socket', './yabusame-source.service'],
    units,
  );
  succeeded(t, verify, 'systemd-analyze verify');
  t.equal(out(verify), '', 'systemd-analyze verify: no warnings');
});
