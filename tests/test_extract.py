import io
import stat
import tarfile
import zipfile

import pytest

from storage.extract import UnsafeArchive, unpack


def make_zip(path, entries):
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            archive.writestr(info, payload)
    return path


def make_tar(path, members):
    with tarfile.open(path, "w") as archive:
        for member, payload in members:
            archive.addfile(member, io.BytesIO(payload) if payload else None)
    return path


@pytest.mark.parametrize("name", ["../evil.txt", "images/../../evil.txt", "/etc/evil.txt", "C:\\evil.txt"])
def test_entry_outside_the_target_is_refused_and_nothing_written(tmp_path, name):
    archive = make_zip(tmp_path / "bad.zip", [("ok.txt", b"fine", 0o100644), (name, b"x", 0o100644)])
    with pytest.raises(UnsafeArchive, match=f"bad.zip: entry {name!r}".replace("\\", "\\\\")):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "ok.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_zip_symlink_is_refused(tmp_path):
    archive = make_zip(tmp_path / "link.zip", [("link", b"/etc/passwd", stat.S_IFLNK | 0o777)])
    with pytest.raises(UnsafeArchive, match="'link' is a symbolic link"):
        unpack(archive, tmp_path / "out")


def test_tar_device_and_link_entries_are_refused(tmp_path):
    device = tarfile.TarInfo("dev/null-ish")
    device.type = tarfile.CHRTYPE
    with pytest.raises(UnsafeArchive, match="'dev/null-ish' is a device"):
        unpack(make_tar(tmp_path / "dev.tar", [(device, None)]), tmp_path / "out")
    link = tarfile.TarInfo("escape")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    with pytest.raises(UnsafeArchive, match="'escape' is a link"):
        unpack(make_tar(tmp_path / "link.tar", [(link, None)]), tmp_path / "out")


def test_good_archives_unpack_once(tmp_path):
    archive = make_zip(tmp_path / "good.zip", [("images/a.jpg", b"a", 0o100644)])
    assert unpack(archive, tmp_path / "out") is True
    assert (tmp_path / "out" / "images" / "a.jpg").read_bytes() == b"a"
    assert unpack(archive, tmp_path / "out") is False  # marker: already unpacked
    member = tarfile.TarInfo("flickr30k-images/1.jpg")
    member.size = 3
    assert unpack(make_tar(tmp_path / "images.tar", [(member, b"abc")]), tmp_path / "tar")
    assert (tmp_path / "tar" / "flickr30k-images" / "1.jpg").read_bytes() == b"abc"
