#!/usr/bin/env bash
# One relay beside a mesh of relays, in one run.
#
# For each load shape, REPS times, it runs relay-bench against one fresh
# relay (`--spawn`) and then against a fresh mesh (`--spawn --relays
# $RELAYS --topology $TOPOLOGY`: senders on the first relay, receivers on
# the last), alternating, with the same shape flags, and prints per shape
# the one-relay median, the mesh median and the median of the pairwise
# ratios (mesh / one relay; the target for a 3-relay line is >= 0.60), and
# the relays' CPU per delivered message (summed over every relay of the
# run). No taskset: every relay and relay-bench share the machine's cores
# as the kernel schedules them. Every run's JSON report goes, one line
# each, into OUT with the command that made them.
#
# Needs a release build (cargo build --release -p relay -p relay-bench;
# built here if missing).
#
# Usage, from anywhere:  bench/mesh.sh
# Environment (defaults):
#   REPS=3 COUNT=1000000 DUR=10 RELAYS=3 TOPOLOGY=line
#   SHAPES="tp128 tp1k"  (tp128: 1->1 128 B, tp1k: 1->1 1 KiB)
#   FLAGS=""   more relay-bench flags for every run
#   OUT=docs/bench-results/mesh-<UTC time>.txt   NOTE="" (a line for OUT's header)
#   BENCH=target/release/relay-bench   WATCHDOG=900 (seconds for the whole script)
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPS=${REPS:-3}; COUNT=${COUNT:-1000000}; DUR=${DUR:-10}
RELAYS=${RELAYS:-3}; TOPOLOGY=${TOPOLOGY:-line}
SHAPES=${SHAPES:-"tp128 tp1k"}; FLAGS=${FLAGS:-}; NOTE=${NOTE:-}
BENCH=${BENCH:-${CARGO_TARGET_DIR:-$ROOT/target}/release/relay-bench}
WATCHDOG=${WATCHDOG:-900}
STAMP=$(date -u +%Y%m%dT%H%MZ)
OUT=${OUT:-$ROOT/docs/bench-results/mesh-$STAMP.txt}
read -r -a flags <<< "$FLAGS"
for s in $SHAPES; do
  case $s in tp128|tp1k) ;; *) echo "mesh.sh: unknown shape $s (SHAPES: tp128 tp1k)" >&2; exit 2 ;; esac
done

if [ ! -x "$BENCH" ]; then
  echo "mesh.sh: building relay-bench and relay (cargo build --release; minutes on 2 cores)" >&2
  (cd "$ROOT" && timeout 1200 cargo build --release --locked -p relay-bench -p relay) \
    || { echo "mesh.sh: the release build failed" >&2; exit 1; }
fi
[ -x "$BENCH" ] || { echo "mesh.sh: no relay-bench at $BENCH" >&2; exit 1; }

LOGDIR=$(mktemp -d -t mesh.XXXXXX)
mkdir -p "$(dirname "$OUT")"
: > "$OUT" || exit 1
WATCHDOG_PID=""
trap 'rc=$?; [ -n "$WATCHDOG_PID" ] && kill "$WATCHDOG_PID" 2>/dev/null; [ "$rc" = 0 ] && rm -rf "$LOGDIR"' EXIT
trap 'echo "mesh.sh: interrupted or out of time (WATCHDOG=$WATCHDOG s); raw lines so far: $OUT" >&2; exit 124' INT TERM
MAIN_PID=$$
# The watchdog ends the script; each relay-bench run is bounded by timeout
# too, and stops the relays it spawned when it is stopped.
( trap 'kill "$SP" 2>/dev/null; exit 0' TERM; sleep "$WATCHDOG" & SP=$!; wait "$SP" && kill -TERM "$MAIN_PID" ) 2>/dev/null &
WATCHDOG_PID=$!

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || commit="$commit+uncommitted changes"
{
  echo "# bench/mesh.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $commit"
  echo "# command: REPS=$REPS COUNT=$COUNT DUR=$DUR RELAYS=$RELAYS TOPOLOGY=$TOPOLOGY SHAPES=\"$SHAPES\" FLAGS=\"$FLAGS\" bench/mesh.sh"
  echo "# machine: $(nproc) cores, $(uname -sr), load average at start $(cut -d' ' -f1-3 /proc/loadavg); $("$BENCH" --version); no taskset (relays and bench share the cores)"
  [ -n "$NOTE" ] && echo "# note: $NOTE"
  echo "# raw lines: ONE|MESH <shape>#<rep> <relay-bench --json report>; after each shape its summary (relay_cpu_pct: summed over the run's relays)"
} | tee -a "$OUT"

# A number from relay-bench's pretty JSON (`  "key": value,`); empty if absent.
jfield() { sed -n "s/^  \"$2\": \([^,]*\),\{0,1\}\$/\1/p" "$1" | head -1; }

# One run: side (ONE|MESH), label, then relay-bench's arguments. Appends the
# raw line to OUT and prints the JSON file's path (empty if the run failed).
run() {
  local side=$1 label=$2 json log rc
  shift 2
  json=$LOGDIR/$side-${label//[^A-Za-z0-9#]/_}.json; log=${json%.json}.log
  timeout $(( ${DUR%.*} + 90 )) "$BENCH" "$@" --json "$json" > "$log" 2>&1; rc=$?
  if [ "$rc" = 0 ] && [ -s "$json" ]; then
    echo "$side $label $(tr -d '\n' < "$json" | tr -s ' ')" >> "$OUT"
    echo "$json"
  else
    echo "$side $label FAILED (exit $rc): $(tail -n 3 "$log" | tr '\n' ' ')" | tee -a "$OUT" >&2
  fi
}

# Reads "one mesh" pairs; prints medians and the median of the pairwise
# ratios mesh/one. Arguments: label, unit.
summarise() {
  awk -v label="$1" -v unit="$2" '
    function median(a, n,   i, j, t) {
      for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    NF == 2 && $1 != "null" && $2 != "null" {
      n++; oa[n] = $1; ma[n] = $2
      if ($1 > 0) { k++; q[k] = $2 / $1 }
    }
    END {
      if (n == 0) { printf "%-30s no complete pair\n", label; exit }
      ratio = k ? sprintf("%5.2f", median(q, k)) : "  n/a"
      printf "%-30s one relay %12.1f %-5s mesh %12.1f %-5s mesh/one %s  (pairs=%d)\n",
        label, median(oa, n), unit, median(ma, n), unit, ratio, n
    }'
}

# A key's values over some runs' JSON files, as [a b c]: list KEY FILE...
list() {
  local key=$1 f v out=""
  shift
  for f in "$@"; do v=$(jfield "$f" "$key"); out+="${v:-?} "; done
  echo "[${out% }]"
}

tp() { # label size
  local label=$1 m=$2 r oj mj pairs="" cpairs="" ojs=() mjs=() k
  for r in $(seq "$REPS"); do
    oj=$(run ONE "$label#$r" throughput --spawn --size "$m" --count "$COUNT" --duration "$DUR" \
         --payload random "${flags[@]}")
    mj=$(run MESH "$label#$r" throughput --spawn --relays "$RELAYS" --topology "$TOPOLOGY" \
         --size "$m" --count "$COUNT" --duration "$DUR" --payload random "${flags[@]}")
    [ -n "$oj" ] && ojs+=("$oj"); [ -n "$mj" ] && mjs+=("$mj")
    [ -n "$oj" ] && [ -n "$mj" ] || continue
    pairs+="$(jfield "$oj" msgs_per_s) $(jfield "$mj" msgs_per_s)"$'\n'
    # the relays' CPU per delivered message, ns (summed over the run's relays)
    cpairs+="$(awk -v c="$(jfield "$oj" relay_cpu_pct)" -v r="$(jfield "$oj" msgs_per_s)" \
               -v c2="$(jfield "$mj" relay_cpu_pct)" -v r2="$(jfield "$mj" msgs_per_s)" \
               'BEGIN { if (c + 0 > 0 && r + 0 > 0 && c2 + 0 > 0 && r2 + 0 > 0) printf "%.1f %.1f", c / 100 / r * 1e9, c2 / 100 / r2 * 1e9 }')"$'\n'
  done
  {
    printf '%s' "$pairs" | summarise "$label msg/s" "msg/s"
    printf '%s' "$cpairs" | summarise "$label relay cpu/msg" "ns"
    for k in lost duplicates relay_cpu_pct bench_cpu_pct; do
      echo "$label $k: one $(list "$k" "${ojs[@]}") mesh $(list "$k" "${mjs[@]}")"
    done
  } | tee -a "$OUT"
}

for shape in $SHAPES; do
  case $shape in
    tp128) tp "1->1 128B" 128 ;;
    tp1k)  tp "1->1 1KiB" 1024 ;;
  esac
done
echo "raw lines: $OUT"
