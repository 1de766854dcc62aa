// System error codes that both the peer client and the data plane classify alike.

/**
 * This replica short of what a connection needs: file descriptors (its own limit or the
 * system's), socket buffers, memory. It passes as connections close; it is not the peer's or
 * the sandbox's failure.
 */
export const LOCAL_RESOURCE_CODES: ReadonlySet<string> = new Set(['EMFILE', 'ENFILE', 'ENOBUFS', 'ENOMEM']);
