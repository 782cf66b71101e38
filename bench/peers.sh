#!/usr/bin/env bash
# Installs the peer gateways bench/bench_providers.py runs beside InferBus, each once, under bench/.peers/:
#   bench/.peers/litellm  a venv with litellm[proxy]==1.106.2 (the LiteLLM proxy)
#   bench/.peers/portkey  node_modules with @portkey-ai/gateway@1.15.2 (Node 20+), @hono/node-server pinned
#                         to 1.13.5: with 1.19.x every `stream: true` request fails ("TypeError: immutable",
#                         Portkey #1389)
# A peer whose marker file names the wanted version is left alone, so reruns take no time.
#   bash bench/peers.sh [litellm|portkey ...]   (default: both)
set -euo pipefail

LITELLM_VERSION=1.106.2
PORTKEY_VERSION=1.15.2
HONO_NODE_SERVER=1.13.5

here=$(cd "$(dirname "$0")" && pwd)
peers=${INFERBUS_PEERS_DIR:-$here/.peers}
mkdir -p "$peers"

say() { echo "[peers] $*"; }

litellm() {
  local dir=$peers/litellm marker=$peers/litellm/.installed
  if [[ -f $marker && $(cat "$marker") == "litellm[proxy]==$LITELLM_VERSION" ]]; then
    say "litellm $LITELLM_VERSION already in $dir"; return
  fi
  local t0=$SECONDS python=${PYTHON:-python3}
  say "installing litellm[proxy]==$LITELLM_VERSION into $dir"
  rm -rf "$dir"
  "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "litellm[proxy]==$LITELLM_VERSION"
  echo "litellm[proxy]==$LITELLM_VERSION" > "$marker"
  say "litellm installed in $((SECONDS - t0)) s"
}

portkey() {
  local dir=$peers/portkey marker=$peers/portkey/.installed
  local want="@portkey-ai/gateway@$PORTKEY_VERSION @hono/node-server@$HONO_NODE_SERVER"
  if [[ -f $marker && $(cat "$marker") == "$want" ]]; then
    say "portkey $PORTKEY_VERSION already in $dir"; return
  fi
  command -v npm >/dev/null || { say "npm is not installed (Node 20+ is needed for the Portkey gateway)"; exit 2; }
  local t0=$SECONDS
  say "installing @portkey-ai/gateway@$PORTKEY_VERSION into $dir"
  rm -rf "$dir"
  mkdir -p "$dir"
  cat > "$dir/package.json" <<EOF
{
  "name": "inferbus-bench-portkey",
  "private": true,
  "dependencies": {"@portkey-ai/gateway": "$PORTKEY_VERSION"},
  "overrides": {"@hono/node-server": "$HONO_NODE_SERVER"}
}
EOF
  (cd "$dir" && npm install --no-audit --no-fund --loglevel=error)
  local got
  got=$(node -p "require('$dir/node_modules/@hono/node-server/package.json').version")
  [[ $got == "$HONO_NODE_SERVER" ]] || { say "@hono/node-server is $got, not $HONO_NODE_SERVER"; exit 1; }
  echo "$want" > "$marker"
  say "portkey installed in $((SECONDS - t0)) s"
}

for peer in "${@:-litellm portkey}"; do
  for p in $peer; do
    case $p in
      litellm) litellm ;;
      portkey) portkey ;;
      *) say "unknown peer $p (litellm, portkey)"; exit 2 ;;
    esac
  done
done
