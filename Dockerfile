# syntax=docker/dockerfile:1
# Images of Tether's servers and agent, built with the same command as
# `make build`. Targets: relay (default), controlplane, agent.
#   docker build -t tether-relay .
#   docker build --target agent -t tether-agent .

FROM golang:1.26-bookworm AS build
WORKDIR /src
ENV CGO_ENABLED=0 GOTOOLCHAIN=local
# The patched smux is a local module (see frames/wsmux/third_party/smux/PATCH.md).
COPY go.mod go.sum ./
COPY frames/wsmux/third_party/smux/ frames/wsmux/third_party/smux/
RUN go mod download
COPY . .
ARG VERSION=dev
RUN go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/ \
      ./relay/cmd/tether-relay ./controlplane/cmd/tether-controlplane ./controlplane/cmd/tetherctl \
 && go build -trimpath -tags nethttpomithttp2 -ldflags "-s -w -X main.version=${VERSION}" -o /out/ \
      ./agent/cmd/tether-agent \
 && mkdir -p /out/state

FROM gcr.io/distroless/static-debian12:nonroot AS agent
COPY --from=build /out/tether-agent /usr/local/bin/tether-agent
COPY --from=build --chown=65532:65532 /out/state /var/lib/tether-agent
ENV TETHER_STATE_DIR=/var/lib/tether-agent
VOLUME /var/lib/tether-agent
ENTRYPOINT ["/usr/local/bin/tether-agent"]

FROM gcr.io/distroless/static-debian12:nonroot AS controlplane
COPY --from=build /out/tether-controlplane /out/tetherctl /usr/local/bin/
COPY --from=build --chown=65532:65532 /out/state /var/lib/tether
# Inside the container (docker exec), tetherctl finds the admin API on
# 127.0.0.1:7070 and the token in $TETHER_DATA_DIR/admin-token.
# Ops (/metrics, /healthz, /readyz) on loopback: unauthenticated. Expose it
# deliberately, e.g. -e TETHER_OPS_ADDR=0.0.0.0:7072 with the port published
# to the monitoring network only (README: Operations).
ENV TETHER_DATA_DIR=/var/lib/tether TETHER_OPS_ADDR=127.0.0.1:7072
VOLUME /var/lib/tether
ENTRYPOINT ["/usr/local/bin/tether-controlplane"]

FROM gcr.io/distroless/static-debian12:nonroot AS relay
COPY --from=build /out/tether-relay /out/tetherctl /usr/local/bin/
COPY --from=build --chown=65532:65532 /out/state /var/lib/tether
# Ops (/metrics, /healthz, /readyz) on loopback: unauthenticated. Expose it
# deliberately, e.g. -e TETHER_OPS_ADDR=0.0.0.0:7071 with the port published
# to the monitoring network only (README: Operations).
ENV TETHER_DATA_DIR=/var/lib/tether TETHER_OPS_ADDR=127.0.0.1:7071
VOLUME /var/lib/tether
# 8080 public HTTP, 8443 public HTTPS and agents; TCP leases use
# TETHER_TCP_PORTS (publish that range too).
EXPOSE 8080 8443
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tether-relay"]
