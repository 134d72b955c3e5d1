"""What the soak's main process reads of the broker from outside: its log and
stderr, its /metrics and its /proc entry, each read the same way at every sample."""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import urllib.request

LEVELS = ("warn", "error", "critical")


class LogWatch:
    """Reads the broker's JSON log as it grows; keeps warn/error/critical lines, deduplicated."""

    def __init__(self, path: str, stderr_path: str) -> None:
        self.path, self.stderr_path = path, stderr_path
        self._offset = self._err_offset = 0
        self.levels = collections.Counter()
        self.lines = collections.Counter()     # (level, normalized message) -> count
        self.examples = {}
        self.stderr_lines = collections.Counter()

    @staticmethod
    def normalize(text: str) -> str:
        text = re.sub(r"0x[0-9a-f]+", "0x#", text)
        text = re.sub(r"\d+(\.\d+)?", "#", text)
        return text[:300]

    def read(self) -> dict:
        new = collections.Counter()
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk[:chunk.rfind("\n") + 1]
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"level": "error", "message": "unparsable log line: " + line[:200]}
            level = record.get("level") or "?"
            self.levels[level] += 1
            if level in LEVELS:
                message = record.get("message") or ""
                if record.get("failure"):
                    message += " | " + record["failure"].strip().splitlines()[-1]
                key = (level, record.get("namespace"), self.normalize(message))
                self.lines[key] += 1
                self.examples.setdefault(key, record)
                new[level] += 1
        if os.path.exists(self.stderr_path):
            with open(self.stderr_path, encoding="utf-8", errors="replace") as handle:
                handle.seek(self._err_offset)
                text = handle.read()
            self._err_offset += len(text.encode("utf-8"))
            for line in text.splitlines():
                if line.strip():
                    self.stderr_lines[self.normalize(line.strip())] += 1
                    new["stderr"] += 1
        return dict(new)


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
METRIC_NAMES = ("broker_ssp_sessions", "broker_websocket_clients", "broker_longpoll_waiters",
                "broker_devices_known", "broker_devices_online", "broker_feed_cursor",
                "broker_process_open_fds", "broker_process_resident_memory_bytes",
                "broker_http_requests_total", "broker_ssp_datagrams_dropped_total",
                "broker_registry_events_total", "broker_ssp_new_sessions_total")


def scrape(port: int) -> dict:
    """The /metrics series of METRIC_NAMES, as {name{labels}: value} ({} if it failed:
    the broker did not answer within 30 s, which the sample then shows)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
    except OSError as problem:
        print(f"soak: /metrics not answered: {problem}", file=sys.stderr)
        return {"scrape_failed": 1}
    out = {}
    for line in text.splitlines():
        found = METRIC_LINE.match(line)
        if found and found.group(1) in METRIC_NAMES:
            out[found.group(1) + (found.group(2) or "")] = float(found.group(3))
    return out


def proc_status(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                fields[name] = int(value.split()[0]) * (1024 if name != "Threads" else 1)
    fields["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return fields
