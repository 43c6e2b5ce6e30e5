"""Thread settings for timing runs.  No numpy here: this must run before numpy loads."""

import os

# yields a TVM pool worker makes before it sleeps: 0 woke a worker per kernel (DeiT-tiny, 2 threads: 10.6 ms);
# 100 9.9, 1000 8.3, 10,000 8.2, TVM's 300,000 8.2 (Xeon, medians of alternated 3 s runs)
SPIN_COUNT = 1000
TIMING_ENV = ("OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")


def configure_threads(threads: int) -> None:
    """Thread settings for timing; call before numpy or TVM's thread pool start.

    TVM's pool workers spin (sched_yield) after each parallel region before they
    sleep: by default 300,000 times, which interleaved with ORT stole the cores
    ORT's next run needs (ORT's p90 doubled in our runs).  With no spin at all,
    every kernel of an inference wakes a sleeping worker (a futex round trip):
    DeiT-tiny's 2-thread run took 11.4 ms against 9.0 with ``SPIN_COUNT`` spins,
    which bridge the gap between one kernel and the next and end well within the
    untimed call bench makes before each sample; ORT's and OpenVINO's times beside
    it did not move (Xeon, interleaved, one run).  Values already set in the
    environment win.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(SPIN_COUNT))


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
