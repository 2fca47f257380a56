#!/usr/bin/env bash
# `make deploy-test`: run docker-compose.yml for real on this machine and use it as a user would.
#
# 1. Installs what is missing (Debian's docker.io, debootstrap, docker-compose), starts
#    `dockerd` if no engine answers (overlay2, else vfs; stopped again at the end, and only
#    that one), builds the base image (deploy/base-image.sh, kept between runs) and the image
#    with docker-compose's own build settings.
# 2. Brings the deployment up with deploy/docker-compose.loopback.yml on top (host network,
#    one loopback address per service: see that file) and waits until every service is
#    healthy and the token service has exited 0.
# 3. Copies the controller's address file and access token out of the state volume and runs
#    deploy/check_deployment.py from the host against the published ports.
# 4. Always (trap): prints every container's log if anything failed, runs
#    `docker-compose down --volumes`, checks that nothing of the project is left (containers,
#    networks, volumes), and stops the engine if it started it.
#
# Environment: PY (the venv's python, default .venv/bin/python), DEPLOY_TEST_PROJECT (the
# compose project name, default pl-deploy-test), PATHWAYS_LITE_BASE_IMAGE.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"
PROJECT="${DEPLOY_TEST_PROJECT:-pl-deploy-test}"
export PATHWAYS_LITE_BASE_IMAGE="${PATHWAYS_LITE_BASE_IMAGE:-pathways-lite-base:bookworm}"
CONTROLLER_ADDRESS=127.0.0.1:50051
DASHBOARD_URL=http://127.0.0.1:8080
WORK="$(mktemp -d /tmp/pl-deploy.XXXXXX)"
# The file the run uses: docker-compose.yml less its `ports:` (the controller's). A service on
# the host's network cannot publish ports (the engine refuses both at once) and Compose 1.29
# cannot drop a key in an override file; the override makes the controller listen on exactly
# the host addresses that docker-compose.yml publishes instead.
BASE_FILE="$WORK/docker-compose.yml"
COMPOSE=(docker-compose -p "$PROJECT" --project-directory . -f "$BASE_FILE"
    -f deploy/docker-compose.loopback.yml)
DOCKERD_PID=""
COMPOSE_USED=""
T0=$SECONDS

say() { echo "deploy-test [$((SECONDS - T0))s] $*"; }
fail() {
    say "FAILED: $*" >&2
    exit 1
}

install_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        apt-get update -qq >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log"; fail "apt-get update"; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >>"$WORK/apt.log" 2>&1 ||
            { tail -40 "$WORK/apt.log"; fail "apt-get install ${missing[*]}"; }
    fi
    command -v docker >/dev/null || fail "no docker client after installing docker.io"
    say "tools: $(docker-compose version --short 2>/dev/null || docker-compose version | head -1)" \
        "(docker-compose), $(dockerd --version)"
}

start_engine() {
    if docker info >/dev/null 2>&1; then
        say "using the running Docker engine ($(docker info -f '{{.Driver}}'))"
        return
    fi
    local driver
    for driver in overlay2 vfs; do
        say "starting dockerd (storage driver $driver)"
        # Its own session, so signals meant for make do not reach it; no bridge and no
        # iptables rules: every container here uses the host's network.
        setsid dockerd --storage-driver="$driver" --bridge=none --iptables=false \
            >"$WORK/dockerd-$driver.log" 2>&1 &
        DOCKERD_PID=$!
        for _ in $(seq 60); do
            docker info >/dev/null 2>&1 && return
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 1
        done
        tail -20 "$WORK/dockerd-$driver.log" >&2
        stop_engine
    done
    fail "the Docker engine does not start on this machine (dockerd logs above)"
}

stop_engine() {
    [[ -n "$DOCKERD_PID" ]] || return 0
    say "stopping the dockerd this run started (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 60); do
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    kill -KILL "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
    DOCKERD_PID=""
}

container_of() { "${COMPOSE[@]}" ps -q "$1"; }

wait_healthy() {
    local deadline=$((SECONDS + 420)) service id state health pending
    while :; do
        pending=()
        for service in ray-head island-a island-b controller; do
            id="$(container_of "$service")"
            [[ -n "$id" ]] || { pending+=("$service:absent"); continue; }
            state="$(docker inspect -f '{{.State.Status}}' "$id")"
            health="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")"
            [[ "$state" == running ]] || fail "$service is $state"
            [[ "$health" == healthy ]] || pending+=("$service:$health")
        done
        ((${#pending[@]} == 0)) && break
        ((SECONDS < deadline)) || fail "not healthy after 420 s: ${pending[*]}"
        sleep 5
    done
    id="$(container_of ray-token)"
    state="$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id")"
    [[ "$state" == "exited 0" ]] || fail "the ray-token service is '$state', not 'exited 0'"
}

cleanup() {
    local rc=$? left
    trap - EXIT INT TERM
    set +e
    if [[ -n "$COMPOSE_USED" ]]; then
        if ((rc != 0)); then
            echo "===== docker-compose ps -a ====="
            "${COMPOSE[@]}" ps -a
            echo "===== logs of every container ====="
            "${COMPOSE[@]}" logs --no-color --timestamps
            echo "===== end of the logs ====="
        fi
        say "docker-compose down --volumes"
        "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 30 >"$WORK/down.log" 2>&1 ||
            { cat "$WORK/down.log"; rc=1; }
        left="$(
            docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"
            docker network ls -q --filter "label=com.docker.compose.project=$PROJECT"
            docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT"
        )"
        if [[ -n "$left" ]]; then
            say "FAILED: docker-compose down left these behind: $left" >&2
            rc=1
        else
            say "down: no container, network or volume of $PROJECT is left"
        fi
    fi
    if ((rc != 0)) && [[ -n "$DOCKERD_PID" ]]; then
        echo "===== the end of dockerd's log ====="
        tail -30 "$WORK"/dockerd-*.log
    fi
    stop_engine
    rm -rf "$WORK"
    if ((rc == 0)); then say "passed"; else say "FAILED (exit $rc)" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ "$(id -u)" == 0 ]] || fail "needs root (apt-get, dockerd)"
[[ -x "$PY" ]] || fail "no $PY: run make install first"
install_tools
# The files as users run them, CPU and GPU variants, checked by this compose client.
docker-compose -f docker-compose.yml config -q || fail "docker-compose.yml does not validate"
docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q ||
    fail "docker-compose.yml + docker-compose.gpu.yml do not validate"
say "docker-compose.yml and its GPU variant validate"
start_engine

deploy/base-image.sh "$PATHWAYS_LITE_BASE_IMAGE"
"$PY" - docker-compose.yml >"$BASE_FILE" <<'PYTHON'
import sys, yaml
compose = yaml.safe_load(open(sys.argv[1]))
for name, service in compose["services"].items():
    if service.pop("ports", None):
        print(f"deploy-test: {name}: ports dropped (host network)", file=sys.stderr)
yaml.safe_dump(compose, sys.stdout, sort_keys=False)
PYTHON
COMPOSE_USED=1
# A project left over by a run that was killed: start from nothing.
"${COMPOSE[@]}" down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || true
say "docker-compose build"
"${COMPOSE[@]}" build >"$WORK/build.log" 2>&1 || { tail -60 "$WORK/build.log"; fail "build"; }
say "built $(docker image inspect -f '{{.RepoTags}} {{.Size}} bytes' pathways-lite:cpu)"
# The engine's image store is this run's cache (the base and the dependency layer survive a
# code change); on an engine it started itself, drop the images that rebuilds left untagged.
[[ -z "$DOCKERD_PID" ]] || docker image prune -f >/dev/null

say "docker-compose up -d"
timeout 600 "${COMPOSE[@]}" up -d --no-build || fail "docker-compose up"
wait_healthy
say "ray-head, island-a, island-b and controller are healthy; ray-token exited 0"
"${COMPOSE[@]}" ps

# As a user would: the address file and the token come out of the state volume.
client_state="$WORK/client"
mkdir -m 700 "$client_state"
"${COMPOSE[@]}" exec -T controller cat /state/token >"$client_state/token"
"${COMPOSE[@]}" exec -T controller cat /state/controller.json >"$client_state/controller.json"
chmod 600 "$client_state/token"

"$PY" deploy/check_deployment.py \
    --state-dir "$client_state" \
    --address "$CONTROLLER_ADDRESS" \
    --dashboard "$DASHBOARD_URL" \
    --island-container "$(container_of island-a)" \
    --controller-container "$(container_of controller)"
