// A PeerSync with its own PeerClient for unit tests of the fan-out, configured from environment
// variables as a replica would be; `onClose` receives what closes both.
import { configFromEnv } from '../../src/config.js';
import { createLogger } from '../../src/log.js';
import { Metrics } from '../../src/metrics.js';
import { PeerClient } from '../../src/peers/client.js';
import { PeerSync } from '../../src/peers/fanout.js';

export function startPeerSync(env: Record<string, string>, onClose: (close: () => Promise<void>) => void, connections = 1): PeerSync {
  const config = configFromEnv(env);
  const client = new PeerClient({ connections, token: '', instanceId: 'self' });
  const sync = new PeerSync({ config, client, metrics: new Metrics({ processMetrics: false }), logger: createLogger({ level: 'silent' }) });
  onClose(async () => {
    sync.close();
    await client.destroy();
  });
  return sync;
}
