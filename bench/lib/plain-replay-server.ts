/**
 * The baseline of the replay bench's HTTP figures: the simplest server that
 * could serve the same records from raw classic-level, with no edgemq code.
 * Run as a child process: `node --import tsx plain-replay-server.ts <raw db
 * dir>`; prints `listening on <port>` once it serves on 127.0.0.1.
 *
 * - GET /ndjson   iterates the raw db (log-fixture.ts layout: 1,000-row cbor
 *                 values), cbor-decodes each value and writes its rows as
 *                 JSON lines built with JSON.stringify (payload as UTF-8),
 *                 one write per value, waiting for 'drain' when told to;
 *                 then a last line `{"end":{"records":N}}`.
 * - GET /values   writes each value as it comes from the iterator, as a
 *                 CBOR byte string (a CBOR sequence, like format=batches),
 *                 then a map `{"end":{"records":N}}`; the client decodes.
 */
import { once } from 'node:events'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { byteStringHead } from '../../gateway/http/batches.ts'
import { cbor, forEachRawValues, openRaw } from './log-fixture.ts'

const location = process.argv[2]
if (location === undefined) throw new Error('usage: plain-replay-server.ts <raw db dir>')
const db = await openRaw(location)

async function ndjson (res: http.ServerResponse): Promise<void> {
  res.writeHead(200, { 'content-type': 'application/x-ndjson; charset=utf-8' })
  let offset = 0
  await forEachRawValues(db, async (values) => {
    for (const value of values) {
      let text = ''
      for (const row of cbor.decode(value) as unknown[][]) {
        const [timestamp, key, topic, payload, qos, clientId] = row as [number, string, string, Uint8Array, number, string]
        text += `${JSON.stringify({ offset: offset++, timestamp, key, topic, qos, clientId, payload: Buffer.from(payload).toString('utf8') })}\n`
      }
      if (!res.write(text)) await once(res, 'drain')
    }
  })
  res.end(`${JSON.stringify({ end: { records: offset } })}\n`)
}

async function values (res: http.ServerResponse): Promise<void> {
  res.writeHead(200, { 'content-type': 'application/cbor-seq' })
  let records = 0
  await forEachRawValues(db, async (values) => {
    let ok = true
    for (const value of values) {
      res.write(byteStringHead(value.length))
      ok = res.write(value)
      // The row count without decoding: a definite-length cbor array's head.
      records += value[0] === 0x99 ? value.readUInt16BE(1) : value[0] === 0x9a ? value.readUInt32BE(1) : (value[0] as number) & 0x1f
    }
    if (!ok) await once(res, 'drain')
  })
  res.end(cbor.encode({ end: { records } }))
}

const server = http.createServer((req, res) => {
  const serve = req.url === '/ndjson' ? ndjson : req.url === '/values' ? values : null
  if (serve === null) { res.writeHead(404).end(); return }
  serve(res).catch((err: unknown) => { process.stderr.write(`${String(err)}\n`); res.destroy() })
})
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`listening on ${(server.address() as AddressInfo).port}\n`)
})
process.once('SIGTERM', () => { server.close(); server.closeAllConnections(); void db.close().then(() => process.exit(0)) })
