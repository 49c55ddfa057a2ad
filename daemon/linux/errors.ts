import { constants } from 'node:os';

const errnoNames = new Map<number, string>();
for (const [name, value] of Object.entries(constants.errno)) errnoNames.set(value, name);

/** The name of an errno value (`EEXIST`), or `E<number>` when unknown. */
export function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? `E${errno}`;
}

/** A failed system call: `code` is the errno name, stable for metrics and tests. */
export class SyscallError extends Error {
  readonly code: string;
  readonly errno: number;
  readonly syscall: string;
  constructor(syscall: string, errno: number, detail?: string) {
    const name = errnoName(errno);
    super(`${syscall}${detail ? ` (${detail})` : ''} failed: ${name}`);
    this.name = 'SyscallError';
    this.code = name;
    this.errno = errno;
    this.syscall = syscall;
  }
}

export const ERRNO = constants.errno;
