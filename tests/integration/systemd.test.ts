/**
 * The shipped systemd files, checked with systemd's own tools:
 * - `systemd-analyze verify` on every unit. The units start /usr/bin/yabusame, which only a
 *   package installs; verify refuses a missing binary, so the test (1) checks that this is the
 *   only complaint about the units as shipped, and (2) verifies copies whose ExecStart runs this
 *   checkout (node + bin/yabusame.js) and must pass without a single warning.
 * - `systemd-analyze security --offline=true`: the sandbox's exposure score, and exactly the
 *   findings the unit files document as deliberately open.
 * - `systemd-sysusers` and `systemd-tmpfiles` applied to a scratch root.
 */
import t, { type Test } from 'tap';
import { spawnSync } from 'node:child_process';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const UNITS = join(ROOT, 'systemd');
const BIN = join(ROOT, 'bin', 'yabusame.js');
const UNIT_FILES = ['yabusame-dest.socket', 'yabusame-dest.service', 'yabusame-source.service'];

/**
 * Measured with systemd 252 (Debian 12): 1.3 for both services. The remaining findings are the
 * ones listed in OPEN below; anything that loosens the sandbox raises the score past this.
 */
const MAX_EXPOSURE = 1.4;
/** Findings the unit files explain in their "Left open on purpose" comments. */
const OPEN = [
  'DeviceAllow=', // ProtectClock=yes itself adds char-rtc:r
  'IPAddressDeny=',
  'MemoryDenyWriteExecute=',
  'PrivateNetwork=',
  'PrivateUsers=',
  'RestrictAddressFamilies=~AF_(INET|INET6)',
  'RestrictAddressFamilies=~AF_UNIX',
  'RootDirectory=/RootImage=',
  'SystemCallFilter=~@resources', // setpriority alone, for bulkThreadNice
];

const haveTool = (cmd: string): boolean => !spawnSync(cmd, ['--version']).error;
const noSystemd =
  !haveTool('systemd-analyze') && 'systemd-analyze not installed (apt-get install systemd)';

function run(cmd: string, args: string[], cwd?: string): { status: number | null; out: string } {
  const r = spawnSync(cmd, args, {
    cwd,
    encoding: 'utf8',
    env: { ...process.env, SYSTEMD_COLORS: '0', SYSTEMD_PAGER: '' },
  });
  if (r.error) throw r.error;
  return { status: r.status, out: `${r.stdout}${r.stderr}`.trim() };
}

function tempDir(t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-systemd-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

t.test('systemd-analyze verify', { skip: noSystemd }, async (t) => {
  t.test('as shipped: the only complaint is the binary a package would install', async (t) => {
    const r = run('systemd-analyze', [
      'verify',
      '--man=no',
      ...UNIT_FILES.map((u) => join(UNITS, u)),
    ]);
    const lines = r.out.split('\n').filter((l) => l !== '');
    const other = lines.filter((l) => !/Command \/usr\/bin\/yabusame is not executable/.test(l));
    if (existsSync('/usr/bin/yabusame')) t.equal(r.status, 0, r.out);
    else t.ok(lines.length > 0, 'verify does check ExecStart');
    t.same(other, [], 'nothing else');
  });

  t.test('with ExecStart pointed at this checkout: no warnings at all', async (t) => {
    t.ok(existsSync(BIN), `${BIN} exists`);
    const dir = tempDir(t);
    for (const unit of UNIT_FILES) {
      const text = readFileSync(join(UNITS, unit), 'utf8');
      const rewritten = text.replace(
        /^ExecStart=\/usr\/bin\/yabusame /m,
        `ExecStart=${process.execPath} ${BIN} `,
      );
      if (unit.endsWith('.service')) t.not(rewritten, text, `${unit}: ExecStart rewritten`);
      writeFileSync(join(dir, unit), rewritten);
    }
    const r = run(
      'systemd-analyze',
      ['verify', '--man=no', ...UNIT_FILES.map((u) => `./${u}`)],
      dir,
    );
    t.equal(r.status, 0, 'exit 0');
    t.equal(r.out, '', 'no output (unknown keys and bad values only warn)');
  });
});

t.test('systemd-analyze security --offline=true', { skip: noSystemd }, async (t) => {
  for (const unit of ['yabusame-dest.service', 'yabusame-source.service']) {
    const r = run(
      'systemd-analyze',
      ['security', '--offline=true', '--no-pager', `./${unit}`],
      UNITS,
    );
    t.equal(r.status, 0, `${unit}: analyzed`);
    const m = /Overall exposure level for \S+: (\d+(?:\.\d+)?)/.exec(r.out);
    t.ok(m, `${unit}: exposure reported`);
    const score = Number(m?.[1]);
    t.ok(score <= MAX_EXPOSURE, `${unit}: exposure ${score} <= ${MAX_EXPOSURE}`);
    const open = r.out
      .split('\n')
      .filter((l) => l.startsWith('✗'))
      .map((l) => l.slice(1).trim().split(/\s+/)[0]!)
      .sort();
    t.same(open, [...OPEN].sort(), `${unit}: open findings are the documented ones`);
  }
});

t.test(
  'sysusers + tmpfiles applied to a scratch root',
  {
    skip:
      (!haveTool('systemd-sysusers') || !haveTool('systemd-tmpfiles')) &&
      'systemd tools not installed',
  },
  async (t) => {
    const root = tempDir(t);
    // With --root, systemd reads its config from inside the root: install the files there.
    for (const [src, dst] of [
      ['yabusame.sysusers.conf', 'usr/lib/sysusers.d/yabusame.conf'],
      ['yabusame.tmpfiles.conf', 'usr/lib/tmpfiles.d/yabusame.conf'],
    ] as const) {
      mkdirSync(dirname(join(root, dst)), { recursive: true });
      copyFileSync(join(UNITS, src), join(root, dst));
    }
    mkdirSync(join(root, 'etc'));
    const su = run('systemd-sysusers', [`--root=${root}`]);
    t.equal(su.status, 0, su.out);
    const passwd = readFileSync(join(root, 'etc', 'passwd'), 'utf8');
    const entry = /^yabusame:x:(\d+):(\d+):[^:]*:\/var\/lib\/yabusame:\/usr\/sbin\/nologin$/m.exec(
      passwd,
    );
    t.ok(entry, `user yabusame created: ${passwd}`);
    const uid = Number(entry?.[1]);
    t.ok(uid > 0 && uid < 1000, 'a system user');

    const tf = run('systemd-tmpfiles', [`--root=${root}`, '--create']);
    t.equal(tf.status, 0, tf.out);
    const expect: Array<[string, number, number]> = [
      ['run/yabusame', 0o755, uid],
      ['var/lib/yabusame', 0o750, uid],
      ['var/lib/yabusame/images', 0o750, uid],
      ['etc/yabusame', 0o750, 0],
      ['etc/yabusame/secrets', 0o750, 0],
    ];
    for (const [path, mode, owner] of expect) {
      const st = statSync(join(root, path));
      t.ok(st.isDirectory(), `/${path} is a directory`);
      t.equal(st.mode & 0o7777, mode, `/${path} mode ${mode.toString(8)}`);
      t.equal(st.uid, owner, `/${path} owner`);
    }
  },
);
