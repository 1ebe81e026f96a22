#!/usr/bin/env bash
# Makes a run with the CLI on a local folder (under the demo's folder, shardrop-demo/, by
# default), then runs an aggregator, two torch miners and the torch validator against it.
#   tools/python/examples/run-local.sh [DIR] [ROUNDS]
# Needs: `cargo build --release`, and torch + safetensors + `pip install ./tools/python`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
dir="$(realpath -m "${1:-$root/shardrop-demo/torch}")"
rounds="${2:-5}"
sd="${SHARDROP:-$root/target/release/shardrop}"
py="${PYTHON:-python3}"
mkdir -p "$dir"
rm -rf "$dir"/{stores,*.key,model.safetensors,state-*}
for k in op agg m1 m2 val; do "$sd" keygen --out "$dir/$k.key" --json > "$dir/$k.json"; done
peer() { "$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["peer_id"])' "$dir/$1.json"; }
"$py" "$here/torch_miner.py" --write-init "$dir/model.safetensors"
reg="$("$sd" run init --run torch --key "$dir/op.key" --store "file://$dir/stores/op" \
    --model "$dir/model.safetensors" --window-secs 10 --grace-secs 2 \
    --outer-optimizer nesterov --outer-lr 0.7 --momentum 0.9 --json |
    "$py" -c 'import json,sys; print(json.load(sys.stdin)["registry"])')"
"$sd" run add --registry "$reg" --key "$dir/op.key" --role aggregator --peer "$(peer agg)" --store "file://$dir/stores/agg"
"$sd" run add --registry "$reg" --key "$dir/op.key" --role validator --peer "$(peer val)" --store "file://$dir/stores/val"
for m in m1 m2; do
    "$sd" run add --registry "$reg" --key "$dir/op.key" --role miner --peer "$(peer $m)" --store "file://$dir/stores/$m"
done
"$sd" aggregate --registry "$reg" --key "$dir/agg.key" --window 0 --follow > "$dir/aggregate.log" 2>&1 &
agg=$!
trap 'kill $agg 2>/dev/null' EXIT
"$py" "$here/torch_miner.py" --registry "$reg" --key "$dir/m1.key" --init "$dir/model.safetensors" --rounds "$rounds" --seed 1 --state "$dir/state-m1" &
m1=$!
"$py" "$here/torch_miner.py" --registry "$reg" --key "$dir/m2.key" --init "$dir/model.safetensors" --rounds "$rounds" --seed 2 &
m2=$!
"$py" "$here/torch_validator.py" --registry "$reg" --key "$dir/val.key" --init "$dir/model.safetensors" --windows "$rounds" &
val=$!
# Each job's own status (`wait A B C` returns only the last one's).
failed=""
for job in "m1:$m1" "m2:$m2" "validator:$val"; do
    wait "${job#*:}" || failed="$failed ${job%%:*}(exit $?)"
done
if [[ -n "$failed" ]]; then
    echo "run-local: FAILED:$failed; the aggregator's log is $dir/aggregate.log" >&2
    exit 1
fi
echo "run-local: done; registry $reg"
