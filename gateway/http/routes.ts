/**
 * One path with its methods. fastify answers a method a path does not
 * have with 404; the API's contract is 405 HTTP_METHOD_NOT_ALLOWED with an
 * Allow header (docs/errors.md), so each path also gets a route for every
 * other method that says so. Those routes are hidden from the OpenAPI
 * document, and refuse in `onRequest`, before a body is read (after the
 * plugin's own onRequest hooks: /v1 authenticates first).
 */
import type { FastifyInstance, RouteOptions } from 'fastify'
import { ApiError } from './errors.ts'
import { ERROR_RESPONSE } from './schemas.ts'

export type Method = 'GET' | 'POST' | 'DELETE'
type Route = Omit<RouteOptions, 'method' | 'url'>

/**
 * Registers `routes` on `url`, and 405 for the other methods. `allow` is
 * the Allow header (default: the methods, comma-separated); a GET route
 * answers HEAD too (fastify's exposeHeadRoutes). Every route's schema gets
 * the error body as its `default` response, for the OpenAPI document.
 */
export function routePath (app: FastifyInstance, url: string, routes: Partial<Record<Method, Route>>, allow?: string): void {
  const methods = Object.keys(routes) as Method[]
  for (const method of methods) {
    const route = routes[method] as Route
    const schema = { ...route.schema, response: { ...route.schema?.response as object, default: ERROR_RESPONSE } }
    app.route({ ...route, schema, method, url })
  }
  const others = app.supportedMethods.filter((m) => !(methods as string[]).includes(m) && !(m === 'HEAD' && methods.includes('GET')))
  const allowed = allow ?? methods.join(', ')
  app.route({
    method: others,
    url,
    schema: { hide: true },
    onRequest: async (request) => {
      throw new ApiError('HTTP_METHOD_NOT_ALLOWED', `${request.method} is not allowed on ${request.url.split('?')[0] ?? url}; use ${methods.join(' or ')}`,
        { details: { allow: allowed } })
    },
    handler: async () => {},
  })
}
