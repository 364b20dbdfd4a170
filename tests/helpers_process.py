"""Child processes for tests that may leave workers behind: each runs in its own session, so a timeout kills them all."""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Any, List


def run_in_own_session(cmd: List[str], timeout: float, **popen_kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)``, but a timeout SIGKILLs the child's whole session
    (its data-loading workers too) before ``TimeoutExpired`` is raised."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
