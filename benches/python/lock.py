"""Python's multiprocessing.Lock on the S1/S2 figures of benches/shared.rs.

S1 lock_uncontended ns=   one acquire + release in one process, no contention
                          (median of 21 runs of 200 000 pairs).
S2 lock_pingpong us=      one round trip of lock handoffs between two processes:
                          three locks, the parent starts holding 0 and 1, the
                          child 2; at step s the parent releases s % 3 and
                          acquires (s + 2) % 3, the child acquires s % 3 and
                          releases (s + 2) % 3. One step of both is two handoffs
                          (median of 11 runs of 20 000 steps).

Usage: python3 benches/python/lock.py [reps]   (fork start method)
"""
import multiprocessing as mp
import statistics
import sys
import time

CTX = mp.get_context("fork")
now = time.perf_counter
PAIRS = 200_000
STEPS = 20_000


def emit(workload, name, key, values, fmt="{:.1f}"):
    med = statistics.median(values)
    print(f"{workload} {name} {key}={fmt.format(med)} reps={len(values)} "
          f"min={fmt.format(min(values))} max={fmt.format(max(values))}", flush=True)


def uncontended(lock):
    acquire, release = lock.acquire, lock.release
    t0 = now()
    for _ in range(PAIRS):
        acquire()
        release()
    return (now() - t0) / PAIRS * 1e9


def child(locks, ready):
    locks[2].acquire()
    ready.set()
    for s in range(STEPS):
        locks[s % 3].acquire()
        locks[(s + 2) % 3].release()


def pingpong():
    locks = [CTX.Lock() for _ in range(3)]
    ready = CTX.Event()
    locks[0].acquire()
    locks[1].acquire()
    p = CTX.Process(target=child, args=(locks, ready))
    p.start()
    if not ready.wait(30):
        p.kill()
        raise SystemExit("child never got ready")
    t0 = now()
    for s in range(STEPS):
        locks[s % 3].release()
        locks[(s + 2) % 3].acquire()
    dt = now() - t0
    p.join(30)
    return dt / STEPS * 1e6


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 21
    lock = CTX.Lock()
    uncontended(lock)
    emit("S1", "lock_uncontended", "ns", [uncontended(lock) for _ in range(reps)])
    pingpong()
    emit("S2", "lock_pingpong", "us", [pingpong() for _ in range(reps // 2 + 1)], "{:.2f}")


if __name__ == "__main__":
    main()
