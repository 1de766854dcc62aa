// A tiny authoritative DNS server on loopback UDP for discovery tests: answers A and AAAA
// queries from a mutable map, and can be told to fail (SERVFAIL) or to stay silent.
//
// Wire format (RFC 1035 §4): a 12-byte header (id, flags, four counts), the question (labels,
// type, class), then answer records. Answers point back at the question's name with the
// compression pointer 0xC00C. Additional records in the query (EDNS OPT) are ignored.
import { createSocket, type RemoteInfo, type Socket } from 'node:dgram';
import { isIP } from 'node:net';

const TYPE_A = 1;
const TYPE_AAAA = 28;
const CLASS_IN = 1;
const RCODE_SERVFAIL = 2;
const RCODE_NXDOMAIN = 3;

export type DnsMode = 'answer' | 'servfail' | 'silent';

export class DnsServer {
  /** Name (lower case, no trailing dot) -> addresses (IPv4 and IPv6 mixed). */
  readonly records = new Map<string, string[]>();
  mode: DnsMode = 'answer';
  /** Queries received, by `name TYPE`. */
  queries = 0;
  private constructor(
    private readonly socket: Socket,
    readonly address: string,
  ) {}

  static async start(): Promise<DnsServer> {
    const socket = createSocket('udp4');
    await new Promise<void>((resolve) => socket.bind(0, '127.0.0.1', resolve));
    const server = new DnsServer(socket, `127.0.0.1:${socket.address().port}`);
    socket.on('message', (message, remote) => server.handle(message, remote));
    return server;
  }

  set(name: string, addresses: string[]): void {
    this.records.set(name.toLowerCase(), addresses);
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.socket.close(() => resolve()));
  }

  private handle(query: Buffer, remote: RemoteInfo): void {
    this.queries++;
    if (this.mode === 'silent') return;
    const question = parseQuestion(query);
    if (!question) return;
    const { id, rd, name, type, questionEnd } = question;
    const known = this.records.get(name.toLowerCase());
    let rcode = 0;
    if (this.mode === 'servfail') rcode = RCODE_SERVFAIL;
    else if (!known) rcode = RCODE_NXDOMAIN;
    const answers =
      rcode === 0 && known
        ? known.filter((address) => (type === TYPE_A && isIP(address) === 4) || (type === TYPE_AAAA && isIP(address) === 6))
        : [];
    const header = Buffer.alloc(12);
    header.writeUInt16BE(id, 0);
    // QR=1, opcode 0, AA=1, RD copied, RA=1, rcode.
    header.writeUInt16BE(0x8000 | 0x0400 | (rd ? 0x0100 : 0) | 0x0080 | rcode, 2);
    header.writeUInt16BE(1, 4);
    header.writeUInt16BE(answers.length, 6);
    const parts = [header, query.subarray(12, questionEnd)];
    for (const address of answers) parts.push(answerRecord(type, address));
    this.socket.send(Buffer.concat(parts), remote.port, remote.address);
  }
}

function parseQuestion(query: Buffer): { id: number; rd: boolean; name: string; type: number; questionEnd: number } | undefined {
  if (query.length < 12 || query.readUInt16BE(4) !== 1) return undefined;
  const labels: string[] = [];
  let offset = 12;
  for (;;) {
    const length = query[offset];
    if (length === undefined || length > 63) return undefined;
    offset++;
    if (length === 0) break;
    labels.push(query.toString('latin1', offset, offset + length));
    offset += length;
  }
  if (offset + 4 > query.length) return undefined;
  const type = query.readUInt16BE(offset);
  const klass = query.readUInt16BE(offset + 2);
  if (klass !== CLASS_IN) return undefined;
  return { id: query.readUInt16BE(0), rd: (query.readUInt16BE(2) & 0x0100) !== 0, name: labels.join('.'), type, questionEnd: offset + 4 };
}

function answerRecord(type: number, address: string): Buffer {
  const rdata = type === TYPE_A ? Buffer.from(address.split('.').map(Number)) : ipv6Bytes(address);
  const record = Buffer.alloc(12);
  record.writeUInt16BE(0xc00c, 0); // the name: a pointer to the question's
  record.writeUInt16BE(type, 2);
  record.writeUInt16BE(CLASS_IN, 4);
  record.writeUInt32BE(1, 6); // TTL 1 s: discovery re-resolves on its own timer anyway
  record.writeUInt16BE(rdata.length, 10);
  return Buffer.concat([record, rdata]);
}

function ipv6Bytes(address: string): Buffer {
  const [head = '', tail = ''] = address.split('::');
  const headGroups = head === '' ? [] : head.split(':');
  const tailGroups = address.includes('::') ? (tail === '' ? [] : tail.split(':')) : [];
  const groups = address.includes('::') ? [...headGroups, ...Array<string>(8 - headGroups.length - tailGroups.length).fill('0'), ...tailGroups] : headGroups;
  const out = Buffer.alloc(16);
  groups.forEach((group, index) => out.writeUInt16BE(parseInt(group, 16), index * 2));
  return out;
}
