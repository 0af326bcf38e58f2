#!/usr/bin/env bash
# Checks the Prometheus integration in integrations/prometheus: the scrape config and the
# alert rules parse (`promtool check`), the rules' unit tests pass (`promtool test
# rules`), and every metric the rules name is one the hub or the agent registers. Installs
# Debian's `prometheus` package (for promtool) when promtool is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=integrations/prometheus

if ! command -v promtool >/dev/null 2>&1; then
  echo "installing: prometheus (for promtool)"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus
fi

promtool check config "$dir/prometheus.yml"
promtool check rules "$dir/brume-alerts.yml"
promtool test rules "$dir/brume-alerts.test.yml"

# prometheus-client registers `name` under the registry's prefix and adds `_total` to
# counters when encoding: brume_hub_quarantined_total is "quarantined" in the hub's
# metrics.rs.
missing=0
for m in $(grep -v '^ *#' "$dir/brume-alerts.yml" | grep -o 'brume_\(hub\|agent\)_[a-z0-9_]\+' | sort -u); do
  case "$m" in
    brume_hub_*) file=cloud-hub/src/metrics.rs; base=${m#brume_hub_} ;;
    brume_agent_*) file=edge-agent/src/metrics.rs; base=${m#brume_agent_} ;;
  esac
  base=${base%_total}
  if ! grep -q "\"$base\"" "$file"; then
    echo "brume-alerts.yml names $m, but $file registers no metric \"$base\"" >&2
    missing=1
  fi
done
[ "$missing" -eq 0 ] || exit 1
echo "integrations/prometheus: config, rules, rule tests and metric names OK"
