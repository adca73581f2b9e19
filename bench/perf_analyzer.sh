#!/usr/bin/env bash
# Install NVIDIA's perf_analyzer into .tools/perf_analyzer (no GPU needed), and print the line that runs it.
#
# The binary ships in the tritonclient 2.50.0 wheel (later wheels no longer carry it). It links Debian's libb64
# (`apt-get install libb64-0d`) and libcudart.so.12, taken from the nvidia-cuda-runtime-cu12 wheel. Nothing is
# installed into the virtual environment: both wheels are only unpacked.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.tools/perf_analyzer
PIP=${PIP:-.venv/bin/pip}
if [ ! -x "$DEST/bin/perf_analyzer" ]; then
  if ! ldconfig -p | grep -q 'libb64.so.0d'; then
    echo "perf_analyzer needs libb64: apt-get install libb64-0d" >&2
    exit 1
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PIP" download --quiet --no-deps --dest "$tmp" tritonclient==2.50.0 nvidia-cuda-runtime-cu12==12.9.79
  mkdir -p "$tmp/out/bin" "$tmp/out/lib"
  python3 - "$tmp" <<'PY'
import sys, zipfile, pathlib
tmp = pathlib.Path(sys.argv[1])
for wheel in tmp.glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if name.endswith("/bin/perf_analyzer") or base == "libcudart.so.12":
                target = tmp / "out" / ("bin" if base == "perf_analyzer" else "lib") / base
                target.write_bytes(z.read(name))
                target.chmod(0o755)
PY
  rm -rf "$DEST"
  mkdir -p "$(dirname "$DEST")"
  mv "$tmp/out" "$DEST"
fi
LD_LIBRARY_PATH="$PWD/$DEST/lib" "$DEST/bin/perf_analyzer" --version >/dev/null 2>&1
echo "LD_LIBRARY_PATH=$PWD/$DEST/lib $PWD/$DEST/bin/perf_analyzer"
