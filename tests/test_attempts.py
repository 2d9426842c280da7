"""The attempts of a trial (`srdit.runtime.attempts`): what the trial folder keeps, the child run's tags, and the
driver's line when a trial starts again."""

import json
import os
import time

from srdit.runtime import attempts


def test_a_lost_attempt_is_recorded_at_the_next_start_and_ended_at_the_folders_last_write(tmp_path):
    assert attempts.start(tmp_path) == 1
    t1 = attempts.read(tmp_path)[0].start
    last = tmp_path / "checkpoint.pt"
    last.write_bytes(b"x")
    os.utime(last, (t1 + 5, t1 + 5))  # the lost attempt's last write, 5 s after it started
    assert attempts.start(tmp_path) == 2
    a1, a2 = attempts.read(tmp_path)
    assert (a1.ended_by, a1.end) == (attempts.LOST, t1 + 5) and a2.end is None
    attempts.end(tmp_path, "finished", at=a2.start + 3)
    attempts.end(tmp_path, "ignored: attempt 2 has ended")
    tags = attempts.tags(tmp_path)
    assert tags == {
        "attempts": "2",
        "attempts.wall_s": f"{5 + 3:.1f}",
        "attempt.1.ended_by": attempts.LOST,
        "attempt.2.ended_by": "finished",
    }


def test_what_ended_an_attempt_when_someone_saw_it_and_the_driver_line(tmp_path):
    attempts.start(tmp_path)
    attempts.end(tmp_path, "lost by Ray: node 10.0.0.2 died")  # the driver, told by Tune
    attempts.start(tmp_path)
    attempts.end(tmp_path, "worker group failed: ActorDiedError")  # the data-parallel trial's own retry
    attempts.start(tmp_path)
    reported: dict[str, int] = {}
    lines = attempts.restart_lines(tmp_path, "1-s0-abc", reported)
    assert lines == [
        "  1-s0-abc: attempt 2 started (attempt 1: lost by Ray: node 10.0.0.2 died); it resumes from its checkpoint",
        "  1-s0-abc: attempt 3 started (attempt 2: worker group failed: ActorDiedError); it resumes from its checkpoint",
    ]
    assert attempts.restart_lines(tmp_path, "1-s0-abc", reported) == [] and reported == {"1-s0-abc": 3}
    assert attempts.restart_lines(tmp_path / "never-started", "x", reported) == []
    assert attempts.tags(tmp_path, now=time.time())["attempts"] == "3"


def test_a_torn_last_line_is_skipped(tmp_path):
    attempts.start(tmp_path)
    with open(tmp_path / attempts.ATTEMPTS, "a") as f:
        f.write(json.dumps({"event": "end", "attempt": 1, "t": 1.0, "ended_by": "x"})[:20])
    assert [a.n for a in attempts.read(tmp_path)] == [1] and attempts.read(tmp_path)[0].end is None
    assert attempts.start(tmp_path) == 2  # the next record starts a line of its own
    assert [(a.n, a.ended_by) for a in attempts.read(tmp_path)] == [(1, attempts.LOST), (2, "")]
