#!/usr/bin/env bash
# A project-local Python (.venv, git-ignored) with PyTorch 2.9.0 and numpy, for the
# reference scripts in scripts/ (speed and loss anchors). Not needed to build or test Kiln.
#
#   scripts/setup-torch-cpu.sh          # torch + the 12 CUDA wheels it needs to import
#                                       # (3.4 GB download, 5.6 GB .venv)
#   scripts/setup-torch-cpu.sh --stubs  # torch + CPU-only stand-ins for those libraries
#                                       # (0.9 GB download, 1.9 GB .venv; see below)
#
# PyPI's only Linux x86_64 torch 2.9.0 wheel is the CUDA 12.8 build: a plain
# `pip install torch` pulls 16 more wheels (nvidia-*, triton: 3.0 GB download, 4.9 GB
# installed, a 6.8 GB .venv). None of them is used on CPU, but libtorch_cuda.so and
# libtorch_python.so list 12 of the CUDA libraries as DT_NEEDED, so `import torch`
# fails without them
# (libcudart, libcupti, libcublas(Lt), libcudnn, libcusparse, libcusparseLt, libcufft,
# libcufile, libcurand, libnccl, libnvshmem_host, and libnvJitLink for cusparse: 2.5 GB
# download, 3.7 GB installed; cusolver, nvrtc, nvtx and triton are not needed to import).
# By default those 12 real wheels are installed (--no-deps, at torch's pinned versions).
# With --stubs: torch with --no-deps, its pure-Python requirements, and, in place of the CUDA
# libraries, tiny stub libraries under torch/lib (the last entry of torch's RPATH)
# that define exactly the CUDA symbols torch's libraries import. Every stub function
# returns 100 (cudaErrorNoDevice), so torch.cuda.is_available() is False; the CPU
# kernels (libtorch_cpu.so, MKL, oneDNN) are the real, unmodified ones.
# Needs python3 (with venv), a C compiler (cc) and binutils (readelf). Idempotent;
# downloads are kept in ${KILN_CACHE:-$HOME/.cache/kiln}/pip.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KILN_CACHE:-$HOME/.cache/kiln}/pip"
venv="${KILN_VENV:-$root/.venv}"
py="$venv/bin/python"
mode=wheels
case "${1:-}" in
  "") ;;
  --stubs) mode=stubs ;;
  *) echo "usage: $0 [--stubs]" >&2; exit 2 ;;
esac

check='import numpy, torch
assert torch.__version__.split("+")[0] == "2.9.0", torch.__version__
x = torch.randn(8, 4, 16, 32, requires_grad=True)
torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True).sum().backward()
import sys
print(f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), numpy {numpy.__version__}: ready in {sys.prefix}")'

if [ -x "$py" ] && "$py" -c "$check" 2>/dev/null; then
  exit 0
fi

mkdir -p "$cache/wheels"
[ -x "$py" ] || python3 -m venv "$venv"
pip=("$py" -m pip --disable-pip-version-check)
# The 900 MB torch wheel is too large for pip's HTTP cache: keep the file itself.
"${pip[@]}" download --quiet --no-deps torch==2.9.0 -d "$cache/wheels"
# torch's own requirements minus nvidia-* and triton (filelock, typing-extensions, sympy,
# networkx, jinja2, fsspec, ...), read from the wheel's metadata, plus numpy; installed
# before torch, so that pip finds no missing requirements to warn about afterwards.
mapfile -t reqs < <("$py" -c '
import email, glob, sys, zipfile
tag = "cp%d%d" % sys.version_info[:2]
wheel = zipfile.ZipFile(glob.glob(f"{sys.argv[1]}/torch-2.9.0-{tag}-{tag}-*.whl")[0])
for r in email.message_from_bytes(wheel.read("torch-2.9.0.dist-info/METADATA")).get_all("Requires-Dist"):
    if not r.startswith(("nvidia-", "triton")) and "extra ==" not in r:
        print(r)' "$cache/wheels")
"${pip[@]}" install --quiet --cache-dir "$cache" "${reqs[@]}" numpy
"${pip[@]}" install --quiet --no-index --find-links "$cache/wheels" --no-deps torch==2.9.0

if [ "$mode" = wheels ]; then
  # Only the CUDA wheels needed to import torch (measured), at torch's pinned versions.
  mapfile -t cuda < <("$py" -c '
from importlib.metadata import requires
need = "cuda-runtime cuda-cupti cublas cudnn cusparse cusparselt cufft cufile curand nccl nvshmem nvjitlink"
need = {f"nvidia-{n}-cu12" for n in need.split()}
for r in requires("torch"):
    if r.split("==")[0] in need:
        print(r.split(";")[0].strip())')
  "${pip[@]}" download --quiet --no-deps -d "$cache/wheels" "${cuda[@]}"
  "${pip[@]}" install --quiet --no-index --find-links "$cache/wheels" --no-deps "${cuda[@]}"
else
  "$py" - <<'EOF'
# Build one stub per CUDA library that torch's own libraries list as DT_NEEDED,
# defining the symbols they import from it (under the same symbol version).
import collections, glob, importlib.util, os, re, subprocess, tempfile

torch_dir = importlib.util.find_spec("torch").submodule_search_locations[0]
lib_dir = os.path.join(torch_dir, "lib")
cuda_so = re.compile(r"^lib(cu|nv|nccl)\w*\.so\.\d+$")  # libcudart.so.12, libnccl.so.2, ...
driver = "libcuda.so.1"  # the driver: only libcaffe2_nvrtc.so, loaded on first GPU use
ours = [f for f in glob.glob(os.path.join(lib_dir, "*.so*")) + glob.glob(os.path.join(torch_dir, "_C*.so"))
        if not cuda_so.match(os.path.basename(f))]

def readelf(*args):
    return subprocess.run(["readelf", "-W", *args], check=True, capture_output=True, text=True).stdout

needed, defined, imports, version_file = set(), set(), [], {}
for f in ours:
    needed |= set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", readelf("-d", f)))
    file = None
    for line in readelf("-V", f).splitlines():  # version needs: "File: libcublas.so.12" then "Name: ..."
        if m := re.search(r"File: (\S+)", line):
            file = m.group(1)
        elif (m := re.search(r"Name: (\S+)", line)) and file:
            version_file[m.group(1)] = file
    for line in readelf("--dyn-syms", f).splitlines():
        cols = line.split()
        if len(cols) < 8 or not cols[0].endswith(":"):
            continue
        name = cols[7]
        if cols[6] != "UND":
            defined.add(name.split("@")[0])
        elif cols[4] == "GLOBAL":  # weak references need no definition
            imports.append(name)
stubs = sorted(n for n in needed if cuda_so.match(n) and n != driver)

def stem(soname):  # libcusparseLt.so.0 -> cusparselt
    return soname[3:].split(".so")[0].lower()

syms = collections.defaultdict(lambda: collections.defaultdict(set))  # soname -> version -> names
for name in imports:
    sym, _, version = name.partition("@")
    if sym in defined:
        continue
    if version:
        soname = version_file.get(version)
    else:  # unversioned (nccl*, cusparseLt*, cuFile*): the library whose name prefixes it
        soname = max((s for s in stubs if sym.lower().startswith(stem(s))), key=len, default=None)
    if soname in stubs:
        syms[soname][version or soname].add(sym)

returns_string = re.compile(r"Get(Error|Status)(String|Name)$")
with tempfile.TemporaryDirectory() as tmp:
    for soname in stubs:
        c_src, script = [], []
        for version, names in sorted(syms[soname].items()):
            script.append(f"{version} {{ global: {' '.join(n + ';' for n in sorted(names))} }};")
            for n in sorted(names):
                if returns_string.search(n):
                    c_src.append(f'const char *{n}(void) {{ return "CUDA is not available (CPU-only stub)"; }}')
                else:
                    c_src.append(f"long {n}(void) {{ return 100; }}  /* cudaErrorNoDevice */")
        c_file, map_file = os.path.join(tmp, "stub.c"), os.path.join(tmp, "stub.map")
        open(c_file, "w").write("/* CPU-only stand-in for a CUDA library. */\n" + "\n".join(c_src) + "\n")
        open(map_file, "w").write("\n".join(script) + "\n")
        out = os.path.join(lib_dir, soname)
        if os.path.lexists(out):
            os.remove(out)
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", out, c_file, f"-Wl,-soname,{soname}"]
                       + ([f"-Wl,--version-script={map_file}"] if script else []), check=True)
    n = sum(len(v) for s in syms.values() for v in s.values())
    print(f"CUDA stubs: {len(stubs)} libraries, {n} symbols, in {lib_dir}")
EOF
fi
"$py" -c "$check"
