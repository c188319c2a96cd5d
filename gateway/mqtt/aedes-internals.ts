/**
 * Every reach into aedes 1.2.0 (and the mqtt-packet parser it creates per client) beyond its public API, in one
 * place. Each function says why it is needed, where the library does the thing it works around (source line of
 * the installed version) and the upstream issue, or that there is none and which public API would remove it. When
 * aedes or mqtt-packet is upgraded, this file is the checklist: every entry must be re-read against the new source.
 */
import type { Client } from 'aedes'
import { BufferList } from 'bl'

// --- idle connection memory (issue 13) -----------------------------------------------------------------------------

/** The mqtt-packet 9 parser aedes creates for every client (`client._parser`, lib/client.js#L56). */
interface PacketParser {
  /** Bytes received and not yet parsed (mqtt-packet parser.js#L33: `this._list = bl()`). */
  _list: { readonly length: number }
  /** Names of the parse steps, an array of four strings built per parser (parser.js#L18). */
  _states: readonly string[]
  /** After a CONNECT, the CONNECT packet itself (parser.js#L267); read for `protocolVersion` and `bridgeMode` only. */
  settings: { readonly protocolVersion?: number, readonly bridgeMode?: boolean }
  once (event: 'packet', listener: (this: PacketParser, packet: ParsedPacket) => void): void
}

interface ParsedPacket { readonly cmd: string, readonly protocolVersion?: number, readonly bridgeMode?: boolean }

const PARSE_STEPS: readonly string[] = Object.freeze(['_parseHeader', '_parseLength', '_parsePayload', '_newPacket'])

/** After the CONNECT: keeps what the parser reads of it, not the packet with its password and the buffer under it. */
function forgetConnectPacket (this: PacketParser, packet: ParsedPacket): void {
  if (packet.cmd === 'connect' && this.settings === packet) {
    this.settings = { protocolVersion: packet.protocolVersion, bridgeMode: packet.bridgeMode }
  }
}

/**
 * The packet ids of inbound QoS 2 messages awaiting PUBREL, as aedes keeps them per client (`client._inboundInflight`,
 * a `new Set()` in lib/client.js#L45, read with `has`/`size`/`add`/`delete` in lib/handlers/publish.js#L68 and
 * pubrel.js#L57), but with the hash table made on the first add: an empty Set costs about 250 bytes of heap, and
 * most devices never publish at QoS 2.
 */
class LazyPacketIds {
  #ids: Set<number> | null = null
  get size (): number { return this.#ids?.size ?? 0 }
  has (id: number): boolean { return this.#ids?.has(id) ?? false }
  add (id: number): this {
    (this.#ids ??= new Set()).add(id)
    return this
  }

  delete (id: number): boolean {
    const deleted = this.#ids?.delete(id) ?? false
    if (this.#ids?.size === 0) this.#ids = null
    return deleted
  }
}

/**
 * Makes a new client cheaper to keep while the connection idles; called right after `broker.handle`, before a byte
 * is parsed. Its inbound QoS 2 id set is made lazy (LazyPacketIds above). Measured with heap snapshots of 10,000
 * idle connections (BENCHMARKS.md, idle connections), the parser of each client held:
 * - a `bl()` BufferListStream as its byte buffer: a full readable-stream Duplex (two stream states, an event
 *   table, bound callbacks) of which the parser uses only the BufferList methods (append, consume, slice,
 *   readUInt*). A plain `BufferList` of the same bl version has exactly those. An error makes the parser build
 *   a new `bl()` (`_resetState`), but aedes closes the connection on a parser error.
 * - its own copy of a constant four-string array (`_states`); all parsers share one here.
 * - the CONNECT packet for the life of the connection (`settings`), with its password Buffer and, through it,
 *   the first read's buffer; only `protocolVersion` and `bridgeMode` are kept here.
 * No upstream issue: aedes has no option for its parser or its per-client state, and mqtt-packet none for its buffer; a parser that
 * allocated these lazily upstream would remove this.
 */
export function slimClient (client: Client): void {
  const internals = client as unknown as { _parser?: PacketParser, _inboundInflight?: unknown }
  if (internals._inboundInflight instanceof Set && internals._inboundInflight.size === 0) internals._inboundInflight = new LazyPacketIds()
  const parser = internals._parser
  if (parser === undefined) return
  if (parser._list.length === 0 && !(parser._list instanceof BufferList)) parser._list = new BufferList()
  if (parser._states.length === PARSE_STEPS.length && parser._states.every((s, i) => s === PARSE_STEPS[i])) parser._states = PARSE_STEPS
  parser.once('packet', forgetConnectPacket)
}
