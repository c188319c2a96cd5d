/**
 * MQTT 5 devices with a delayed will, for the gateway-process tests of will delays across kill -9 and takeovers.
 */
import type { IClientOptions } from 'mqtt'

/** What the gateway logs of a will of a client connected when it stopped, waiting for its delay (gateway/mqtt/wills.ts). */
export const WILL_WAITING = 'will of a client connected when the gateway stopped: waiting for its will delay'

/**
 * MQTT.js options of MQTT 5 device `clientId` (a persistent session of an hour unless told otherwise) whose will,
 * `<clientId>-gone` at QoS 1 on `devices/<clientId>/events/offline`, waits `willDelayInterval` s; no will without one.
 */
export function delayedWillDevice (clientId: string, options: { readonly clean?: boolean, readonly sessionExpiryInterval?: number,
  readonly willDelayInterval?: number } = {}): IClientOptions {
  const { clean = false, sessionExpiryInterval = 3600, willDelayInterval } = options
  return {
    protocolVersion: 5, clientId, clean, reconnectPeriod: 0, properties: { sessionExpiryInterval },
    ...willDelayInterval === undefined
      ? {}
      : { will: { topic: `devices/${clientId}/events/offline`, payload: Buffer.from(`${clientId}-gone`), qos: 1 as const, retain: false, properties: { willDelayInterval } } },
  }
}
