#!/usr/bin/env bash
# A copy of the team's ../shared/tools/docker-sandbox.sh, used by tests/system/test_docker.py where the checkout has no ../shared.
# A real Docker engine on a machine that has none, for tests and CI on the team's machines.
#
#   eval "$(../shared/tools/docker-sandbox.sh)"      # start (or reuse) it; prints the exports to use it
#   ../shared/tools/docker-sandbox.sh --stop          # stop the engine it started
#
# What it does, and why:
# - dockerd, containerd, runc and iptables come from the Debian archive (`apt-get download`, unpacked under
#   $SANDBOX; nothing is installed system-wide). The engine runs as root with the overlay2 storage driver (vfs
#   where overlay2 cannot mount; SANDBOX_STORAGE=vfs forces it), its own data root and socket, and full networking
#   (bridge, embedded DNS, published ports), so `docker build`, `docker run` and `docker compose up` behave as on
#   a workstation.
# - No image registry is reachable from these machines, so base images cannot be pulled. The script builds
#   stand-ins from the Debian archive (debootstrap) and tags them with the names the project's files use:
#     python:3.11-slim-bookworm (also python:3.11-slim)  Debian bookworm + Python 3.11 in a venv on PATH (python, pip);
#                                                        pip finds this machine's local wheels (the CPU torch build)
#                                                        as it does here: PyPI's torch is the multi-GB CUDA build
#     nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04       Debian bookworm (apt can install python3): no CUDA inside,
#                                                        so a GPU image built on it must detect that it has no GPU
#     prom/prometheus:v2.53.2                            Debian's prometheus (2.42) with the official image's
#                                                        entrypoint, config path and data folder (/prometheus)
#   Set SANDBOX_TAGS to tag other names too (space-separated, each a copy of the Python stand-in).
#   Grafana has no package here: a compose test must name the services it starts (`up -d fpet prometheus`).
# - Package downloads inside builds (pip) must trust what this machine trusts: the stand-ins carry this machine's
#   CA bundle at /etc/ssl/sandbox-ca.crt, with PIP_CERT and SSL_CERT_FILE pointing at it.
# - Traffic rule: tests send requests only to loopback (published ports) and to the containers this engine started
#   (their own network namespaces on this machine, on the engine's bridge); never to any other address. Load
#   loops are bounded in count and time.
# - Builds use the classic builder (DOCKER_BUILDKIT=0: BuildKit would try to pull its frontend) and `--network
#   host` is not needed: the bridge has outbound access through the host.
#
# Costs on a 2-core machine: about 1-2 minutes the first time (downloads, debootstrap, stand-ins), seconds when
# reused. Measured with overlay2: the project's CPU image (pip installs included) builds in about 12 s; with vfs,
# which copies every layer, about 4 minutes. `--stop` leaves the data for reuse, `--purge` deletes it.
set -euo pipefail

SANDBOX=${SANDBOX:-/tmp/docker-sandbox}
ROOT=$SANDBOX/root
SOCK=$SANDBOX/docker.sock
export PATH=$ROOT/usr/bin:$ROOT/usr/sbin:$PATH
export LD_LIBRARY_PATH=$ROOT/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export XTABLES_LIBDIR=$ROOT/usr/lib/x86_64-linux-gnu/xtables
export DOCKER_HOST=unix://$SOCK DOCKER_BUILDKIT=0
log() { echo "docker-sandbox: $*" >&2; }

exports() {
  echo "export DOCKER_HOST=unix://$SOCK DOCKER_BUILDKIT=0"
  echo "export PATH=$ROOT/usr/bin:\$PATH"
}

stop() {
  local pid
  pid=$(cat "$SANDBOX/dockerd.pid" 2>/dev/null) || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    log "stopped"
  fi
  rm -f "$SANDBOX/dockerd.pid"
}

case "${1:-}" in
  --stop) stop; exit 0 ;;
  --purge) stop; rm -rf "$SANDBOX"; exit 0 ;;
esac

[ "$(id -u)" = 0 ] || { log "needs root (dockerd)"; exit 1; }

# 1. Binaries from the Debian archive.
if [ ! -x "$ROOT/usr/sbin/dockerd" ]; then
  log "downloading docker.io, containerd, runc, iptables, debootstrap from the Debian archive"
  mkdir -p "$SANDBOX/debs" && cd "$SANDBOX/debs"
  apt-get download -qq docker.io containerd runc tini iptables libip4tc2 libip6tc2 libxtables12 \
    libnetfilter-conntrack3 libnfnetlink0 libnftnl11 libmnl0 debootstrap >&2
  for f in *.deb; do dpkg -x "$f" "$ROOT"; done
  ln -sf iptables-legacy "$ROOT/usr/sbin/iptables"
  ln -sf ip6tables-legacy "$ROOT/usr/sbin/ip6tables"
  cd - >/dev/null
fi

# 2. The engine: overlay2 (fast), or vfs where overlay2 cannot mount.
start_engine() {
  mkdir -p "$SANDBOX/data" "$SANDBOX/exec"
  nohup dockerd --data-root "$SANDBOX/data" --exec-root "$SANDBOX/exec" --pidfile "$SANDBOX/dockerd.pid" \
    --storage-driver "$1" --host "unix://$SOCK" >"$SANDBOX/dockerd.log" 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  return 1
}
if ! docker info >/dev/null 2>&1; then
  driver=${SANDBOX_STORAGE:-overlay2}
  log "starting dockerd ($driver, data in $SANDBOX/data)"
  start_engine "$driver" || true
  if ! docker info >/dev/null 2>&1 && [ "$driver" != vfs ]; then
    stop; log "overlay2 failed; starting dockerd with vfs (slower builds)"; start_engine vfs || true
  fi
  docker info >/dev/null 2>&1 || { log "dockerd did not start; see $SANDBOX/dockerd.log"; tail -3 "$SANDBOX/dockerd.log" >&2; exit 1; }
fi

# 3. Stand-in base images.
have() { docker image inspect "$1" >/dev/null 2>&1; }
debian_mirror() {  # the Debian archive this machine's apt uses
  grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | grep -v security | head -1 | tr -d ' '
}
if ! have local/bookworm:base; then
  log "building a Debian bookworm root with debootstrap"
  rm -rf "$SANDBOX/rootfs"
  DEBOOTSTRAP_DIR=$ROOT/usr/share/debootstrap "$ROOT/usr/sbin/debootstrap" --variant=minbase bookworm \
    "$SANDBOX/rootfs" "$(debian_mirror)" >"$SANDBOX/debootstrap.log" 2>&1 \
    || { log "debootstrap failed; see $SANDBOX/debootstrap.log"; exit 1; }
  mkdir -p "$SANDBOX/rootfs/etc/ssl" && cp /etc/ssl/certs/ca-certificates.crt "$SANDBOX/rootfs/etc/ssl/sandbox-ca.crt"
  tar -C "$SANDBOX/rootfs" -c . | docker import \
    -c 'ENV PIP_CERT=/etc/ssl/sandbox-ca.crt SSL_CERT_FILE=/etc/ssl/sandbox-ca.crt REQUESTS_CA_BUNDLE=/etc/ssl/sandbox-ca.crt' \
    - local/bookworm:base >/dev/null
  rm -rf "$SANDBOX/rootfs"
fi
build() {  # build TAG with the Dockerfile read from stdin
  local dir; dir=$(mktemp -d)
  cat >"$dir/Dockerfile"
  docker build -q -t "$1" "$dir" >/dev/null || { log "building the stand-in $1 failed"; exit 1; }
  rm -rf "$dir"
}
if ! have python:3.11-slim-bookworm; then
  log "building the stand-in python:3.11-slim-bookworm"
  # pip on this machine finds local wheels (its find-links setting: the CPU build of torch); the stand-in carries
  # them the same way, so `pip install torch==2.13.0` inside a build gets the CPU wheel, not PyPI's CUDA build.
  ctx=$(mktemp -d); mkdir -p "$ctx/wheels"
  for d in ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null); do
    [ -d "$d" ] && cp "$d"/*.whl "$ctx/wheels/" 2>/dev/null || true
  done
  cat >"$ctx/Dockerfile" <<'EOF'
FROM local/bookworm:base
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/python && /opt/python/bin/pip install -q --upgrade pip
COPY wheels /opt/sandbox-wheels
ENV PATH=/opt/python/bin:$PATH PIP_FIND_LINKS=/opt/sandbox-wheels
CMD ["python3"]
EOF
  docker build -q -t python:3.11-slim-bookworm "$ctx" >/dev/null || { log "building the stand-in python failed"; exit 1; }
  rm -rf "$ctx"
fi
docker tag python:3.11-slim-bookworm python:3.11-slim
for t in ${SANDBOX_TAGS:-}; do docker tag python:3.11-slim-bookworm "$t"; done
have nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 || docker tag local/bookworm:base nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
if ! have prom/prometheus:v2.53.2; then
  log "building the stand-in prom/prometheus:v2.53.2 from Debian's prometheus"
  build prom/prometheus:v2.53.2 <<'EOF'
FROM local/bookworm:base
RUN apt-get update && apt-get install -y --no-install-recommends prometheus && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus /etc/prometheus /var/lib/prometheus && chown -R nobody:nogroup /prometheus \
    && rm -rf /var/lib/prometheus/metrics2 && ln -s /prometheus /var/lib/prometheus/metrics2
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
fi

log "ready: $(docker version --format '{{.Server.Version}}' 2>/dev/null) at $SOCK"
exports
