/**
 * Idle MQTT 3.1.1 clients for the idle-connections bench: one plain `net`
 * socket each, one CONNECT (clean session, keep-alive set), then nothing but
 * a PINGREQ every half keep-alive, all sockets pinged by one shared timer
 * that pings a slice of them each second, as devices that connected at
 * different times do. (Pinging all 10,000 in one tick made the gateway
 * allocate a burst that V8 answered by growing its young generation again,
 * every half keep-alive, exactly at the bench's 30 s readings.)
 * No MQTT.js client per connection, so 10,000 of them stay cheap on this
 * side: each socket reads into one shared buffer (`onread`), and nothing is
 * parsed but the 4-byte CONNACK.
 */
import net from 'node:net'
import mqttPacket from 'mqtt-packet'
import { DISCONNECT } from './mqtt/frame.ts'

const PINGREQ = Buffer.from([0xc0, 0x00])
/** The pinger's period: each tick pings the sockets of one slice, every socket once per half keep-alive. */
const PING_TICK_MS = 1000
/** CONNACK: type 2, remaining length 2, flags, return code. */
const CONNACK_BYTES = 4

export interface IdleLogin {
  readonly clientId: string
  readonly username?: string
  readonly password?: string
}

export interface IdleClientsOptions {
  readonly host: string
  readonly port: number
  readonly count: number
  readonly login: (i: number) => IdleLogin
  /** Seconds, sent in the CONNECT. */
  readonly keepalive: number
  /** CONNECTs outstanding at once. */
  readonly concurrency: number
  /** Gives up on a CONNACK after this long. */
  readonly connectTimeoutMs: number
}

/** Shared by every socket: nothing that arrives after the CONNACK (PINGRESPs) is kept. */
const readBuffer = Buffer.allocUnsafe(16 * 1024)

export class IdleClients {
  readonly #sockets: net.Socket[] = []
  #pinger: NodeJS.Timeout | undefined
  #closing = false
  /** Connections the broker closed after their CONNACK (should stay 0). */
  dropped = 0

  /** Opens `count` connections, `concurrency` CONNECTs at a time; rejects on the first refusal or timeout. */
  async open (options: IdleClientsOptions): Promise<void> {
    let next = 0
    const worker = async (): Promise<void> => {
      while (next < options.count) {
        const i = next++
        this.#sockets.push(await this.#connect(options, i))
      }
    }
    await Promise.all(Array.from({ length: Math.min(options.concurrency, options.count) }, worker))
    const slices = Math.max(1, Math.round(Math.max(1, options.keepalive / 2) * 1000 / PING_TICK_MS))
    let tick = 0
    clearInterval(this.#pinger) // a second open() adds sockets; one timer pings them all
    this.#pinger = setInterval(() => {
      const sockets = this.#sockets
      for (let i = tick++ % slices; i < sockets.length; i += slices) if (!(sockets[i] as net.Socket).destroyed) (sockets[i] as net.Socket).write(PINGREQ)
    }, PING_TICK_MS)
  }

  get size (): number { return this.#sockets.length }

  #connect (options: IdleClientsOptions, i: number): Promise<net.Socket> {
    const login = options.login(i)
    return new Promise((resolve, reject) => {
      let got = 0
      let connected = false
      const fail = (why: string): void => {
        clearTimeout(timer)
        socket.destroy()
        reject(new Error(`${login.clientId}: ${why}`))
      }
      const timer = setTimeout(() => fail(`no CONNACK within ${options.connectTimeoutMs} ms`), options.connectTimeoutMs)
      const socket = net.connect({
        host: options.host,
        port: options.port,
        onread: {
          buffer: readBuffer,
          callback: (n: number, buf: Uint8Array) => {
            if (connected) return true
            // The CONNACK's return code is its 4th byte; it may arrive split.
            for (let k = 0; k < n && got < CONNACK_BYTES; k++, got++) {
              if (got === 0 && buf[k] !== 0x20) { fail(`expected a CONNACK, got packet type ${(buf[k] as number) >> 4}`); return false }
              if (got === 3 && buf[k] !== 0) { fail(`CONNACK return code ${buf[k] as number}`); return false }
            }
            if (got === CONNACK_BYTES) {
              connected = true
              clearTimeout(timer)
              resolve(socket)
            }
            return true
          },
        },
      })
      socket.on('error', (err) => { if (!connected) fail(err.message) })
      socket.on('close', () => {
        if (!connected) fail('closed before its CONNACK')
        else if (!this.#closing) this.dropped++
      })
      socket.write(mqttPacket.generate({
        cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: true, keepalive: options.keepalive,
        clientId: login.clientId, username: login.username, password: login.password === undefined ? undefined : Buffer.from(login.password),
      }))
    })
  }

  /** DISCONNECT on every socket, then closes them. */
  close (): void {
    this.#closing = true
    clearInterval(this.#pinger)
    for (const s of this.#sockets.splice(0)) s.end(DISCONNECT)
  }
}
