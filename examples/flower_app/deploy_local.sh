#!/bin/bash
# A local deployment of the AFA app: one SuperLink and two SuperNodes started by hand on this
# machine (insecure, loopback only), then `flwr run` against them. Every process this script
# starts is stopped by its PID at the end. Usage: bash deploy_local.sh [extra --run-config text]
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-$(mktemp -d /tmp/afa-deploy.XXXX)}
VENV_BIN=${VENV_BIN:-$(dirname "$(command -v python)")}
export PATH=$VENV_BIN:$PATH FLWR_HOME=$WORK/flwr_home FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<'TOML'
[superlink]
default = "local-deployment"

[superlink.local-deployment]
address = "127.0.0.1:8000"
insecure = true
TOML
cd "$WORK"
flower-superlink --insecure --disable-runtime-dependency-installation > superlink.log 2>&1 &
echo $! > superlink.pid
sleep 5
for i in 0 1; do
  flower-supernode --insecure --superlink 127.0.0.1:8000 --node-config "partition-id=$i num-partitions=2" \
    --port $((9094 + i)) > supernode$i.log 2>&1 &
  echo $! > supernode$i.pid
done
sleep 8
(cd "$HERE" && flwr run . local-deployment --stream \
  --run-config "n-train=4 n-test=10 num-server-steps=6 concurrency=2 buffer-size=2 max-local-steps=3 eval-every=3 ${1:-}")
code=$?
for f in superlink.pid supernode0.pid supernode1.pid; do
  p=$(cat $f); kids=$(pgrep -P "$p"); grandkids=""
  for k in $kids; do grandkids="$grandkids $(pgrep -P "$k")"; done
  kill $grandkids $kids "$p" 2>/dev/null
done
echo "logs in $WORK"
exit $code
