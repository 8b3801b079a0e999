"""A run that ends with gloo work in flight leaves without a native abort.

Issue 21: once in two full suite runs, the 2-process `@mesh(pp=2)` run of
tests/test_expert_load_pipeline.py died with "terminate called without an active exception"
(SIGABRT, no Python trace). The cause, seen in a core dump's backtrace: a gloo worker thread
(`ProcessGroupGloo::runLoop`) dropping the last reference to a finished collective whose
tensor Python had already let go, during interpreter finalization; taking the GIL then ends
the thread (pthread_exit), and its unwinding through a noexcept destructor calls
std::terminate. A run's groups hang in reference cycles (device mesh, pipeline stages), so
without help they are destroyed by the collector inside finalization. The worker below forces
that state (queued all-reduces whose handles and tensors are dropped, the group in a cycle):
before the fix every run of it aborted (4 of 4 here); `leave_process_group` and the exit hook
now free the groups while the interpreter is whole.
"""

from __future__ import annotations

import pytest

from helpers.launch import torchrun, worker


@pytest.mark.slow
@pytest.mark.parametrize("garbage", ["before", "after"])
def test_leaving_with_gloo_work_in_flight_does_not_abort(garbage):
    result = torchrun(worker("gloo_teardown"), "300", garbage, timeout=180, env={"PYTHONFAULTHANDLER": "1"})
    output = result.stdout + result.stderr
    assert "terminate called" not in output, output[-4000:]
    assert result.returncode == 0, output[-4000:]
    assert output.count(" left") == 2, output[-4000:]  # both ranks reached the end of the program
