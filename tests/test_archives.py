"""Archives of ECG records: safe extraction, hostile members refused with nothing written, records found."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from helpers import write_record
from ecg_pipeline.pipeline.archives import ArchiveError, extract_archive, find_records


def _records(tmp_path):
    src = tmp_path / "src"
    (src / "site-a" / "day1").mkdir(parents=True)
    (src / "site-b").mkdir(parents=True)
    write_record(src / "site-a" / "day1", "r1", seconds=5)
    write_record(src / "site-b", "r2", seconds=5)
    return src


def test_zip_and_tar_gz_with_nested_records(tmp_path):
    src = _records(tmp_path)
    zpath = tmp_path / "recs.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in src.rglob("*"):
            if p.is_file():
                z.write(p, p.relative_to(src).as_posix())
    tpath = tmp_path / "recs.tar.gz"
    with tarfile.open(tpath, "w:gz") as t:
        t.add(src, arcname=".")
    for archive in (zpath, tpath):
        out = extract_archive(archive, tmp_path / f"out-{archive.name}")
        names = [p.relative_to(out).as_posix() for p in find_records(out)]
        assert names == ["site-a/day1/r1", "site-b/r2"]
        assert (out / "site-b" / "r2.dat").read_bytes() == (src / "site-b" / "r2.dat").read_bytes()


@pytest.mark.parametrize("name", ["../evil.hea", "/etc/evil.hea", "a/../../evil.hea", "C:/evil.hea"])
def test_hostile_zip_members_are_refused_and_nothing_is_written(tmp_path, name):
    zpath = tmp_path / "hostile.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("ok.hea", "ok 1 360 10\n")
        z.writestr(name, "evil")
    with pytest.raises(ArchiveError, match="outside the extraction folder") as err:
        extract_archive(zpath, tmp_path / "work" / "out")
    assert name in str(err.value)
    assert not (tmp_path / "evil.hea").exists() and not (tmp_path / "work" / "out").exists()
    assert not any((tmp_path / "work").iterdir())  # no partial folder left


@pytest.mark.parametrize("name, kind, why", [
    ("../evil.hea", tarfile.REGTYPE, "outside the destination"),
    ("/etc/evil.hea", tarfile.REGTYPE, "outside"),
    ("dev/null0", tarfile.CHRTYPE, "special file"),
    ("a/link.hea", tarfile.LNKTYPE, "outside the destination|link"),
])
def test_hostile_tar_members_are_refused_and_nothing_is_written(tmp_path, name, kind, why):
    tpath = tmp_path / "hostile.tar.gz"
    with tarfile.open(tpath, "w:gz") as t:
        ok = tarfile.TarInfo("ok.hea")
        ok.size = 12
        t.addfile(ok, io.BytesIO(b"ok 1 360 10\n"))
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.LNKTYPE:
            info.linkname = "../../outside"
        t.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    with pytest.raises(ArchiveError, match=why) as err:
        extract_archive(tpath, tmp_path / "work" / "out")
    assert name.lstrip("/") in str(err.value) or name in str(err.value)
    assert not (tmp_path / "evil.hea").exists() and not (tmp_path / "work" / "out").exists()
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_tar_links_and_size_limit_are_refused(tmp_path):
    tpath = tmp_path / "link.tar"
    with tarfile.open(tpath, "w") as t:
        info = tarfile.TarInfo("r.hea")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        t.addfile(info)
    with pytest.raises(ArchiveError, match="is a link"):
        extract_archive(tpath, tmp_path / "out")
    big = tmp_path / "big.tar"
    with tarfile.open(big, "w") as t:
        data = b"0" * 5000
        info = tarfile.TarInfo("r.dat")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    with pytest.raises(ArchiveError, match="over the limit"):
        extract_archive(big, tmp_path / "out2", max_bytes=1000)
    assert not (tmp_path / "out2").exists()


def test_not_an_archive(tmp_path):
    p = tmp_path / "x.zip"
    p.write_bytes(b"hello")
    with pytest.raises(ArchiveError, match="not a zip or tar"):
        extract_archive(p, tmp_path / "out")
