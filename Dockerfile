# Build stage: a static binary (no cgo), module downloads cached in their own layer.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY *.go schema.sql ./
COPY migrations ./migrations
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/items .

# Run stage: distroless static, no shell, no libc, non-root (uid 65532).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/items /app
EXPOSE 5000
# Numeric (distroless's nonroot user), so that Kubernetes can verify
# runAsNonRoot: a user name it cannot check without the image's passwd.
USER 65532:65532
# The image has no shell or curl: the binary checks its own /health.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 CMD ["/app", "healthcheck"]
ENTRYPOINT ["/app"]
