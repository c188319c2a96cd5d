/**
 * A TCP proxy that forwards bytes unchanged until the test cuts the link,
 * for the replication tests that cut the link between a primary and its
 * standby, not the processes. Two ways to cut:
 *
 * - `drop`: a black hole. Nothing is forwarded either way and nothing is
 *   closed: the connections stay up, the senders' buffers fill as TCP's would
 *   while its segments go unanswered. New connections are accepted and wait.
 *   Healing forwards what waited, in order (TCP delivers a late segment,
 *   never loses one inside a connection).
 * - `reset`: every connection is destroyed at once (both ends see it close),
 *   and new ones are closed as they come until the link heals.
 *
 * `cutAfter(bytes)` cuts as `drop` once that many more bytes went from the
 * target to the client: half-way through a transfer, exactly.
 */
import { createConnection, createServer, type Server, type Socket } from 'node:net'

export type CutMode = 'drop' | 'reset'

export interface LinkProxy {
  /** host:port to give the client instead of the target's. */
  readonly address: string
  /** Connections forwarded to the target so far (a reconnect counts again). */
  readonly connections: () => number
  cut (mode: CutMode): void
  /** Forwards `bytes` more from the target to the client, then cuts as `drop` (the rest waits for heal()). */
  cutAfter (bytes: number): void
  heal (): void
  close (): Promise<void>
}

interface Link { readonly client: Socket, upstream: Socket | undefined, held: Buffer[] }

export async function startLinkProxy (target: { host: string, port: number }): Promise<LinkProxy> {
  let cut: CutMode | null = null
  let forwarded = 0
  let budget: number | null = null
  const links = new Set<Link>()
  const pauseAll = (): void => {
    for (const link of links) {
      link.client.pause()
      link.upstream?.pause()
    }
  }

  const connectUpstream = (link: Link): void => {
    forwarded++
    const upstream = link.upstream = createConnection(target)
    upstream.on('error', () => {})
    upstream.on('close', () => { link.client.destroy(); links.delete(link) })
    link.client.on('close', () => { upstream.destroy(); links.delete(link) })
    link.client.on('data', (chunk: Buffer) => upstream.write(chunk))
    upstream.on('data', (chunk: Buffer) => {
      if (cut === 'drop') { link.held.push(chunk); return }
      if (budget !== null && chunk.length >= budget) {
        link.client.write(chunk.subarray(0, budget))
        link.held.push(chunk.subarray(budget))
        budget = null
        cut = 'drop'
        pauseAll()
        return
      }
      if (budget !== null) budget -= chunk.length
      link.client.write(chunk)
    })
  }

  const server: Server = createServer((client) => {
    client.on('error', () => {})
    if (cut === 'reset') { client.destroy(); return }
    const link: Link = { client, upstream: undefined, held: [] }
    links.add(link)
    // The upstream is connected once the link forwards: under `drop` the client's SYN was answered, nothing more.
    if (cut === 'drop') client.pause()
    else connectUpstream(link)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  if (address === null || typeof address === 'string') throw new Error('proxy has no port')

  return {
    address: `127.0.0.1:${address.port}`,
    connections: () => forwarded,
    cut (mode) {
      cut = mode
      for (const link of links) {
        if (mode === 'reset') {
          link.client.destroy()
          link.upstream?.destroy()
        }
      }
      if (mode === 'reset') links.clear()
      else pauseAll()
    },
    cutAfter (bytes) {
      budget = bytes
    },
    heal () {
      cut = null
      budget = null
      for (const link of links) {
        for (const chunk of link.held.splice(0)) link.client.write(chunk)
        if (link.upstream === undefined) connectUpstream(link)
        else link.upstream.resume()
        link.client.resume()
      }
    },
    async close () {
      for (const link of links) {
        link.client.destroy()
        link.upstream?.destroy()
      }
      links.clear()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    },
  }
}
