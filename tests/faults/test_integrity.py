"""prefopt.integrity: a folder's manifest and a file's sidecar catch every kind of damage, and only damage."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from prefopt.integrity import (
    MANIFEST_NAME, checksum_path, sha256_file, verify_checksum, verify_manifest, write_checksum, write_manifest,
)


def flip_bit(path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "step-0000003"
    (d / "sub").mkdir(parents=True)
    (d / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (d / "state.json").write_text('{"step": 3}\n')
    (d / "sub" / "part.bin").write_bytes(b"\x00" * 100)
    return d


def test_sha256_file_is_hashlib_over_the_bytes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 5_000_000)  # more than one read
    assert sha256_file(path) == hashlib.sha256(b"abc" * 5_000_000).hexdigest()


def test_a_whole_folder_verifies(folder):
    write_manifest(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == ["state.json", "sub/part.bin", "weights.bin"]
    assert manifest["files"]["weights.bin"] == {"sha256": sha256_file(folder / "weights.bin"), "bytes": 10240}
    assert verify_manifest(folder) == []


def test_a_flipped_bit_is_found(folder):
    write_manifest(folder)
    flip_bit(folder / "weights.bin", 1000)
    assert verify_manifest(folder) == ["weights.bin has a different sha256 than when it was written"]


def test_a_truncated_file_is_found(folder):
    write_manifest(folder)
    truncate(folder / "sub" / "part.bin", 10)
    assert verify_manifest(folder) == ["sub/part.bin has 10 bytes, expected 100"]


def test_a_missing_file_and_a_missing_manifest_are_found(folder):
    assert verify_manifest(folder) == [f"no {MANIFEST_NAME}"]
    write_manifest(folder)
    (folder / "state.json").unlink()
    assert verify_manifest(folder) == ["state.json is missing"]


def test_an_unreadable_manifest_is_a_problem(folder):
    (folder / MANIFEST_NAME).write_text('{"files": {"weights.bin": ')  # torn
    assert verify_manifest(folder) == [f"{MANIFEST_NAME} is unreadable (JSONDecodeError)"]


def test_an_extra_file_is_found_when_the_manifest_lists_the_whole_folder(folder):
    write_manifest(folder)
    (folder / "stray.pt").write_bytes(b"x")
    assert verify_manifest(folder) == [f"stray.pt is not in {MANIFEST_NAME}"]


def test_a_chosen_list_covers_only_those_files(folder):
    write_manifest(folder, names=["weights.bin"])
    assert sorted(json.loads((folder / MANIFEST_NAME).read_text())["files"]) == ["weights.bin"]
    (folder / "state.json").write_text("changed")  # not listed: not checked
    (folder / "stray.pt").write_bytes(b"x")
    assert verify_manifest(folder) == []
    flip_bit(folder / "weights.bin")
    assert len(verify_manifest(folder)) == 1


def test_rewriting_the_manifest_leaves_no_temporary_file(folder):
    write_manifest(folder)
    write_manifest(folder)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert verify_manifest(folder) == []


def test_a_file_checksum_round_trips_and_catches_damage(tmp_path):
    path = tmp_path / "cache.safetensors"
    path.write_bytes(b"\x01\x02" * 1000)
    assert verify_checksum(path) == f"no checksum file {path.name}.sha256"
    sidecar = write_checksum(path)
    assert sidecar == checksum_path(path) == tmp_path / "cache.safetensors.sha256"
    assert verify_checksum(path) is None
    flip_bit(path, 7)
    assert verify_checksum(path) == "has a different sha256 than when it was written"
    write_checksum(path)
    truncate(path, 100)
    assert verify_checksum(path) == "has a different sha256 than when it was written"
    path.unlink()
    assert verify_checksum(path) == "is missing"


def test_a_damaged_sidecar_is_a_problem(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{}")
    checksum_path(path).write_text("")
    assert verify_checksum(path) == "checksum file plan.json.sha256 is unreadable (IndexError)"


def test_the_sidecar_is_sha256sum_format(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"hello")
    write_checksum(path)
    result = subprocess.run(["sha256sum", "-c", checksum_path(path).name], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
