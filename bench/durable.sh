#!/usr/bin/env bash
# Durable messages beside best effort through the same relay, with the
# disk's own limit from fio, in ONE run (issue 11, "Benchmarks").
#
# 1. fio on the filesystem of the relay's data directory (relay-bench
#    --spawn makes it under ${TMPDIR:-/tmp}): a naive log (64 KiB writes,
#    fdatasync after each) and a deep queue (io_uring, O_DIRECT, iodepth 8,
#    256 KiB, fdatasync every 8). Skipped with a message if fio is missing.
# 2. For each size in SIZES, REPS rounds alternating: best effort
#    (relay-bench throughput --spawn), then durable with the io_uring
#    backend, then durable with the portable backend. Per size it prints
#    the medians and the median of the per-round ratios durable/best effort.
#
# Every run's JSON report goes, one line each, into OUT, with fio's output.
#
# Usage, from anywhere:  bench/durable.sh
# Environment (defaults):
#   REPS=3 DUR=5 WINDOW=20000 SIZES="128 1024" FIO_SIZE=256m
#   BENCH=target/release/relay-bench (the relay binary beside it)
#   OUT=docs/bench-results/durable-<UTC time>.txt   NOTE=""
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPS=${REPS:-3}; DUR=${DUR:-5}; WINDOW=${WINDOW:-20000}; SIZES=${SIZES:-"128 1024"}
FIO_SIZE=${FIO_SIZE:-256m}; NOTE=${NOTE:-}
BENCH=${BENCH:-$ROOT/target/release/relay-bench}
STAMP=$(date -u +%Y%m%dT%H%MZ)
OUT=${OUT:-$ROOT/docs/bench-results/durable-$STAMP.txt}
[ -x "$BENCH" ] || { echo "durable.sh: no relay-bench at $BENCH (cargo build --release -p relay -p relay-bench)" >&2; exit 1; }

WORK=$(mktemp -d -t durable.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
printf '[storage]\nbackend = "io_uring"\n' > "$WORK/io_uring.toml"
printf '[storage]\nbackend = "portable"\n' > "$WORK/portable.toml"
mkdir -p "$(dirname "$OUT")"; : > "$OUT" || exit 1

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || commit="$commit+uncommitted changes"
{
  echo "# bench/durable.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $commit"
  echo "# command: REPS=$REPS DUR=$DUR WINDOW=$WINDOW SIZES=\"$SIZES\" FIO_SIZE=$FIO_SIZE bench/durable.sh"
  echo "# machine: $(nproc) cores, $(uname -sr), load average at start $(cut -d' ' -f1-3 /proc/loadavg); data dir filesystem: $(df -T "${TMPDIR:-/tmp}" | awk 'NR==2 {print $2" "$1}')"
  [ -n "$NOTE" ] && echo "# note: $NOTE"
} | tee -a "$OUT"

# fio: the disk's limit on the data directory's filesystem.
if command -v fio >/dev/null; then
  FDIR=$(mktemp -d "${TMPDIR:-/tmp}/durable-fio.XXXXXX")
  fio_run() { # label, fio flags...
    local label=$1; shift
    echo "## fio $label: fio $*" >> "$OUT"
    if timeout 300 fio --directory="$FDIR" --output-format=normal "$@" > "$WORK/fio.txt" 2>&1; then
      cat "$WORK/fio.txt" >> "$OUT"
      echo "fio $label: $(grep -m1 -E '^ +(WRITE|write):' "$WORK/fio.txt" | sed 's/^ *//')" | tee -a "$OUT"
    else
      echo "fio $label FAILED: $(tail -n 3 "$WORK/fio.txt" | tr '\n' ' ')" | tee -a "$OUT" >&2
    fi
    rm -f "$FDIR"/*
  }
  fio_run naive --name=naive --rw=write --bs=64k --size="$FIO_SIZE" --fdatasync=1
  fio_run deep --name=deep --rw=write --ioengine=io_uring --direct=1 --iodepth=8 --bs=256k \
    --size="$FIO_SIZE" --fdatasync=8
  rm -rf "$FDIR"
else
  echo "fio: not installed, skipped (Debian: apt-get install fio)" | tee -a "$OUT"
fi

jfield() { sed -n "s/^  \"$2\": \([^,]*\),\{0,1\}\$/\1/p" "$1" | head -1; }
run() { # label, relay-bench args...; prints the JSON path or nothing
  local label=$1 json="$WORK/$1.json" rc; shift
  timeout $(( DUR + 90 )) "$BENCH" "$@" --json "$json" > "$WORK/$label.log" 2>&1; rc=$?
  if [ "$rc" = 0 ] && [ -s "$json" ]; then
    echo "$label $(tr -d '\n' < "$json" | tr -s ' ')" >> "$OUT"; echo "$json"
  else
    echo "$label FAILED (exit $rc): $(tail -n 3 "$WORK/$label.log" | tr '\n' ' ')" | tee -a "$OUT" >&2
  fi
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {if (!NR) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

for size in $SIZES; do
  be="" du="" dp="" ru="" rp=""
  for r in $(seq "$REPS"); do
    common=(--spawn --duration "$DUR" --size "$size" --window "$WINDOW")
    b=$(run "best-effort-$size#$r" throughput "${common[@]}")
    u=$(run "durable-io_uring-$size#$r" durable "${common[@]}" --relay-config "$WORK/io_uring.toml")
    p=$(run "durable-portable-$size#$r" durable "${common[@]}" --relay-config "$WORK/portable.toml")
    bv=${b:+$(jfield "$b" msgs_per_s)}; uv=${u:+$(jfield "$u" msgs_per_s)}; pv=${p:+$(jfield "$p" msgs_per_s)}
    be+="$bv "; du+="$uv "; dp+="$pv "
    [ -n "$bv" ] && [ -n "$uv" ] && ru+="$(awk -v a="$uv" -v b="$bv" 'BEGIN {printf "%.3f", a/b}') "
    [ -n "$bv" ] && [ -n "$pv" ] && rp+="$(awk -v a="$pv" -v b="$bv" 'BEGIN {printf "%.3f", a/b}') "
  done
  {
    echo "size $size B: best effort msg/s [$be] median $(echo "$be" | median)"
    echo "size $size B: durable io_uring msg/s [$du] median $(echo "$du" | median); ratio to best effort [$ru] median $(echo "$ru" | median)"
    echo "size $size B: durable portable msg/s [$dp] median $(echo "$dp" | median); ratio to best effort [$rp] median $(echo "$rp" | median)"
  } | tee -a "$OUT"
done
echo "raw lines: $OUT"
