"""Thread settings for timing runs.  No numpy here: this must run before numpy loads."""

import os

TIMING_ENV = ("OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")


def configure_threads(threads: int) -> None:
    """Thread settings for timing; call before numpy or TVM's thread pool start.

    TVM's pool workers spin after each parallel region; interleaved with ORT,
    that spinning steals the cores ORT's next run needs (ORT's p90 doubled in
    our runs), and on 2 cores it slows lowbit itself.  A spin count of 0 makes
    the workers sleep at once.  (Untimed pauses between runners are no cure: on
    this VM a run after an idle gap is 2-6x slower for both runtimes.)  Values
    already set in the environment win.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")


def set_tvm_threads(threads: int) -> None:
    """Re-size TVM's thread pool in a running process (bench measures several thread counts)."""
    import tvm

    cores = os.sched_getaffinity(0)
    tvm.get_global_func("runtime.config_threadpool")(0, threads)
    # TVM pins the calling thread to one core as its worker 0, and a later call for more threads leaves
    # it there; OpenVINO sizes its pool by the calling thread's mask, so after a 1-thread round its
    # "2 threads" ran on one core.  The mask goes back; TVM's own workers keep theirs.
    os.sched_setaffinity(0, cores)
    os.environ["TVM_NUM_THREADS"] = str(threads)
