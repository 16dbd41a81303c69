"""``within(seconds, fn)``: a call that must finish in time (a regular expression that backtracks
for minutes fails the test instead of hanging the suite)."""

import signal
import threading


class Overran(AssertionError):
    """The call was still running at its deadline."""


def within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, interrupted by :class:`Overran` when still running after
    ``seconds``: by ``SIGALRM`` in the main thread (Python's ``re`` checks signals while it
    backtracks and holds the GIL meanwhile, so a watching thread could not step in); elsewhere
    run in a daemon thread that is left behind."""
    what = getattr(fn, "__name__", repr(fn))
    if threading.current_thread() is threading.main_thread():
        def overran(signum, frame):
            raise Overran(f"{what} still running after {seconds} s")
        previous = signal.signal(signal.SIGALRM, overran)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:      # noqa: BLE001 - re-raised in the caller
            out["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise Overran(f"{what} still running after {seconds} s")
    if "error" in out:
        raise out["error"]
    return out.get("value")
