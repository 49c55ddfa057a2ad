/**
 * `yabusame`: one command, several subcommands (daemon/cli/). Exit codes: 0 success, 1 runtime
 * failure, 2 usage or configuration error.
 */
import { ConfigError } from './ops/config.js';
import * as sys from './linux/sys.js';
import { UsageError } from './cli/common.js';
import { runDest } from './cli/dest.js';
import { runSource } from './cli/source.js';
import { runMigrate } from './cli/migrate.js';
import { runFreeze, runRegister, runStatus, runUnregister } from './cli/client.js';
import { VERSION } from './cli/version.js';
import { runInstall } from './cli/install.js';

const USAGE = `yabusame ${VERSION}: post-copy live migration of VM memory

Usage: yabusame <command> [options]

Commands:
  dest        run the destination daemon: takes userfaultfds from VMMs on a UNIX socket and
              fills their memory from a source
  source      run the source page server: serves memory images to destinations
  status      show the migrations of a running dest or source
  register    register a migration with a source (prints its secret when generated)
  freeze      mark a migration frozen on a source (its VM stopped): requests are served
  unregister  abort a migration on a source and forget it
  migrate     live-migrate a running QEMU through yabusame, every step in one command
  install     install the systemd units, sysusers/tmpfiles files and example configs
  demo        generate a 1 GiB image and migrate a simulated VM of it end to end (see README)

Run 'yabusame <command> --help' for a command's options; 'yabusame --version' for the version.
`;

async function main(argv: string[]): Promise<void> {
  const [cmd, ...rest] = argv;
  if (cmd === 'dest' || cmd === 'source') sys.keepFreedBuffers(64 * 1024 * 1024);
  switch (cmd) {
    case 'dest':
      return runDest(rest);
    case 'source':
      return runSource(rest);
    case 'status':
      return runStatus(rest);
    case 'register':
      return runRegister(rest);
    case 'freeze':
      return runFreeze(rest);
    case 'unregister':
      return runUnregister(rest);
    case 'migrate':
      return runMigrate(rest);
    case 'install':
      return runInstall(rest);
    case 'demo': {
      const { main: demo } = await import('../scripts/demo.js');
      return demo(rest);
    }
    case '--version':
    case '-V':
      process.stdout.write(`${VERSION}\n`);
      return;
    case undefined:
    case '--help':
    case '-h':
    case 'help':
      process.stdout.write(USAGE);
      if (cmd === undefined) process.exitCode = 2;
      return;
    default:
      throw new UsageError(`unknown command "${cmd}"\n\n${USAGE}`);
  }
}

// `yabusame status | head`: a reader that went away is not an error.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(0);
  throw err;
});

main(process.argv.slice(2)).catch((err: unknown) => {
  if (err instanceof UsageError) {
    process.stderr.write(`yabusame: ${err.message}\n`);
    process.exit(2);
  }
  if (err instanceof ConfigError) {
    process.stderr.write(`yabusame: ${err.code}: ${err.message}\n`);
    process.exit(2);
  }
  const code = (err as { code?: string }).code;
  process.stderr.write(
    `yabusame: ${code ? `${code}: ` : ''}${(err as Error).message ?? String(err)}\n`,
  );
  process.exit(1);
});
