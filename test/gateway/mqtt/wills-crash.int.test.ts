/**
 * Wills fired at startup, with the gateway killed while it fires them: a
 * QoS 2 will goes into the log exactly once [MQTT-4.3.3-2] (DESIGN.md,
 * guarantee 2), whichever will the kill interrupts — none is lost, none is
 * logged twice.
 */
import { spawn } from 'node:child_process'
import path from 'node:path'
import type { MqttClient } from 'mqtt'
import { afterAll, expect, it } from 'vitest'
import { startGatewayProcess, tempDir, type GatewayProcess } from '../../helpers/gateway-process.ts'
import { readWholeLog } from '../../helpers/log-reader.ts'
import { connectOk, endAll } from '../../helpers/mqtt-probe.ts'

const ROOT = path.resolve(import.meta.dirname, '../../..')
const BIN = path.join(ROOT, 'gateway/edgemq.mjs')
const WILLS = 120
const KILLS = 3
const FIRED = 'will of a client connected when the gateway stopped: fired'

/** Starts `edgemq start` and SIGKILLs it once it has logged `count` fired wills; resolves with how many it logged. */
function killWhileFiring (dataDir: string, count: number): Promise<{ fired: number, ready: boolean, output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, 'start', '--data-dir', dataDir, '--http-port', '0', '--mqtt-port', '0'], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] })
    let output = ''
    let fired = 0
    let ready = false
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000)
    const onData = (d: Buffer): void => {
      const text = d.toString()
      output += text
      fired += text.split(FIRED).length - 1
      if (text.includes(' ready: ')) ready = true
      if (fired >= count || ready) child.kill('SIGKILL')
    }
    child.stdout.on('data', onData)
    child.stderr.on('data', onData)
    child.on('error', reject)
    child.on('close', () => { clearTimeout(timer); resolve({ fired, ready, output: output.slice(-4000) }) })
  })
}

const cleanups: Array<() => Promise<void>> = []
const clients = new Set<MqttClient>()
afterAll(async () => {
  await endAll(clients)
  for (const c of cleanups.reverse()) await c().catch(() => {})
})

it(`logs each QoS 2 will once although the gateway is killed ${KILLS} times while firing them at startup`, async () => {
  const { dir, cleanup } = await tempDir('edgemq-wills-crash-')
  cleanups.push(cleanup)
  const dataDir = path.join(dir, 'data')
  let gw: GatewayProcess = await startGatewayProcess({ dataDir })
  cleanups.push(() => gw.kill())
  for (let i = 0; i < WILLS; i++) {
    clients.add(await connectOk(gw.mqttUrl, {
      clientId: `w${i}`, reconnectPeriod: 0, will: { topic: `devices/w${i}/events/offline`, payload: Buffer.from(`w${i}-gone`), qos: 2, retain: false },
    }))
  }
  await gw.kill()
  await endAll(clients)

  for (let k = 0; k < KILLS; k++) {
    const run = await killWhileFiring(dataDir, 5 + Math.floor(Math.random() * 20))
    expect(run.ready, `kill ${k}: the gateway fired every will before it was killed (${run.fired} fired):\n${run.output}`).toBe(false)
  }
  gw = await startGatewayProcess({ dataDir })
  await gw.kill()

  const counts = new Map<string, number>()
  for (const r of await readWholeLog(dataDir)) if (r.payload.endsWith('-gone')) counts.set(r.payload, (counts.get(r.payload) ?? 0) + 1)
  const wrong = Array.from({ length: WILLS }, (_, i) => `w${i}-gone`).filter((p) => counts.get(p) !== 1).map((p) => `${p}: ${counts.get(p) ?? 0}`)
  expect(wrong).toEqual([])
}, 120_000)

it('keeps the will of a connection that took over a client id, and fires it after a kill -9', async () => {
  const { dir, cleanup } = await tempDir('edgemq-wills-takeover-')
  cleanups.push(cleanup)
  const dataDir = path.join(dir, 'data')
  let gw: GatewayProcess = await startGatewayProcess({ dataDir })
  cleanups.push(() => gw.kill())
  const will = (payload: string): { topic: string, payload: Buffer, qos: 1, retain: false } => ({ topic: 'devices/tk/events/offline', payload: Buffer.from(payload), qos: 1, retain: false })
  const watcher = await connectOk(gw.mqttUrl, { clientId: 'watcher', clean: false, reconnectPeriod: 0 })
  clients.add(watcher)
  await watcher.subscribeAsync('devices/tk/events/#', { qos: 1 })
  const fired = new Promise<string>((resolve) => watcher.on('message', (_topic, payload) => resolve(payload.toString())))
  clients.add(await connectOk(gw.mqttUrl, { clientId: 'tk', reconnectPeriod: 0, will: will('first-gone') }))
  // The same device again (its old TCP connection half open, as after a network change): aedes closes the first
  // connection, which fires the first will, after it stored the second connection's will.
  clients.add(await connectOk(gw.mqttUrl, { clientId: 'tk', reconnectPeriod: 0, will: will('second-gone') }))
  expect(await fired).toBe('first-gone')
  // A session write after the first will's delete: once its SUBACK is back, that delete is on disk too.
  await watcher.subscribeAsync('devices/tk/other', { qos: 1 })
  await gw.kill()
  await endAll(clients)

  gw = await startGatewayProcess({ dataDir })
  await gw.kill()
  const logged = (await readWholeLog(dataDir)).filter((r) => r.payload.endsWith('-gone')).map((r) => r.payload)
  expect(logged).toEqual(['first-gone', 'second-gone'])
}, 60_000)
