/**
 * The streams the config declares: every stream of `streams` in every tenant
 * (tenant "default" and `tenants`), created or updated when the gateway
 * starts, before any client can publish to them.
 */
import type { LogStore } from '../../store/index.ts'
import type { GatewayConfig } from '../config/config.ts'

/** The tenants of this config, "default" first. */
export function tenantsOf (config: GatewayConfig): string[] {
  return [...new Set(['default', ...config.tenants])]
}

export async function createConfiguredStreams (store: LogStore, config: GatewayConfig): Promise<void> {
  for (const tenant of tenantsOf(config)) {
    for (const [name, s] of Object.entries(config.streams)) await store.createStream(`${tenant}/${name}`, s)
  }
}
