"""Peak memory of decoding one 40 MP image the way the service does (docs/benchmarks.md "Images that decode big").

A lossless WebP of 6320x6320 pixels (1.7 KB on disk), decoded in a fresh process by `service.decode.decode_image`
and shrunk by `fpet.imaging.resize_rgb`; the growth of the process's peak RSS (`ru_maxrss`) is reported:

    .venv/bin/python docs/bench/decode_peak.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys
from fpet.imaging import resize_rgb
from service.decode import decode_image
data = open(sys.argv[1], "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
resize_rgb(decode_image(data, 40_000_000, 112), 112)
print(round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024))
"""

MAKE = """
import sys
from PIL import Image
Image.new("RGB", (6320, 6320), (30, 120, 200)).save(sys.argv[1], "WEBP", lossless=True)
"""

if __name__ == "__main__":
    # Both steps in child processes of a small parent: Linux carries a process's peak RSS across fork and exec, so a
    # parent that had made the 40 MP image would hand the child its own peak as the baseline.
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "big.webp"
        subprocess.run([sys.executable, "-c", MAKE, str(path)], check=True)
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True, cwd=root
        )
        print(f"{path.stat().st_size} bytes on disk; peak RSS grew by {done.stdout.strip()} MB while decoding")
