#!/usr/bin/env python3
"""A minimal crash-restart supervisor: the native baseline of bench/recovery.

    bench/native_supervisor.py [--events FILE] [--restart-delay-ms MS]
        [--probe-port PORT [--probe-path PATH] [--probe-interval-ms MS] [--probe-timeout-ms MS]]
        -- COMMAND [ARGS...]

Runs COMMAND and starts it again whenever it exits, as a process supervisor
(systemd's Restart=always, runit, a shell `until` loop) would, immediately unless
--restart-delay-ms is given. With --probe-port it also acts as a liveness watchdog: every
--probe-interval-ms it sends `GET PATH HTTP/1.1` to 127.0.0.1:PORT on a fresh connection,
and a server that accepts the connection but gives no complete status line within
--probe-timeout-ms is killed (SIGKILL) and restarted, which is how a hung server is
recovered natively. A refused connection (the server is starting) is not a failure.

COMMAND's stdin is /dev/null and its stdout and stderr are the supervisor's. With
--events FILE, one JSON object per line is appended: {"event": "start", "time", "pid"},
{"event": "exit", "time", "pid", "status" | "signal", "signal_name"}, {"event":
"hang-kill", "time", "pid"}. SIGTERM or SIGINT stops COMMAND (SIGTERM, then SIGKILL after
2 s) and the supervisor exits 0.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


class Supervisor:
    def __init__(self, args):
        self.args = args
        self.cmd = args.command
        self.events = open(args.events, "a", buffering=1) if args.events else None
        self.lock = threading.RLock()
        self.child = None
        self.stopping = threading.Event()

    def event(self, kind, **fields):
        if self.events is None:
            return
        line = json.dumps({"event": kind, "time": time.time(), **fields})
        with self.lock:
            self.events.write(line + "\n")

    def start(self):
        child = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL)
        with self.lock:
            self.child = child
        self.event("start", pid=child.pid)
        return child

    def run(self):
        if self.args.probe_port:
            threading.Thread(target=self.probe_loop, daemon=True).start()
        while not self.stopping.is_set():
            child = self.start()
            status = child.wait()
            if status < 0:
                sig = -status
                try:
                    name = signal.Signals(sig).name
                except ValueError:
                    name = f"signal {sig}"
                self.event("exit", pid=child.pid, signal=sig, signal_name=name)
            else:
                self.event("exit", pid=child.pid, status=status)
            if self.stopping.is_set():
                break
            if self.args.restart_delay_ms:
                time.sleep(self.args.restart_delay_ms / 1000)
        return 0

    def stop(self, *_):
        # A signal handler: the main thread is in child.wait(), so only signal here; the
        # main loop reaps. SIGKILL follows after 2 s if SIGTERM was not enough.
        self.stopping.set()
        with self.lock:
            child = self.child
        if child is None or child.returncode is not None:
            return
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def escalate():
            if child.returncode is None:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        t = threading.Timer(2.0, escalate)
        t.daemon = True
        t.start()

    def probe_once(self):
        """True: alive (or not listening yet); False: accepted but did not answer in time."""
        timeout = self.args.probe_timeout_ms / 1000
        try:
            s = socket.create_connection(("127.0.0.1", self.args.probe_port), timeout=timeout)
        except OSError:
            return True  # refused or not yet listening: starting, not hung
        try:
            s.settimeout(timeout)
            s.sendall(
                f"GET {self.args.probe_path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n".encode()
            )
            deadline = time.monotonic() + timeout
            got = b""
            while b"\r\n" not in got:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                s.settimeout(left)
                chunk = s.recv(4096)
                if not chunk:
                    return True  # closed: a dying server, the restart loop handles it
                got += chunk
            return True
        except socket.timeout:
            return False
        except OSError:
            return True
        finally:
            s.close()

    def probe_loop(self):
        while not self.stopping.is_set():
            time.sleep(self.args.probe_interval_ms / 1000)
            with self.lock:
                child = self.child
            if child is None or child.poll() is not None:
                continue
            if not self.probe_once():
                with self.lock:
                    same = self.child is child
                if same and child.poll() is None and not self.stopping.is_set():
                    self.event("hang-kill", pid=child.pid)
                    child.kill()


def main():
    p = argparse.ArgumentParser(
        description="Restart COMMAND whenever it exits (and kill it when it hangs, with --probe-port)."
    )
    p.add_argument("--events", help="append JSON-line events here")
    p.add_argument("--restart-delay-ms", type=float, default=0.0)
    p.add_argument("--probe-port", type=int, default=0)
    p.add_argument("--probe-path", default="/")
    p.add_argument("--probe-interval-ms", type=float, default=50.0)
    p.add_argument("--probe-timeout-ms", type=float, default=200.0)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("no COMMAND (give it after --)")
    sup = Supervisor(args)
    signal.signal(signal.SIGTERM, sup.stop)
    signal.signal(signal.SIGINT, sup.stop)
    sys.exit(sup.run())


if __name__ == "__main__":
    main()
