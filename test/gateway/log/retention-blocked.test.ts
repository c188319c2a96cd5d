/**
 * A retention pass that meets a damaged batch at the front of a partition counts it in
 * edgemq_store_errors_total{kind="read"} (alert EdgemqStoreErrors), once per pass and partition, as every read that
 * met damage does: the store's log line alone would leave an operator watching dashboards none the wiser while the
 * partition keeps its records and the disk fills with them.
 */
import pino from 'pino'
import { Registry } from 'prom-client'
import { afterEach, expect, it } from 'vitest'
import { StoreHealth } from '../../../gateway/log/health.ts'
import { GatewayStoreObserver } from '../../../gateway/log/store-observer.ts'
import { createMetrics } from '../../../gateway/metrics/metrics.ts'
import type { LogStore } from '../../../store/index.ts'
import { damageBatch } from '../../store/batch-damage.ts'
import { classicBackend, FakeClock, payloadOf, type Backend } from '../../store/harness.ts'

let backend: Backend | undefined
let store: LogStore | undefined
afterEach(async () => {
  await store?.close()
  await backend?.destroy()
  store = backend = undefined
})

it('a retention pass blocked by a damaged batch counts a read error', async () => {
  const clock = new FakeClock()
  backend = classicBackend()
  const filled = await backend.open({ clock })
  await filled.createStream('t/s', { partitions: 1, retentionMs: 60_000 })
  await filled.append('t/s', 'k', { payload: payloadOf(0) })
  clock.advance(120_000)
  await filled.append('t/s', 'k', { payload: payloadOf(1) })
  await filled.close()
  const raw = await backend.raw()
  await damageBatch(raw, 't/s', 0, 0, 'corrupt')
  await raw.close()

  const logger = pino({ level: 'silent' })
  const observer = new GatewayStoreObserver(new StoreHealth(logger), [])
  store = await backend.openExisting({ clock, observer, logger })
  const registry = new Registry()
  const metrics = createMetrics(registry, {
    store, diskFreeBytes: () => undefined, diskSizeBytes: () => undefined, healthy: () => true, version: 'test', gatewayId: 'gw',
  })
  observer.attach(metrics, () => {})
  const readErrors = async (): Promise<number | undefined> =>
    (await registry.getSingleMetric('edgemq_store_errors_total')?.get())?.values.find((v) => v.labels.kind === 'read')?.value

  expect(await readErrors()).toBe(0)
  expect((await store.enforceRetention()).blocked).toHaveLength(1)
  expect(await readErrors()).toBe(1)
  await store.enforceRetention()
  expect(await readErrors()).toBe(2)
})
