"""Fetch bundles from a URI into a folder: what a Kubernetes initContainer runs before the service starts.

It follows the KServe storage-initializer convention (`SOURCE_URI DEST_DIR`), so either can fill the same emptyDir.
The source is an archive (`.tar.gz`, `.tgz`, `.tar`, `.zip`) over http(s):// or file://, a local archive, or a local
folder; whatever it holds, every folder with a `manifest.json` is a bundle and lands at `DEST_DIR/<its folder name>`.
No torch: the service image runs it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import zipfile
from collections.abc import Callable
from pathlib import Path

from export.bundle import MANIFEST, is_bundle, read_manifest
from fpet.errors import FpetError

ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")
CHUNK = 1 << 20


def download(url: str, target: Path, timeout: float) -> None:
    import httpx

    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=timeout) as response:
            if response.status_code != 200:
                raise FpetError(f"could not fetch {url}: HTTP {response.status_code}")
            with target.open("wb") as out:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
    except httpx.HTTPError as exc:
        raise FpetError(f"could not fetch {url}: {exc}") from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def unpack(archive: Path, name: str, into: Path) -> None:
    """Extract with members confined to `into`: no absolute paths, `..`, links out or device files."""
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for member in z.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise FpetError(f"{name} has an unsafe member path {member!r}")
                z.extractall(into)
        else:
            with tarfile.open(archive) as t:
                t.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
        raise FpetError(f"could not unpack {name}: {exc}") from exc


def stage_source(uri: str, staging: Path, timeout: float) -> tuple[Path, str]:
    """The source as a local path (a folder, or an archive) and the name that tells its kind."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        name = Path(parsed.path).name
        local = staging / "download"
        download(uri, local, timeout)
        return local, name
    if parsed.scheme not in ("", "file"):
        raise FpetError(
            f"unsupported URI scheme {parsed.scheme}:// (use http(s)://, file:// or a path; for s3:// or gs:// run "
            "KServe's storage-initializer into the same folder)"
        )
    local = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else uri).expanduser()
    if not local.exists():
        raise FpetError(f"{local} does not exist")
    return local, local.name


def pull_bundles(
    uri: str, dest: str | Path, sha256: str | None = None, timeout: float = 300, log: Callable[[str], None] = print
) -> list[Path]:
    """Fetch, check and place the bundles; nothing lands in `dest` unless every bundle found is complete."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=dest) as tmp:
        staging = Path(tmp)
        source, name = stage_source(uri, staging, timeout)
        if source.is_dir():
            if sha256:
                raise FpetError("--sha256 checks an archive; the source is a folder")
            root = source
        else:
            if not name.endswith(ARCHIVES):
                raise FpetError(f"{name} is not an archive this reads ({', '.join(ARCHIVES)}) nor a folder")
            if sha256 and (actual := sha256_of(source)) != sha256.lower():
                raise FpetError(f"{name} has sha256 {actual}, expected {sha256}")
            root = staging / "unpacked"
            unpack(source, name, root)
        bundles = sorted({p.parent for p in root.rglob(MANIFEST)})
        if not bundles:
            raise FpetError(f"{uri} holds no bundle (no folder with {MANIFEST})")
        names = [b.name for b in bundles]
        if len(set(names)) != len(names):
            raise FpetError(f"{uri} holds several bundles named alike: {sorted(names)}")
        for bundle in bundles:
            read_manifest(bundle)  # refuses incomplete bundles and newer formats before anything is placed
            target = dest / bundle.name
            if target.exists() and not (target.is_dir() and is_bundle(target)):
                raise FpetError(f"{target} exists and is not a bundle: refusing to replace it")
        placed = []
        for bundle in bundles:
            target = dest / bundle.name
            incoming = staging / f"incoming-{bundle.name}"
            if source.is_dir():
                shutil.copytree(bundle, incoming)
            else:
                bundle.rename(incoming)
            if target.exists():
                shutil.rmtree(target)
            os.replace(incoming, target)
            placed.append(target)
            log(f"{bundle.name}: {target}")
    return placed
