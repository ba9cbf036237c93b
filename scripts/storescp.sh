#!/usr/bin/env bash
# Start DCMTK's storescp for dumpwatch, reading port, AE title and dump folder from the
# dumpwatch configuration: the argument, else $DUMPWATCH_CONFIG, else ./dumpwatch.cfg.
# storescp is exec'ed, so that signals from the supervisor reach it.
#
#   scripts/storescp.sh [CONFIG]
set -euo pipefail

config="${1:-${DUMPWATCH_CONFIG:-./dumpwatch.cfg}}"
here="$(cd "$(dirname "$0")" && pwd)"
dumpwatch="${DUMPWATCH:-}"
if [ -z "$dumpwatch" ]; then
    if [ -x "$here/../.venv/bin/dumpwatch" ]; then dumpwatch="$here/../.venv/bin/dumpwatch"; else dumpwatch=dumpwatch; fi
fi

values="$("$dumpwatch" --config "$config" config-value port aetitle dir_dump)"
{ read -r port; read -r aetitle; read -r dump; } <<< "$values"
mkdir -p -- "$dump"

# Nagle's algorithm costs DCMTK 50x over loopback (18 files/s against 966 measured).
export TCP_NODELAY=1
# --fork: several scanners at once.  -pm +xa: accept private and spectroscopy SOP classes and
# every transfer syntax.  +uf: a re-sent instance gets its own file instead of overwriting
# one.  +B: write as received, to disk as it arrives.  Never -xcr/-xcs: they pass network
# values to a shell.
exec storescp --fork --promiscuous --accept-all --unique-filenames --filename-extension .dcm \
    --bit-preserving --aetitle "$aetitle" --output-directory "$dump" "$port"
