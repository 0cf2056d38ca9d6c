# Sourced by scripts/test-kotlin and scripts/test-python: starts a relay with the notes schema
# on 127.0.0.1 (random port) in a temporary folder removed at exit, and exports FERRY_RELAY and
# FERRY_TOKEN for the notes examples. Needs FERRY_RELAY_BIN and FERRY_NOTES_SCHEMA.
work=$(mktemp -d)
relay_pid=""
cleanup() {
  if [ -n "$relay_pid" ]; then kill -TERM "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
printf 'listen = "127.0.0.1:0"\ndata = "%s"\nschema = "%s"\n[auth]\nhs256_secret = "notes-example-secret-not-for-production-use"\n' \
  "$work/relay" "$FERRY_NOTES_SCHEMA" >"$work/relay.toml"
"$FERRY_RELAY_BIN" --config "$work/relay.toml" serve >"$work/relay.out" 2>"$work/relay.log" &
relay_pid=$!
for _ in $(seq 100); do grep -q listening "$work/relay.out" 2>/dev/null && break; sleep 0.1; done
grep -q listening "$work/relay.out" || { echo "the relay did not start:"; cat "$work/relay.log"; exit 1; }
export FERRY_RELAY="ws://$(awk '/listening/ {print $NF}' "$work/relay.out")/sync"
export FERRY_TOKEN=$("$FERRY_RELAY_BIN" --config "$work/relay.toml" token --sub me --read '*' --write '*' --ttl 1h)
