"""`fpet pull`: bundles from a URI into a folder, as the Kubernetes initContainer runs it."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from export.bundle import read_manifest
from export.pull import pull_bundles
from fpet.errors import FpetError
from tests.helpers.servers import run_fpet


@pytest.fixture
def archive(tiny_bundles, tmp_path) -> Path:
    """Both tiny bundles under one top folder, as `tar czf bundles.tgz -C ~/.cache/fpet/bundles RUN` makes it."""
    path = tmp_path / "site" / "bundles.tar.gz"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tar:
        for variant, folder in tiny_bundles.items():
            tar.add(folder, arcname=f"my_run/{variant}")
    return path


@pytest.fixture
def site(archive):
    """A real HTTP server on loopback serving the archive's folder."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_pulls_an_archive_over_http_with_its_checksum(site, archive, tiny_bundles, tmp_path):
    dest = tmp_path / "models"
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    placed = pull_bundles(f"{site}/bundles.tar.gz", dest, sha256=sha, log=lambda _: None)
    assert placed == [dest / "backbone", dest / "fpet"]
    for variant in ("fpet", "backbone"):
        assert read_manifest(dest / variant)["variant"] == variant
        assert same_files(dest / variant, tiny_bundles[variant])
    assert sorted(p.name for p in dest.iterdir()) == ["backbone", "fpet"]  # no temporary folder left


def test_pulls_a_local_folder_a_file_url_and_a_zip(tiny_bundles, archive, tmp_path):
    from_folder = pull_bundles(str(tiny_bundles["fpet"].parent), tmp_path / "a", log=lambda _: None)
    assert [p.name for p in from_folder] == ["backbone", "fpet"]
    assert [p.name for p in pull_bundles(archive.as_uri(), tmp_path / "b", log=lambda _: None)] == ["backbone", "fpet"]
    zipped = tmp_path / "bundles.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for path in tiny_bundles["fpet"].iterdir():
            z.write(path, f"fpet/{path.name}")
    assert [p.name for p in pull_bundles(str(zipped), tmp_path / "c", log=lambda _: None)] == ["fpet"]


def test_a_wrong_checksum_places_nothing(site, tmp_path):
    dest = tmp_path / "models"
    with pytest.raises(FpetError, match="sha256"):
        pull_bundles(f"{site}/bundles.tar.gz", dest, sha256="0" * 64, log=lambda _: None)
    assert list(dest.iterdir()) == []


def test_an_incomplete_bundle_places_nothing(tiny_bundles, tmp_path):
    source = tmp_path / "source"
    for variant, folder in tiny_bundles.items():
        shutil.copytree(folder, source / variant)
    (source / "fpet" / "model.onnx").unlink()
    dest = tmp_path / "models"
    with pytest.raises(FpetError, match=r"lacks model\.onnx"):
        pull_bundles(str(source), dest, log=lambda _: None)
    assert list(dest.iterdir()) == []


def test_what_is_in_the_way_and_not_a_bundle_is_refused_and_kept(tiny_bundles, tmp_path):
    dest = tmp_path / "models"
    (dest / "fpet").mkdir(parents=True)
    (dest / "fpet" / "manifest.json").write_text('{"name": "my web app"}')
    (dest / "backbone").write_text("a file")
    with pytest.raises(FpetError, match="is not a bundle: refusing"):
        pull_bundles(str(tiny_bundles["fpet"].parent), dest, log=lambda _: None)
    assert (dest / "fpet" / "manifest.json").read_text() == '{"name": "my web app"}'
    assert (dest / "backbone").read_text() == "a file"


def tar_with(tmp_path: Path, member: str) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(member)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    return path


@pytest.mark.parametrize("member", ["../../../escaped/manifest.json", "/abs/manifest.json"])
def test_archive_members_cannot_escape(tmp_path, member):
    dest = tmp_path / "deep" / "models"
    with pytest.raises(FpetError):  # refused ("..") or confined to the staging folder ("/"), then not a bundle
        pull_bundles(str(tar_with(tmp_path, member)), dest, log=lambda _: None)
    assert not (tmp_path / "deep" / "escaped").exists() and not Path("/abs").exists() and list(dest.iterdir()) == []
    zipped = tmp_path / "evil.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr(member, "{}")
    with pytest.raises(FpetError, match="unsafe member"):
        pull_bundles(str(zipped), dest, log=lambda _: None)


def test_clear_errors(site, tmp_path):
    dest = tmp_path / "models"
    with pytest.raises(FpetError, match="HTTP 404"):
        pull_bundles(f"{site}/missing.tar.gz", dest, log=lambda _: None)
    with pytest.raises(FpetError, match="storage-initializer"):
        pull_bundles("s3://bucket/bundles.tar.gz", dest, log=lambda _: None)
    with pytest.raises(FpetError, match="does not exist"):
        pull_bundles(str(tmp_path / "nowhere.tgz"), dest, log=lambda _: None)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FpetError, match="not an archive"):
        pull_bundles(str(tmp_path / "notes.txt"), dest, log=lambda _: None)
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(FpetError, match="holds no bundle"):
        pull_bundles(str(empty), dest, log=lambda _: None)
    with pytest.raises(FpetError, match="could not fetch"):
        pull_bundles("http://127.0.0.1:9/bundles.tgz", dest, timeout=5, log=lambda _: None)


def test_cli_prints_the_bundles_or_one_error_line(archive, tmp_path):
    done = run_fpet("pull", str(archive), str(tmp_path / "models"), home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["backbone", "fpet"]
    done = run_fpet("pull", str(archive), str(tmp_path / "other"), "--sha256", "ab" * 32, home=tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and done.stderr.startswith("fpet: error:")
    assert json.loads((tmp_path / "models" / "fpet" / "manifest.json").read_text())["variant"] == "fpet"
