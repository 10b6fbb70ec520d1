#!/usr/bin/env bash
# Vulkan for the `wgpu` backend:
#   scripts/setup-vulkan.sh
# Installs the Vulkan loader (libvulkan1), Mesa's Vulkan drivers (mesa-vulkan-drivers:
# lavapipe, the software "llvmpipe" device that runs on any CPU) and vulkaninfo
# (vulkan-tools) with apt-get when they are missing (as root, or through sudo), then lists
# the Vulkan devices and fails when there is none. On a machine with a GPU, the GPU
# vendor's driver provides its own device beside llvmpipe; wgpu device 0 (`--device 0`)
# is the best adapter, `--device N` the N-th discrete GPU. Idempotent.
set -euo pipefail
packages=(libvulkan1 mesa-vulkan-drivers vulkan-tools)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
    echo "setup-vulkan: missing ${missing[*]}; install them as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
    { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
fi
# vulkaninfo wants a runtime directory; a root shell in a container often has none.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
summary="$(vulkaninfo --summary 2>/dev/null || true)"
devices="$(printf '%s\n' "$summary" | grep -E '^\s*(deviceName|driverName)\s*=' || true)"
if [ -z "$devices" ]; then
  echo "setup-vulkan: vulkaninfo finds no Vulkan device (run \`vulkaninfo --summary\` to see why)" >&2
  exit 1
fi
echo "Vulkan devices:"
printf '%s\n' "$devices" | sed 's/^\s*/  /'
