// What every small server of the benchmarks (floor, legacy re-enactment, proxies, upstream,
// peers) does the same way: read host:port arguments, listen and announce the bound address to
// the driver over IPC (or print it when started by hand), and stop on SIGTERM or SIGINT.
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';

/** "127.0.0.3:8080" -> ["127.0.0.3", 8080]. */
export function splitHostPort(text: string): [string, number] {
  const colon = text.lastIndexOf(':');
  return [text.slice(0, colon), Number(text.slice(colon + 1))];
}

/**
 * Listen on host:port, then send {type: 'listening', address} to the driver, or print
 * "LABEL listening on ADDRESS DETAIL" when there is no IPC channel. Resolves with the address.
 */
export function listenAndAnnounce(server: Server, host: string, port: number, label: string, detail = ''): Promise<AddressInfo> {
  return new Promise((resolve) => {
    server.listen(port, host, () => {
      const address = server.address() as AddressInfo;
      if (process.send) process.send({ type: 'listening', address: `${address.address}:${address.port}` });
      else process.stdout.write(`${label} listening on ${address.address}:${address.port}${detail}\n`);
      resolve(address);
    });
  });
}

/** On SIGTERM or SIGINT: close every connection of `server`, run `cleanup`, exit 0 (at the latest after 1 s). */
export function exitOnSignal(server: Server, cleanup: () => unknown = () => undefined): void {
  const shutdown = () => {
    server.closeAllConnections();
    server.close();
    setTimeout(() => process.exit(0), 1_000).unref();
    void Promise.resolve()
      .then(cleanup)
      .finally(() => process.exit(0));
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}
