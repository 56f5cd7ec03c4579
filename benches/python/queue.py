"""Python peer of `cargo bench --bench queue`: multiprocessing.Queue, fork context.

Q1 1 producer process -> 1 consumer (the parent), 1 M ints, messages/s.
Q2 4 producer processes -> 4 consumer processes, 1 M ints in all, messages/s.
Q3 1 producer process -> the parent, 256 messages of 1 MiB (bytes), MB/s (1e6 bytes).
Lines as ../../../shared/anchors/common.py prints them. Usage: python3 queue.py [reps]
"""
import os
import sys

# This file is named queue.py, as its Rust peer: keep its directory off the
# import path, or `multiprocessing` would import it instead of the standard
# `queue` module.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import multiprocessing as mp  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

CTX = mp.get_context("fork")
now = time.perf_counter
MIB = 1 << 20


def emit(workload, name, key, values, fmt="{:.1f}"):
    med = statistics.median(values)
    print(f"{workload} {name} {key}={fmt.format(med)} reps={len(values)} "
          f"min={fmt.format(min(values))} max={fmt.format(max(values))}", flush=True)


def produce(q, start, n):
    for i in range(start, start + n):
        q.put(i)


def consume_until_none(q, out):
    got = 0
    while q.get() is not None:
        got += 1
    out.put(got)


def produce_bytes(q, n):
    payload = bytes(MIB)
    for _ in range(n):
        q.put(payload)


def q1(reps):
    n = 1_000_000
    rates = []
    for _ in range(reps):
        q = CTX.Queue()
        t0 = now()
        p = CTX.Process(target=produce, args=(q, 0, n))
        p.start()
        for i in range(n):
            assert q.get() == i
        dt = now() - t0
        p.join()
        rates.append(n / dt)
    emit("Q1", "queue_small_msgs", "queue_small_msgs_per_s", rates, "{:.0f}")


def q2(reps):
    n, k = 1_000_000, 4
    rates = []
    for _ in range(reps):
        q, out = CTX.Queue(), CTX.Queue()
        t0 = now()
        cons = [CTX.Process(target=consume_until_none, args=(q, out)) for _ in range(k)]
        prods = [CTX.Process(target=produce, args=(q, j * (n // k), n // k)) for j in range(k)]
        for p in cons + prods:
            p.start()
        for p in prods:
            p.join()
        for _ in range(k):
            q.put(None)
        total = sum(out.get() for _ in range(k))
        dt = now() - t0
        for p in cons:
            p.join()
        assert total == n
        rates.append(n / dt)
    emit("Q2", "queue_4x4", "queue_4x4_msgs_per_s", rates, "{:.0f}")


def q3(reps):
    n = 256
    rates = []
    for _ in range(reps):
        q = CTX.Queue()
        t0 = now()
        p = CTX.Process(target=produce_bytes, args=(q, n))
        p.start()
        for _ in range(n):
            assert len(q.get()) == MIB
        dt = now() - t0
        p.join()
        rates.append(n * MIB / 1e6 / dt)
    emit("Q3", "queue_1MiB", "queue_1MiB_MB_per_s", rates)


if __name__ == "__main__":
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    q1(reps)
    q2(reps)
    q3(reps)
