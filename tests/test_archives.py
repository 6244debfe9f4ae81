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


def _read_all(members, names, out) -> None:
    try:
        out.put(all(members.read(n) == bytes([i % 251]) * 40_000 for i, n in enumerate(names)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test with it
        out.put(f"{type(exc).__name__}: {exc}")


def test_zip_members_read_right_in_a_forked_child_while_the_parent_reads(tmp_path):
    # A driver that had read the archive forked its local workers: parent and child shared one file offset, and
    # records failed at random ("invalid distance too far back"). The child opens the archive again.
    import multiprocessing
    import os
    import random

    from ecg_pipeline.pipeline.archives import ZipMembers

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    archive = tmp_path / "a.zip"
    names = [f"m{i:03d}.dat" for i in range(200)]
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for i, n in enumerate(names):
            z.writestr(n, bytes([i % 251]) * 40_000)
    members = ZipMembers(archive, tmp_path / "out")
    assert members.read(names[0]) == bytes([0]) * 40_000  # the parent's handle is open before the fork
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    children = [ctx.Process(target=_read_all, args=(members, names, out)) for _ in range(2)]
    for c in children:
        c.start()
    order = list(enumerate(names))
    for _ in range(3):  # the parent reads too, meanwhile, in another order
        random.Random(os.getpid()).shuffle(order)
        assert all(members.read(n) == bytes([i % 251]) * 40_000 for i, n in order)
    got = [out.get(timeout=60) for _ in children]
    for c in children:
        c.join(timeout=60)
    assert got == [True, True]
