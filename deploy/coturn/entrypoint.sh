#!/bin/bash
# Start coturn on a Fly.io machine with deploy/turnserver.conf, in two processes, because Fly wants
# UDP received on the `fly-global-services` address while TCP (from its proxy) arrives on the
# machine's own addresses, and one coturn binds both protocols on the same addresses.
set -euo pipefail
: "${TURN_SECRET:?fly secrets set TURN_SECRET=... (the relay's RELAY_TURN_SECRET)}"
: "${TURN_REALM:?set TURN_REALM in fly.toml}"
: "${TURN_PUBLIC_IP:?set TURN_PUBLIC_IP in fly.toml to the app's dedicated IPv4}"
CONF_IN=${TURN_CONF_IN:-/etc/turnserver.conf}
CONF=${TURN_CONF:-/tmp/turnserver.conf}
GLOBAL_IP=$(getent ahostsv4 fly-global-services | awk 'NR == 1 { print $1 }')
[ -n "$GLOBAL_IP" ] || { echo "fly-global-services does not resolve: not on Fly.io?" >&2; exit 1; }

# The repository's file with its placeholders (secret, realm, certificate, ports) taken out: never
# let the example secret be a valid one.
grep -v -E '^(static-auth-secret|realm|cert|pkey|external-ip|listening-port|tls-listening-port|min-port|max-port)=' \
    "$CONF_IN" > "$CONF"
{
  echo "static-auth-secret=$TURN_SECRET"
  echo "realm=$TURN_REALM"
  echo "external-ip=$TURN_PUBLIC_IP/$GLOBAL_IP"
  echo "relay-ip=$GLOBAL_IP"
  echo "no-tls"
} >> "$CONF"

turnserver -c "$CONF" --listening-ip="$GLOBAL_IP" --listening-port=3478 --no-tcp \
    --min-port=50000 --max-port=50099 &
turnserver -c "$CONF" --listening-ip=0.0.0.0 --listening-port=3478 --no-udp \
    --min-port=50100 --max-port=50199 &
# If either stops, stop the machine so that Fly restarts it.
wait -n || true
exit 1
