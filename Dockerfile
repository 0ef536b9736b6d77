# The weft image, built from the release tarball (`cargo xtask dist` prints these commands):
#
#   tar xzf target/dist/weft-0.1.0-x86_64-linux.tar.gz -C /tmp
#   docker build -t ghcr.io/weft/weft:0.1.0 /tmp/weft-0.1.0
#
# The build context is the unpacked tarball. The base is the Debian release the binaries are
# built on, so their glibc is there.
FROM debian:bookworm-slim

# iproute2: `ip` for operators inside the container (the agent speaks netlink itself);
# nftables: the masquerade rule; bpftool: inspecting the pinned maps
# (`kubectl exec ds/weft -- bpftool ...`); bird2: the bgp backend's BGP speaker, which the agent
# runs as its child (`bird`, `birdc`).
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 nftables bpftool bird2 \
 && rm -rf /var/lib/apt/lists/*

# weft-cni stays beside weft-agent: `weft-agent --install-cni` copies it onto the host.
COPY bin/weft-agent bin/weft-cni bin/weft /usr/local/bin/

LABEL org.opencontainers.image.title="weft" \
      org.opencontainers.image.description="Kubernetes CNI with an eBPF datapath" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["/usr/local/bin/weft-agent"]
