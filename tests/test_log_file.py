"""The log file alone: appends that report what the disk refused instead of holding it."""

from __future__ import annotations

import errno
import os

from twisted.internet import task

from twistnet.log.logfile import LogFile

FULL = OSError(errno.ENOSPC, "No space left on device")


def test_a_refused_append_returns_every_line_and_the_error_and_holds_nothing(tmp_path):
    calls = []

    def half_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return os.write(fd, data[:3])
        raise FULL

    file = LogFile(str(tmp_path / "lines.log"), task.Clock(), writer=half_then_full)
    file.open()
    failed = file.append(b"one\ntwo\n")
    assert failed is not None
    assert (failed.data, failed.error) == (b"one\ntwo\n", FULL)
    assert (tmp_path / "lines.log").read_bytes() == b"", "the 3 bytes that went out were cut"
    assert file.bytes_written == 0
    file.close()
    assert file.closed


def test_a_burst_past_rotate_bytes_refused_midway_returns_the_rest_whole(tmp_path):
    outcomes = iter([None, FULL])

    def second_batch_fails(fd, data):
        error = next(outcomes, FULL)
        if error is not None:
            raise error
        return os.write(fd, data)

    file = LogFile(
        str(tmp_path / "lines.log"), task.Clock(), rotate_bytes=8, writer=second_batch_fails
    )
    file.open()
    failed = file.append(b"aaa\nbbb\nccc\nddd\n")
    assert failed is not None and failed.data == b"ccc\nddd\n"
    assert [open(p, "rb").read() for p in file.rotated_files()] == [b"aaa\nbbb\n"]
    assert (tmp_path / "lines.log").read_bytes() == b""
    assert file.append(b"eee\n") is not None, "still full: the caller decides when to retry"
    file.close()


def test_abandon_leaves_a_file_that_was_written_to(tmp_path):
    file = LogFile(str(tmp_path / "lines.log"), task.Clock())
    file.open()
    assert file.created
    assert file.append(b"kept\n") is None
    file.abandon()
    assert (tmp_path / "lines.log").read_bytes() == b"kept\n"
