"""``lmtrain data fetch``: pinned SHA-256, atomic install, skip when present, mirror before network.

Most tests pin a table entry to the committed fixture (its hash computed here with hashlib), so
they run on every clone; the one marked ``needs_public_data`` installs the real tinyshakespeare.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from lmtrain import cli
from lmtrain.data import fetch as fetch_mod
from lmtrain.data.fetch import DATASETS, MIRROR_ENV, PublicFile, fetch, missing_hint
from lmtrain.errors import DataError
from tests.support.public_data import REPO, SHAKESPEARE_HEAD, needs_public_data, public_file

GOOD = SHAKESPEARE_HEAD.read_bytes()
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


@pytest.fixture
def tiny_entry(monkeypatch, tmp_path):
    """A table entry for the fixture text, its upstream a file:// URL (urllib, as for https)."""
    upstream = tmp_path / "upstream" / "input.txt"
    upstream.parent.mkdir()
    upstream.write_bytes(GOOD)
    spec = PublicFile(
        name="tiny-shakespeare-head",
        filename="tiny.txt",
        url=upstream.as_uri(),
        sha256=GOOD_SHA,
        size=len(GOOD),
        licence="public domain text",
        what="test fixture",
    )
    monkeypatch.setitem(DATASETS, spec.name, spec)
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    return spec


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_from_a_good_copy_installs_and_verifies(tiny_entry, tmp_path, capsys):
    copy = tmp_path / "copy.txt"
    copy.write_bytes(GOOD)
    out_dir = tmp_path / "data"
    code, out, err = run_cli(
        ["data", "fetch", tiny_entry.name, "--out", str(out_dir), "--from", str(copy)], capsys
    )
    assert code == 0, err
    assert (out_dir / "tiny.txt").read_bytes() == GOOD
    assert f"sha256 {GOOD_SHA} verified" in out
    assert leftovers(out_dir) == ["tiny.txt"]  # no temp file left behind


def test_a_corrupted_copy_is_refused_naming_both_hashes(tiny_entry, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(GOOD[:-1] + b"?")
    bad_sha = hashlib.sha256(bad.read_bytes()).hexdigest()
    out_dir = tmp_path / "data"
    code, _, err = run_cli(
        ["data", "fetch", tiny_entry.name, "--out", str(out_dir), "--from", str(bad)], capsys
    )
    assert code == 2
    assert bad_sha in err and GOOD_SHA in err and "nothing was written" in err
    assert leftovers(out_dir) == []


def test_present_and_matching_is_skipped(tiny_entry, tmp_path, monkeypatch):
    dest = fetch(tiny_entry.name, tmp_path, print_fn=lambda _: None)
    before = os.stat(dest)

    def no_copy(*a, **k):
        raise AssertionError("a present, matching file must not be fetched again")

    monkeypatch.setattr(fetch_mod, "install", no_copy)
    said = []
    assert fetch(tiny_entry.name, tmp_path, print_fn=said.append) == dest
    assert os.stat(dest).st_ino == before.st_ino and "present, sha256 matches" in said[0]


def test_a_different_file_in_place_is_kept_unless_forced(tiny_entry, tmp_path):
    dest = tmp_path / "tiny.txt"
    dest.write_bytes(b"my own notes")
    with pytest.raises(DataError, match="pass --force to replace it"):
        fetch(tiny_entry.name, tmp_path, print_fn=lambda _: None)
    assert dest.read_bytes() == b"my own notes"
    fetch(tiny_entry.name, tmp_path, force=True, print_fn=lambda _: None)
    assert dest.read_bytes() == GOOD


def test_a_failure_midway_leaves_no_partial_file(tiny_entry, tmp_path, monkeypatch):
    """The copy dies after writing half the bytes: neither the destination nor a temp file
    remains, and a good file already there is untouched."""

    def half_then_fail(src, fh):
        fh.write(GOOD[: len(GOOD) // 2])
        raise DataError("connection reset")

    monkeypatch.setattr(fetch_mod, "_copy_into", half_then_fail)
    with pytest.raises(DataError, match="connection reset"):
        fetch(tiny_entry.name, tmp_path / "data", print_fn=lambda _: None)
    assert leftovers(tmp_path / "data") == []

    dest = tmp_path / "kept" / "tiny.txt"
    dest.parent.mkdir()
    dest.write_bytes(b"other")
    with pytest.raises(DataError, match="connection reset"):
        fetch(tiny_entry.name, dest.parent, force=True, print_fn=lambda _: None)
    assert dest.read_bytes() == b"other" and leftovers(dest.parent) == ["tiny.txt"]


def test_download_from_the_url_when_no_mirror(tiny_entry, tmp_path):
    said = []
    dest = fetch(tiny_entry.name, tmp_path / "d", print_fn=said.append)
    assert dest.read_bytes() == GOOD and tiny_entry.url in said[0]


def test_the_mirror_is_read_before_the_network(tiny_entry, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tiny.txt").write_bytes(GOOD)
    monkeypatch.setenv(MIRROR_ENV, str(mirror))

    def offline(*a, **k):
        raise AssertionError("the network was tried although the mirror has the file")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dest = fetch(tiny_entry.name, tmp_path / "d", print_fn=lambda _: None)
    assert dest.read_bytes() == GOOD
    (mirror / "tiny.txt").write_bytes(b"tampered")  # a wrong mirror is an error, not a fallback
    with pytest.raises(DataError, match=GOOD_SHA):
        fetch(tiny_entry.name, tmp_path / "e", print_fn=lambda _: None)


def test_unreachable_url_says_how_to_fetch_offline(tiny_entry, tmp_path, monkeypatch):
    monkeypatch.setitem(
        DATASETS, tiny_entry.name, PublicFile(**{**tiny_entry.__dict__, "url": "http://[::1]:9/x"})
    )
    with pytest.raises(DataError, match=f"--from FILE, or set {MIRROR_ENV}"):
        fetch(tiny_entry.name, tmp_path / "d", print_fn=lambda _: None)
    assert leftovers(tmp_path / "d") == []


def test_the_table_pins_every_file_the_configs_read():
    configs = {
        "shakespeare_char.py": "tinyshakespeare",
        "sft_alpaca_lora.py": "alpaca-seed-tasks",
        "dpo_hh.py": "hh-rlhf-harmless",
    }
    for config, name in configs.items():
        text = (REPO / "configs" / config).read_text()
        assert f'"data/{DATASETS[name].filename}"' in text, config
        assert f"lmtrain data fetch {name}" in text, config
    for spec in DATASETS.values():
        assert len(spec.sha256) == 64 and spec.url.startswith("https://") and spec.licence


def test_a_missing_config_file_names_the_fetch_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here
    config = str(REPO / "configs" / "shakespeare_char.py")
    code, _, err = run_cli(["train", "--config", config, "--workdir", "runs/s"], capsys)
    assert code == 2
    assert "config.data.path='data/tinyshakespeare.txt' does not exist" in err
    assert "`lmtrain data fetch tinyshakespeare`" in err
    assert missing_hint("elsewhere/alpaca_seed_tasks.jsonl") == (
        "; get it with `lmtrain data fetch alpaca-seed-tasks --out elsewhere`"
    )
    assert missing_hint("notes.txt") == ""


@needs_public_data
def test_fetch_tinyshakespeare_from_a_copy_with_the_command(tmp_path):
    """Acceptance: ``lmtrain data fetch tinyshakespeare --from <copy>`` with the pinned hash."""
    copy = tmp_path / "input.txt"
    shutil.copyfile(public_file("tinyshakespeare"), copy)
    env = {k: v for k, v in os.environ.items() if k != MIRROR_ENV}
    run = subprocess.run(
        [sys.executable, "-m", "lmtrain", "data", "fetch", "tinyshakespeare", "--from", str(copy)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    got = (tmp_path / "data" / "tinyshakespeare.txt").read_bytes()
    assert len(got) == 1_115_394 and got.startswith(b"First Citizen:\nBefore we proceed")
    assert hashlib.sha256(got).hexdigest() == DATASETS["tinyshakespeare"].sha256
    assert got.startswith(GOOD)  # the committed fixture is its head
