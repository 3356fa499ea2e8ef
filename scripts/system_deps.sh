#!/usr/bin/env bash
# The Mooncake wheel links against RDMA and NUMA libraries even when only TCP is used.
set -euo pipefail
missing=()
for pkg in libibverbs1 librdmacm1 libnuma1; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
else
  echo "qwenvl-pd needs the system packages: ${missing[*]}" >&2
  echo "install them as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
