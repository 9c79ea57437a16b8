#!/usr/bin/env bash
# The relay side by side with NATS, from this repository alone.
#
# For each load shape, REPS times, it runs relay-bench against a fresh
# nats-server (`--spawn --broker nats`: async-nats clients) and then against
# a fresh relay (`--spawn`: client Cells), alternating, with the same shape
# flags, and prints per shape the NATS median, the relay median and the
# median of the pairwise ratios (oriented so that > 1 means the relay is
# better). Every run's JSON report goes, one line each, into OUT with the
# command that made them, so a table can be checked against its raw lines.
#
# Needs: nats-server on PATH (Debian: apt-get install nats-server) and a
# release build (cargo build --release; built here if missing).
#
# Usage, from anywhere:  bench/compare.sh
# Environment (defaults):
#   REPS=3 COUNT=2000000 DUR=10 LAT_RATE=50000 LAT_DUR=10
#   SHAPES="tp128 tp1k tp4x4 lat"  (tp128: 1->1 128 B, tp1k: 1->1 1 KiB,
#                                   tp4x4: 4->4 128 B, lat: latency at LAT_RATE)
#   RELAY_FLAGS=""  more relay-bench flags for the relay runs (e.g. "--client raw")
#   NATS_FLAGS=""   more relay-bench flags for the NATS runs (e.g. "--nats-sub-capacity 65536")
#   OUT=docs/bench-results/compare-<UTC time>.txt
#   NOTE=""         a line for OUT's header (e.g. "quiet machine" or "noisy: builds running")
#   BENCH=target/release/relay-bench   WATCHDOG=900 (seconds for the whole script)
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPS=${REPS:-3}; COUNT=${COUNT:-2000000}; DUR=${DUR:-10}
LAT_RATE=${LAT_RATE:-50000}; LAT_DUR=${LAT_DUR:-10}
SHAPES=${SHAPES:-"tp128 tp1k tp4x4 lat"}
RELAY_FLAGS=${RELAY_FLAGS:-}; NATS_FLAGS=${NATS_FLAGS:-}; NOTE=${NOTE:-}
BENCH=${BENCH:-$ROOT/target/release/relay-bench}
WATCHDOG=${WATCHDOG:-900}
STAMP=$(date -u +%Y%m%dT%H%MZ)
OUT=${OUT:-$ROOT/docs/bench-results/compare-$STAMP.txt}
read -r -a relay_flags <<< "$RELAY_FLAGS"
read -r -a nats_flags <<< "$NATS_FLAGS"
for s in $SHAPES; do
  case $s in tp128|tp1k|tp4x4|lat) ;; *) echo "compare.sh: unknown shape $s (SHAPES: tp128 tp1k tp4x4 lat)" >&2; exit 2 ;; esac
done

command -v nats-server >/dev/null || {
  echo "compare.sh: nats-server is not on PATH: install it (Debian: apt-get install nats-server)" >&2
  exit 1
}
if [ ! -x "$BENCH" ]; then
  echo "compare.sh: building relay-bench and relay (cargo build --release; minutes on 2 cores)" >&2
  (cd "$ROOT" && timeout 1200 cargo build --release --locked -p relay-bench -p relay) \
    || { echo "compare.sh: the release build failed" >&2; exit 1; }
fi
[ -x "$BENCH" ] || { echo "compare.sh: no relay-bench at $BENCH" >&2; exit 1; }

LOGDIR=$(mktemp -d -t compare.XXXXXX)
mkdir -p "$(dirname "$OUT")"
: > "$OUT" || exit 1
WATCHDOG_PID=""
trap 'rc=$?; [ -n "$WATCHDOG_PID" ] && kill "$WATCHDOG_PID" 2>/dev/null; [ "$rc" = 0 ] && rm -rf "$LOGDIR"' EXIT
trap 'echo "compare.sh: interrupted or out of time (WATCHDOG=$WATCHDOG s); raw lines so far: $OUT" >&2; exit 124' INT TERM
MAIN_PID=$$
# The watchdog ends the script (each relay-bench run is bounded by timeout
# too, and stops the server it spawned when it is stopped).
( trap 'kill "$SP" 2>/dev/null; exit 0' TERM; sleep "$WATCHDOG" & SP=$!; wait "$SP" && kill -TERM "$MAIN_PID" ) 2>/dev/null &
WATCHDOG_PID=$!

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || commit="$commit+uncommitted changes"
{
  echo "# bench/compare.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $commit"
  echo "# command: REPS=$REPS COUNT=$COUNT DUR=$DUR LAT_RATE=$LAT_RATE LAT_DUR=$LAT_DUR SHAPES=\"$SHAPES\" RELAY_FLAGS=\"$RELAY_FLAGS\" NATS_FLAGS=\"$NATS_FLAGS\" bench/compare.sh"
  echo "# machine: $(nproc) cores, $(uname -sr), load average at start $(cut -d' ' -f1-3 /proc/loadavg); $(nats-server --version); $("$BENCH" --version)"
  [ -n "$NOTE" ] && echo "# note: $NOTE"
  echo "# raw lines: NATS|RELAY <shape>#<rep> <relay-bench --json report>; after each shape its summary (relay_cpu_pct is the server's CPU: nats-server's on NATS lines)"
} | tee -a "$OUT"

# A number from relay-bench's pretty JSON (`  "key": value,`); empty if absent.
jfield() { sed -n "s/^  \"$2\": \([^,]*\),\{0,1\}\$/\1/p" "$1" | head -1; }

# One run: side (NATS|RELAY), label, then relay-bench's arguments. Appends the
# raw line to OUT and prints the JSON file's path (empty if the run failed).
run() {
  local side=$1 label=$2 json log limit rc
  shift 2
  json=$LOGDIR/$side-${label//[^A-Za-z0-9#]/_}.json; log=${json%.json}.log
  limit=$(( ${DUR%.*} + 80 )); [ "$1" = latency ] && limit=$(( ${LAT_DUR%.*} + 60 ))
  timeout "$limit" "$BENCH" "$@" --json "$json" > "$log" 2>&1; rc=$?
  if [ "$rc" = 0 ] && [ -s "$json" ]; then
    echo "$side $label $(tr -d '\n' < "$json" | tr -s ' ')" >> "$OUT"
    echo "$json"
  else
    echo "$side $label FAILED (exit $rc): $(tail -n 3 "$log" | tr '\n' ' ')" | tee -a "$OUT" >&2
  fi
}

# Reads "nats relay" pairs; prints medians and the median of the pairwise
# ratios. Arguments: label, unit, higher|lower (which is better).
summarise() {
  awk -v label="$1" -v unit="$2" -v better="$3" '
    function median(a, n,   i, j, t) {
      for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    NF == 2 && $1 != "null" && $2 != "null" {
      n++; na[n] = $1; ra[n] = $2
      if ($1 > 0 && $2 > 0) { k++; q[k] = (better == "higher") ? $2 / $1 : $1 / $2 }
    }
    END {
      if (n == 0) { printf "%-28s no complete pair\n", label; exit }
      ratio = k ? sprintf("%5.2fx", median(q, k)) : "  n/a"
      printf "%-28s nats %12.1f %-5s relay %12.1f %-5s relay-vs-nats %s  (pairs=%d, >1 = relay better)\n",
        label, median(na, n), unit, median(ra, n), unit, ratio, n
    }'
}

# What the per-run lines call a report key.
name_of() {
  case $1 in
    relay_cpu_pct) echo "server cpu %" ;; bench_cpu_pct) echo "bench cpu %" ;;
    max_burst) echo "largest pacing burst" ;; *) echo "$1" ;;
  esac
}

# A key's values over some runs' JSON files, as [a b c]: list KEY FILE...
list() {
  local key=$1 f v out=""
  shift
  for f in "$@"; do v=$(jfield "$f" "$key"); out+="${v:-?} "; done
  echo "[${out% }]"
}

# each_run LABEL KEY...: a line per key with its values over the calling
# shape's NATS runs and relay runs (its arrays njs and rjs).
each_run() {
  local label=$1 k
  shift
  for k in "$@"; do
    echo "$label $(name_of "$k"): nats $(list "$k" "${njs[@]}") relay $(list "$k" "${rjs[@]}")"
  done
}

tp() { # label senders receivers size
  local label=$1 p=$2 s=$3 m=$4 r nj rj pairs="" cpairs="" njs=() rjs=()
  for r in $(seq "$REPS"); do
    nj=$(run NATS "$label#$r" throughput --spawn --broker nats --senders "$p" --receivers "$s" --size "$m" \
         --count "$COUNT" --duration "$DUR" --payload random "${nats_flags[@]}")
    rj=$(run RELAY "$label#$r" throughput --spawn --senders "$p" --receivers "$s" --size "$m" \
         --count "$COUNT" --duration "$DUR" --payload random "${relay_flags[@]}")
    [ -n "$nj" ] && njs+=("$nj"); [ -n "$rj" ] && rjs+=("$rj")
    [ -n "$nj" ] && [ -n "$rj" ] || continue
    pairs+="$(jfield "$nj" msgs_per_s) $(jfield "$rj" msgs_per_s)"$'\n'
    # the server's CPU per delivered message, ns (the bench's cost apart)
    cpairs+="$(awk -v c="$(jfield "$nj" relay_cpu_pct)" -v r="$(jfield "$nj" msgs_per_s)" \
               -v c2="$(jfield "$rj" relay_cpu_pct)" -v r2="$(jfield "$rj" msgs_per_s)" \
               'BEGIN { if (c + 0 > 0 && r + 0 > 0 && c2 + 0 > 0 && r2 + 0 > 0) printf "%.1f %.1f", c / 100 / r * 1e9, c2 / 100 / r2 * 1e9 }')"$'\n'
  done
  {
    printf '%s' "$pairs" | summarise "$label" "msg/s" higher
    printf '%s' "$cpairs" | summarise "$label server cpu/msg" "ns" lower
    each_run "$label" lost duplicates relay_cpu_pct bench_cpu_pct
  } | tee -a "$OUT"
}

lat() {
  local label="latency@${LAT_RATE}/s" r nj rj p50="" p99="" njs=() rjs=()
  for r in $(seq "$REPS"); do
    nj=$(run NATS "lat#$r" latency --spawn --broker nats --rate "$LAT_RATE" --size 128 --duration "$LAT_DUR" \
         --payload random "${nats_flags[@]}")
    rj=$(run RELAY "lat#$r" latency --spawn --rate "$LAT_RATE" --size 128 --duration "$LAT_DUR" \
         --payload random "${relay_flags[@]}")
    [ -n "$nj" ] && njs+=("$nj"); [ -n "$rj" ] && rjs+=("$rj")
    [ -n "$nj" ] && [ -n "$rj" ] || continue
    p50+="$(jfield "$nj" p50_us) $(jfield "$rj" p50_us)"$'\n'
    p99+="$(jfield "$nj" p99_us) $(jfield "$rj" p99_us)"$'\n'
  done
  {
    printf '%s' "$p50" | summarise "$label p50" "us" lower
    printf '%s' "$p99" | summarise "$label p99" "us" lower
    each_run "$label" lost max_burst relay_cpu_pct bench_cpu_pct
  } | tee -a "$OUT"
}

for shape in $SHAPES; do
  case $shape in
    tp128) tp "1->1 128B" 1 1 128 ;;
    tp1k)  tp "1->1 1KiB" 1 1 1024 ;;
    tp4x4) tp "4->4 128B" 4 4 128 ;;
    lat)   lat ;;
  esac
done
echo "raw lines: $OUT"
