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

# Every brume_* metric the rules (and their annotations) name must be registered by the hub
# or the agent. prometheus-client registers `name` under the registry's prefix
# (brume_hub / brume_agent) and adds the suffixes when encoding: `_total` to counters,
# `_bucket`/`_count`/`_sum` to histograms. So brume_hub_quarantined_total must appear as
# `register("quarantined"` (possibly across lines) in cloud-hub/src: a bare "quarantined"
# string would also match label values.
missing=0
for m in $(grep -v '^ *#' "$dir/brume-alerts.yml" | grep -o 'brume_\(hub\|agent\)_[a-z0-9_]\+' | sort -u); do
  case "$m" in
    brume_hub_*) src=cloud-hub/src; name=${m#brume_hub_} ;;
    brume_agent_*) src=edge-agent/src; name=${m#brume_agent_} ;;
  esac
  found=0
  for base in "$name" "${name%_total}" "${name%_bucket}" "${name%_count}" "${name%_sum}"; do
    if grep -rqzP "register\(\s*\"$base\"" "$src"; then
      found=1
      break
    fi
  done
  if [ "$found" -eq 0 ]; then
    echo "brume-alerts.yml names $m, but nothing in $src registers a metric \"$name\" (nor without its _total/_bucket/_count/_sum suffix)" >&2
    missing=1
  fi
done
[ "$missing" -eq 0 ] || exit 1
echo "integrations/prometheus: config, rules, rule tests and metric names OK"
