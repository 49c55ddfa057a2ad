/**
 * `yabusame install`: puts the systemd units, the sysusers.d and tmpfiles.d files and commented
 * default configs where a host expects them, with ExecStart= pointing at this installation's
 * command. Existing configs are never overwritten; units are (they belong to the package).
 * `--root` installs beneath another directory (packaging, tests); `--dry-run` only prints.
 */
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse, str, UsageError } from './common.js';

/** The package's root: dist/daemon/cli/ → three levels up. */
const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

function defaultBin(): string {
  return join(PACKAGE_ROOT, 'bin', 'yabusame.js');
}

export const INSTALL_USAGE = `Usage: yabusame install [--root DIR] [--bin PATH] [--dry-run]

Installs the systemd units (yabusame-dest.service, yabusame-dest.socket,
yabusame-source.service), sysusers.d and tmpfiles.d files, and commented configs in
/etc/yabusame/ (only where none exist yet). Then run:
  systemd-sysusers && systemd-tmpfiles --create && systemctl daemon-reload
  systemctl enable --now yabusame-dest.socket      # destination hosts
  systemctl enable --now yabusame-source.service   # source hosts

  --root DIR    install beneath DIR instead of / (packaging, containers)
  --bin PATH    the yabusame command the units run (default: this one, ${defaultBin()})
  --dry-run     print what would be written, write nothing
`;

interface Item {
  from: string;
  to: string;
  /** Keep an existing file (configs). */
  keep?: boolean;
  /** Rewrites the content (ExecStart= of the units). */
  edit?: (text: string) => string;
}

export function installPlan(root: string, bin: string): Item[] {
  const unitDir = join(root, 'etc', 'systemd', 'system');
  const execStart = (text: string): string =>
    text
      .replace(/^ExecStart=\/usr\/bin\/yabusame /m, `ExecStart=${bin} `)
      .replace(/^Documentation=.*$/m, `Documentation=file://${join(PACKAGE_ROOT, 'README.md')}`);
  const units = ['yabusame-dest.service', 'yabusame-dest.socket', 'yabusame-source.service'];
  return [
    ...units.map((u) => ({
      from: join(PACKAGE_ROOT, 'systemd', u),
      to: join(unitDir, u),
      edit: execStart,
    })),
    {
      from: join(PACKAGE_ROOT, 'systemd', 'yabusame.sysusers.conf'),
      to: join(root, 'usr', 'lib', 'sysusers.d', 'yabusame.conf'),
    },
    {
      from: join(PACKAGE_ROOT, 'systemd', 'yabusame.tmpfiles.conf'),
      to: join(root, 'usr', 'lib', 'tmpfiles.d', 'yabusame.conf'),
    },
    ...['dest.json', 'source.json'].map((c) => ({
      from: join(PACKAGE_ROOT, 'examples', c),
      to: join(root, 'etc', 'yabusame', c),
      keep: true,
    })),
  ];
}

export function runInstall(args: string[]): void {
  const v = parse(
    args,
    { root: { type: 'string' }, bin: { type: 'string' }, 'dry-run': { type: 'boolean' } },
    INSTALL_USAGE,
  );
  const root = resolve(str(v['root']) ?? '/');
  const bin = resolve(str(v['bin']) ?? defaultBin());
  if (!existsSync(bin)) throw new UsageError(`--bin ${bin}: no such file`);
  const dry = v['dry-run'] === true;
  for (const item of installPlan(root, bin)) {
    if (item.keep && existsSync(item.to)) {
      process.stdout.write(`kept       ${item.to} (exists)\n`);
      continue;
    }
    process.stdout.write(`${dry ? 'would write' : 'wrote     '} ${item.to}\n`);
    if (dry) continue;
    mkdirSync(dirname(item.to), { recursive: true });
    if (item.edit) writeFileSync(item.to, item.edit(readFileSync(item.from, 'utf8')));
    else copyFileSync(item.from, item.to);
  }
  if (!dry) {
    process.stdout.write(
      '\nNext: systemd-sysusers && systemd-tmpfiles --create && systemctl daemon-reload,\n' +
        'then enable yabusame-dest.socket (destination) or yabusame-source.service (source).\n',
    );
  }
}
