/**
 * A throwaway PKI made with the `openssl` command at test time: a CA, a
 * server certificate for 127.0.0.1 / localhost, client certificates with a
 * chosen CN, and a second, unrelated CA to sign certificates the gateway must
 * refuse. EC P-256 keys, valid for two days; nothing is reused between runs.
 *
 * Tests skip when openssl is missing, except under CI=true, where a missing
 * openssl is a failure (CI must install it rather than silently test less).
 */
import { execFile, spawnSync } from 'node:child_process'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { randomBytes } from 'node:crypto'
import { promisify } from 'node:util'

const run = promisify(execFile)

/** Whether the `openssl` command can be run. */
export function opensslAvailable (): boolean {
  const r = spawnSync('openssl', ['version'], { stdio: 'ignore', timeout: 10_000 })
  return r.error === undefined && r.status === 0
}

/**
 * What a test file does without openssl: its TLS suites skip, and under
 * CI=true one test fails (`missingInCi`), so the CI summary counts a failure
 * rather than a silent skip.
 */
export function opensslPolicy (): { available: boolean, missingInCi: boolean } {
  const available = opensslAvailable()
  return { available, missingInCi: !available && process.env.CI === 'true' }
}

export interface KeyPair {
  readonly cert: string
  readonly key: string
}

export interface Pki {
  readonly dir: string
  /** The CA the gateway trusts (PEM file). */
  readonly caFile: string
  readonly ca: Buffer
  /** Server certificate for CN=localhost, SAN IP:127.0.0.1, DNS:localhost. */
  readonly server: KeyPair
  /** Client certificate signed by the trusted CA with this CN (files in `dir`). */
  client (cn: string): Promise<KeyPair>
  /** Client certificate with this CN signed by an unrelated CA. */
  foreignClient (cn: string): Promise<KeyPair>
}

const OPENSSL_CNF = `[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
`

async function openssl (args: readonly string[], cwd: string): Promise<void> {
  try {
    await run('openssl', [...args], { cwd, timeout: 30_000 })
  } catch (err) {
    const e = err as Error & { stderr?: string }
    throw new Error(`openssl ${args.join(' ')} failed: ${e.stderr ?? e.message}`, { cause: err })
  }
}

const EC_KEY = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes']

async function makeCa (dir: string, name: string): Promise<{ cert: string, key: string }> {
  const cert = path.join(dir, `${name}.crt`)
  const key = path.join(dir, `${name}.key`)
  await openssl(['req', '-x509', '-config', 'openssl.cnf', '-extensions', 'v3_ca', ...EC_KEY,
    '-keyout', key, '-out', cert, '-days', '2', '-subj', `/CN=${name}`], dir)
  return { cert, key }
}

async function issue (dir: string, ca: { cert: string, key: string }, file: string, cn: string, profile: 'server' | 'client'): Promise<KeyPair> {
  const key = path.join(dir, `${file}.key`)
  const csr = path.join(dir, `${file}.csr`)
  const cert = path.join(dir, `${file}.crt`)
  await openssl(['req', '-new', '-config', 'openssl.cnf', ...EC_KEY, '-keyout', key, '-out', csr, '-subj', `/CN=${cn}`], dir)
  await openssl(['x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-set_serial', `0x${randomBytes(8).toString('hex')}`,
    '-days', '2', '-extfile', 'openssl.cnf', '-extensions', profile, '-out', cert], dir)
  return { cert, key }
}

/** Creates the CA, the server certificate and the foreign CA under `dir`. */
export async function createPki (dir: string): Promise<Pki> {
  if (!opensslAvailable()) {
    throw new Error('the openssl command is not installed: TLS tests need it to make throwaway certificates (CI: apt-get install -y openssl)')
  }
  await mkdir(dir, { recursive: true })
  await writeFile(path.join(dir, 'openssl.cnf'), OPENSSL_CNF)
  const ca = await makeCa(dir, 'edgemq-test-ca')
  const foreign = await makeCa(dir, 'other-ca')
  const server = await issue(dir, ca, 'server', 'localhost', 'server')
  let n = 0
  const safe = (cn: string): string => `${cn.replace(/[^A-Za-z0-9.-]/g, '_')}-${n++}`
  return {
    dir,
    caFile: ca.cert,
    ca: await readFile(ca.cert),
    server,
    client: (cn) => issue(dir, ca, `client-${safe(cn)}`, cn, 'client'),
    foreignClient: (cn) => issue(dir, foreign, `foreign-${safe(cn)}`, cn, 'client'),
  }
}

/** Reads a key pair for an MQTT.js client's TLS options. */
export async function loadKeyPair (pair: KeyPair): Promise<{ cert: Buffer, key: Buffer }> {
  return { cert: await readFile(pair.cert), key: await readFile(pair.key) }
}
