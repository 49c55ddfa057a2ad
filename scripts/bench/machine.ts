/** The machine a benchmark ran on: CPU model, cores, kernel, node version, memory. */
import * as os from 'node:os';

export interface MachineInfo {
  cpuModel: string;
  cores: number;
  kernel: string;
  node: string;
  memTotalBytes: number;
  hostname: string;
}

export function machineInfo(): MachineInfo {
  const cpus = os.cpus();
  return {
    cpuModel: cpus[0]?.model.trim() ?? 'unknown',
    cores: os.availableParallelism?.() ?? cpus.length,
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    memTotalBytes: os.totalmem(),
    hostname: os.hostname(),
  };
}
