#!/usr/bin/env bash
# A CPU-only libtorch 2.9.0 (the version burn-tch 0.22.1 / torch-sys 0.22.0 expect) for the
# `tch` backend, without the 4 GB of CUDA packages a plain `pip install torch` pulls:
#   scripts/setup-libtorch.sh [--dir DIR]      (default: third_party/libtorch, git-ignored)
# From PyPI's torch==2.9.0 wheel (the only Linux x86_64 build is CUDA 12.8's) it takes
# libc10, libtorch_cpu, libtorch, libgomp and the C++ headers; from nvidia-cuda-runtime-cu12
# and nvidia-cuda-cupti-cu12 (at torch's pinned 12.8.90) libcudart.so.12 and
# libcupti.so.12, which libtorch_cpu.so lists as needed (the profiler); and it removes
# libtorch.so's dependency on libtorch_cuda.so with patchelf (installed with apt-get when
# missing). About 430 MB. Then build with the printed LIBTORCH, e.g.
#   LIBTORCH=$PWD/third_party/libtorch cargo build --release --features tch
# The binaries carry DIR/lib as their rpath (crates/kiln-core/libtorch_rpath.rs), so
# running them needs no LD_LIBRARY_PATH. Keep DIR at a fixed path: torch-sys rebuilds
# (and Burn with it) whenever LIBTORCH changes. Downloads are cached in
# ${KILN_CACHE:-$HOME/.cache/kiln}/pip/wheels. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/third_party/libtorch"
case "${1:-}" in
  "") ;;
  --dir) dir="$(mkdir -p "$2" && cd "$2" && pwd)" ;;
  *) echo "usage: $0 [--dir DIR]" >&2; exit 2 ;;
esac
wheels="${KILN_CACHE:-$HOME/.cache/kiln}/pip/wheels"
if [ -f "$dir/build-version" ] && [ "$(cat "$dir/build-version")" = 2.9.0 ] && [ -f "$dir/lib/libcupti.so.12" ]; then
  echo "libtorch 2.9.0 (CPU) is in $dir"
  echo "export LIBTORCH=$dir"
  exit 0
fi
mkdir -p "$wheels"
for req in torch==2.9.0 nvidia-cuda-runtime-cu12==12.8.90 nvidia-cuda-cupti-cu12==12.8.90; do
  name="${req%%==*}"
  if ! ls "$wheels/${name//-/_}-${req##*==}-"*.whl >/dev/null 2>&1; then
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: \
      --python-version 3.11 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 "$req" -d "$wheels"
  fi
done
if ! command -v patchelf >/dev/null; then
  if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
    echo "setup-libtorch: patchelf is missing; install it as root: apt-get install -y patchelf" >&2
    exit 1
  fi
  echo "installing patchelf (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -qq patchelf >/dev/null 2>&1 ||
    { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq patchelf >/dev/null; }
fi
# The staging directory sits beside DIR (same file system, so the final mv is atomic);
# on a fresh clone third_party/ does not exist yet.
mkdir -p "$(dirname "$dir")"
tmp="$(mktemp -d "$(dirname "$dir")/.libtorch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 - "$wheels" "$tmp" <<'PY'
import glob, os, shutil, sys, zipfile
wheels, out = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(out, "lib"))
def take(pattern, members, strip):
    wheel = zipfile.ZipFile(sorted(glob.glob(os.path.join(wheels, pattern)))[-1])
    for name in wheel.namelist():
        if any(name == m or (m.endswith("/") and name.startswith(m)) for m in members) and not name.endswith("/"):
            target = os.path.join(out, name[len(strip):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with wheel.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
take("torch-2.9.0-*.whl", ["torch/lib/libc10.so", "torch/lib/libtorch_cpu.so", "torch/lib/libtorch.so",
                            "torch/lib/libgomp.so.1", "torch/include/"], "torch/")
take("nvidia_cuda_runtime_cu12-12.8.90-*.whl", ["nvidia/cuda_runtime/lib/libcudart.so.12"], "nvidia/cuda_runtime/")
take("nvidia_cuda_cupti_cu12-12.8.90-*.whl", ["nvidia/cuda_cupti/lib/libcupti.so.12"], "nvidia/cuda_cupti/")
PY
patchelf --remove-needed libtorch_cuda.so "$tmp/lib/libtorch.so"
echo 2.9.0 > "$tmp/build-version"
rm -rf "$dir"
chmod 755 "$tmp"
mv "$tmp" "$dir"
trap - EXIT
echo "libtorch 2.9.0 (CPU, $(du -sh "$dir" | cut -f1)) is in $dir"
echo "export LIBTORCH=$dir"
