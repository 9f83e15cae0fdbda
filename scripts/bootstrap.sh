#!/usr/bin/env bash
# Idempotent set-up for `make test` / `make demo` on Debian 12: system packages, then .venv.
# The venv is made from Debian's own /usr/bin/python3 with --system-site-packages so that Debian's
# python3-libvirt and python3-libnbd (built for that interpreter) are importable, as on a real KVM host.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-system-x86 qemu-utils qemu-block-extra qemu-guest-agent
  btrfs-progs lvm2 rsync socat libnbd-bin e2fsprogs zstd busybox-static dash cpio kmod xz-utils fdisk
  openssh-server openssh-client python3-venv python3-pip python3-libvirt python3-libnbd
)
# extra packages a later part of the suite needs are listed one a line in scripts/packages.d/*.txt
if compgen -G "scripts/packages.d/*.txt" >/dev/null; then
  while read -r pkg; do [[ -n "$pkg" && "$pkg" != \#* ]] && packages+=("$pkg"); done < <(cat scripts/packages.d/*.txt)
fi

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [[ "$status" == "installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "vmsnap: missing system packages; as root run: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # no service may start while we install (there may be no init system at all)
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -q </dev/null >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >/dev/null
fi

stamp=.venv/.vmsnap-stamp
want=$(cat pyproject.toml tests/plugin/pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [[ ! -x .venv/bin/python || ! -f $stamp || "$(cat $stamp)" != "$want" ]]; then
  echo "bootstrap: creating .venv (Debian python3 with system site-packages)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/python -m pip install -q --upgrade pip </dev/null
  .venv/bin/python -m pip install -q -e '.[test,dev,guest,qcow,bench,s3]' </dev/null
  # a strategy from another distribution, registered through the entry point (tests/test_plugin_strategy.py)
  .venv/bin/python -m pip install -q -e tests/plugin </dev/null
  echo "$want" > $stamp
fi
