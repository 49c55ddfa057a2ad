/**
 * Builds the small Linux guest for yabusame's QEMU runs under TCG: Debian's kernel (from /boot,
 * package linux-image-amd64) and an initramfs of busybox (busybox-static) plus the static
 * workload (workload.c), whose /init mounts proc, sys and dev and runs the workload on the
 * serial console. The guest needs no modules: ttyS0 and the initramfs are built into Debian's
 * kernel.
 *
 * Missing Debian packages are installed with apt-get (said on stderr). The initramfs is cached
 * under /var/tmp/yabusame-qemu-guest/<hash of its inputs>/, so a second build costs a hash.
 *
 * CLI: node dist/scripts/qemu/guest/build.js [--cache DIR] [--json]
 *   prints `kernel PATH` and `initramfs PATH` (or one JSON object).
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

export const DEFAULT_CACHE_DIR = '/var/tmp/yabusame-qemu-guest';
const BUSYBOX_PATH = '/bin/busybox';

/** Kernel command line words the guest needs; `yb.mib=N` sets the workload's size. */
export const GUEST_CMDLINE = 'console=ttyS0 panic=-1 quiet';

export interface GuestFiles {
  kernel: string;
  initramfs: string;
  /** Hash of the initramfs's inputs: the cache key. */
  key: string;
  /** True when this call built the initramfs, false when it came from the cache. */
  built: boolean;
}

/** The /init script: busybox's sh as PID 1, the workload as its child. */
export const INIT_SCRIPT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mib=512
batch=0
for word in $(cat /proc/cmdline); do
  case "$word" in
    yb.mib=*) mib="\${word#yb.mib=}" ;;
    yb.batch=*) batch="\${word#yb.batch=}" ;;
  esac
done
echo "yb-init up $(cut -d' ' -f1 /proc/uptime)s mib=$mib"
/workload "$mib" "$batch"
echo "yb-init workload exited with status $?"
poweroff -f
`;

function sourceFile(name: string): string {
  // From dist/scripts/qemu/guest/ (after tsc) or scripts/qemu/guest/ itself.
  const candidates = [
    new URL(`../../../../scripts/qemu/guest/${name}`, import.meta.url),
    new URL(`./${name}`, import.meta.url),
  ].map((u) => fileURLToPath(u));
  const found = candidates.find((p) => fs.existsSync(p));
  if (!found) throw new Error(`${name} not found (looked at ${candidates.join(', ')})`);
  return found;
}

function log(msg: string): void {
  process.stderr.write(`guest build: ${msg}\n`);
}

/** Installs Debian packages with apt-get, once with the current lists, then after an update. */
export function aptInstall(packages: string[]): void {
  if (packages.length === 0) return;
  log(`installing Debian packages with apt-get: ${packages.join(' ')}`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const install = ['install', '-y', '-q', '--no-install-recommends', ...packages];
  try {
    execFileSync('apt-get', install, { stdio: ['ignore', 'ignore', 'inherit'], env });
  } catch {
    log('apt-get install failed; running apt-get update and trying again');
    execFileSync('apt-get', ['update', '-q'], { stdio: ['ignore', 'ignore', 'inherit'], env });
    execFileSync('apt-get', install, { stdio: ['ignore', 'ignore', 'inherit'], env });
  }
}

/** The newest /boot/vmlinuz-*, or undefined. */
export function findKernel(): string | undefined {
  const names = fs.existsSync('/boot') ? fs.readdirSync('/boot') : [];
  const kernels = names
    .filter((n) => n.startsWith('vmlinuz-'))
    .sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
  const newest = kernels.at(-1);
  return newest === undefined ? undefined : join('/boot', newest);
}

function hasStaticLibc(): boolean {
  return ['/usr/lib/x86_64-linux-gnu/libc.a', '/usr/lib/libc.a'].some((p) => fs.existsSync(p));
}

function commandExists(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Installs whatever of the kernel, busybox-static and a static C toolchain is missing. */
export function ensurePackages(): void {
  const missing: string[] = [];
  if (findKernel() === undefined) missing.push('linux-image-amd64');
  if (!fs.existsSync(BUSYBOX_PATH) || !isStaticBusybox()) missing.push('busybox-static');
  if (!commandExists('cc')) missing.push('gcc');
  if (!hasStaticLibc()) missing.push('libc6-dev');
  aptInstall(missing);
}

function isStaticBusybox(): boolean {
  // busybox-static's binary has no program interpreter; the dynamic `busybox` package's has.
  const head = fs.readFileSync(BUSYBOX_PATH).subarray(0, 64 * 1024);
  return !head.includes(Buffer.from('ld-linux'));
}

// newc cpio: "070701", then 13 fields of 8 hex digits, then the name (NUL-terminated) padded to
// a multiple of 4 bytes, then the data padded to 4. See the kernel's
// Documentation/driver-api/early-userspace/buffer-format.rst.
export interface CpioEntry {
  name: string;
  /** st_mode: file type and permissions. */
  mode: number;
  data?: Buffer;
  rdevMajor?: number;
  rdevMinor?: number;
}

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFCHR = 0o020000;

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

/** Encodes a newc archive (uid/gid 0, mtime 0: the same inputs give the same bytes). */
export function encodeNewc(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  const all = [...entries, { name: 'TRAILER!!!', mode: 0 }];
  all.forEach((e, i) => {
    const data = e.data ?? Buffer.alloc(0);
    const name = Buffer.from(`${e.name}\0`);
    const fields = [
      i + 1, // ino
      e.mode,
      0, // uid
      0, // gid
      (e.mode & S_IFDIR) === S_IFDIR ? 2 : 1, // nlink
      0, // mtime
      data.length,
      0, // devmajor
      0, // devminor
      e.rdevMajor ?? 0,
      e.rdevMinor ?? 0,
      name.length,
      0, // check
    ];
    const header = '070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join('');
    parts.push(Buffer.from(header, 'ascii'), name, Buffer.alloc(pad4(110 + name.length)));
    parts.push(data, Buffer.alloc(pad4(data.length)));
  });
  return Buffer.concat(parts);
}

function sha256(...inputs: (string | Buffer)[]): string {
  const h = createHash('sha256');
  for (const i of inputs) h.update(i).update('\0');
  return h.digest('hex');
}

/** Builds (or finds in the cache) the guest's initramfs; returns the kernel and its path. */
export function buildGuest(cacheDir = DEFAULT_CACHE_DIR): GuestFiles {
  ensurePackages();
  const kernel = findKernel();
  if (kernel === undefined)
    throw new Error('no /boot/vmlinuz-* after installing linux-image-amd64');
  const workloadSrc = fs.readFileSync(sourceFile('workload.c'));
  const busybox = fs.readFileSync(BUSYBOX_PATH);
  const cc = process.env['CC'] ?? 'cc';
  const ccVersion = execFileSync(cc, ['--version'], { encoding: 'utf8' });
  const key = sha256('yb-guest-1', workloadSrc, INIT_SCRIPT, busybox, ccVersion).slice(0, 16);
  const dir = join(cacheDir, key);
  const initramfs = join(dir, 'initramfs.cpio');
  if (fs.existsSync(initramfs)) return { kernel, initramfs, key, built: false };

  fs.mkdirSync(dir, { recursive: true });
  const workloadBin = join(dir, 'workload');
  log(`compiling the workload into ${workloadBin}`);
  execFileSync(
    cc,
    ['-static', '-O2', '-Wall', '-Wextra', '-o', workloadBin, sourceFile('workload.c')],
    {
      stdio: ['ignore', 'inherit', 'inherit'],
    },
  );
  const dirs = ['bin', 'dev', 'proc', 'sys', 'sbin', 'tmp', 'usr', 'usr/bin', 'usr/sbin'];
  const cpio = encodeNewc([
    ...dirs.map((name) => ({ name, mode: S_IFDIR | 0o755 })),
    // The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    { name: 'dev/console', mode: S_IFCHR | 0o600, rdevMajor: 5, rdevMinor: 1 },
    { name: 'bin/busybox', mode: S_IFREG | 0o755, data: busybox },
    { name: 'init', mode: S_IFREG | 0o755, data: Buffer.from(INIT_SCRIPT) },
    { name: 'workload', mode: S_IFREG | 0o755, data: fs.readFileSync(workloadBin) },
  ]);
  // Written beside, then renamed: a concurrent build never sees half an archive.
  const tmp = `${initramfs}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, cpio);
  fs.renameSync(tmp, initramfs);
  log(`initramfs ${initramfs} (${cpio.length} bytes)`);
  return { kernel, initramfs, key, built: true };
}

export function main(argv: string[]): number {
  const { values } = parseArgs({
    args: argv,
    options: {
      cache: { type: 'string', default: DEFAULT_CACHE_DIR },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(
      'usage: build.js [--cache DIR] [--json]\n' +
        'Builds the TCG test guest (kernel from /boot, busybox + workload initramfs).\n',
    );
    return 0;
  }
  const files = buildGuest(values.cache);
  if (values.json) process.stdout.write(`${JSON.stringify(files)}\n`);
  else process.stdout.write(`kernel ${files.kernel}\ninitramfs ${files.initramfs}\n`);
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(fs.realpathSync(process.argv[1])).href) {
  process.exitCode = main(process.argv.slice(2));
}
