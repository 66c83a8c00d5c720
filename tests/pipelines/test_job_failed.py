"""How a job the runner reports failed is worded: the runner's short reason out of Beam's message
(PortableRunner: "Pipeline <job> failed in state FAILED: <the worker's traceback>"), and the
job errors Beam logs while waiting, shown only with debug logging (`remap -v`). The whole path,
a killed SDK worker through `remap embed`, is tests/pipelines/test_pipeline_worker_killed.py."""

from __future__ import annotations

import logging
import threading

from pipelines.launch import JobFailed, job_failed, quiet_runner_errors, runner_reason

# the text Beam 2.77's PortableRunner raised for a killed SDK worker (traceback shortened)
KILLED_WORKER = """Pipeline job-2f1c failed in state FAILED: Traceback (most recent call last):
  File ".../apache_beam/runners/worker/data_plane.py", line 591, in input_elements
    element = received.get(timeout=1)
_queue.Empty

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File ".../apache_beam/runners/worker/data_plane.py", line 594, in input_elements
    raise RuntimeError('Channel closed prematurely.')
RuntimeError: Channel closed prematurely.
"""


def test_the_reason_is_the_workers_last_exception_line():
    assert runner_reason(RuntimeError(KILLED_WORKER)) == \
        "RuntimeError: Channel closed prematurely."


def test_a_reason_without_a_traceback_is_its_first_line_and_a_long_one_is_cut():
    assert runner_reason("Pipeline job-1 failed in state FAILED: unknown error") == \
        "unknown error"
    assert runner_reason("Workflow failed.\nCauses: step 3 ...") == "Workflow failed."
    long = runner_reason("x" * 500)
    assert len(long) == 200 and long.endswith("...")
    assert runner_reason("Pipeline job-1 failed in state FAILED: ") == "no reason given"


def test_the_error_says_what_failed_what_is_left_and_what_to_do_and_exits_1():
    e = job_failed("the job of run r1", "RuntimeError: boom", "nothing of it was published")
    assert isinstance(e, JobFailed) and e.exit_status == 1
    assert str(e) == ("the job of run r1 failed on the runner (RuntimeError: boom); nothing of "
                      "it was published; run the same command again to finish the work")


def _log_from_beams_message_thread(text: str) -> None:
    t = threading.Thread(target=logging.log, args=(logging.ERROR, "%s", text),
                         name="wait_until_finish_read")
    t.start()
    t.join()


def test_beams_logged_job_errors_show_only_with_debug_logging(caplog):
    root = logging.getLogger()
    level = root.level
    try:
        for debug, shown in ((False, 0), (True, 1)):
            root.setLevel(logging.DEBUG if debug else logging.WARNING)
            caplog.clear()
            with quiet_runner_errors():
                _log_from_beams_message_thread(KILLED_WORKER)
                logging.error("an error of remap's own")      # other threads: unchanged
            texts = [r.getMessage() for r in caplog.records]
            assert texts.count(KILLED_WORKER) == shown and "an error of remap's own" in texts
        caplog.clear()
        root.setLevel(logging.WARNING)
        _log_from_beams_message_thread(KILLED_WORKER)     # outside a wait: unchanged
        assert [r.getMessage() for r in caplog.records] == [KILLED_WORKER]
    finally:
        root.setLevel(level)
