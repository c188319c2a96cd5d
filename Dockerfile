# edgemq in a container (docs/operations.md, "Docker"). TypeScript runs
# through tsx, a runtime dependency, so `npm ci --omit=dev` is the whole
# build. No Docker engine runs in CI: test/docs/operations.int.test.ts stages
# this file's COPYs and RUN npm ci in a temp dir and starts its ENTRYPOINT and
# CMD there, but the image build itself is not exercised.
FROM node:20-bookworm-slim

WORKDIR /opt/edgemq
COPY package.json package-lock.json ./
COPY patches ./patches
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force
COPY store ./store
COPY bridge ./bridge
COPY gateway ./gateway
COPY deploy/docker/edgemq.yaml /etc/edgemq/edgemq.yaml

RUN mkdir -p /var/lib/edgemq && chown node:node /var/lib/edgemq
USER node
VOLUME /var/lib/edgemq
EXPOSE 1883 9464

# SIGTERM is a graceful stop bounded by shutdownTimeoutMs (10 s by default):
# run with `docker run --stop-timeout 30` (compose: stop_grace_period: 30s).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s CMD ["node", "-e", "fetch('http://127.0.0.1:9464/health').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["node", "gateway/edgemq.mjs"]
CMD ["start", "--config", "/etc/edgemq/edgemq.yaml", "--data-dir", "/var/lib/edgemq"]
