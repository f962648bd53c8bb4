# TerraPeak's container image. Build it with scripts/image, which builds the release binary on
# the host (same Debian release as this base) and then this image from it:
#
#   scripts/image                     # -> localhost/terrapeak:latest (podman or buildah)
#
# The build context holds only the binary (as ./terrapeak), so no source or target/ is copied.
FROM debian:bookworm-slim

# git and CA certificates: module sources that are git repositories are fetched with git.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupadd --system --gid 10001 terrapeak \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --shell /usr/sbin/nologin terrapeak \
 && mkdir -p /data \
 && chown 10001:10001 /data

COPY --chmod=0755 terrapeak /usr/local/bin/terrapeak

USER 10001:10001
ENV TERRAPEAK_SERVER__ADDR=0.0.0.0:8081 \
    TERRAPEAK_STORAGE__FILE__PATH=/data \
    HOME=/data
VOLUME /data
EXPOSE 8081
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/terrapeak", "healthcheck"]
# As PID 1 TerraPeak gets SIGTERM itself: it stops accepting, lets transfers finish (30 s at
# most) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/terrapeak"]
CMD ["serve"]
