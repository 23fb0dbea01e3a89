"""The manager's log: text lines or JSON objects, with journald priorities when stderr is the journal.

Events that matter (learned, moved, expired, refused, network changed, re-attached) are logged with
`event()`: a message for people and the same facts as fields, which the JSON format
(`--log-format json`, or `log_format = "json"`) writes as one object per line for log shippers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

log = logging.getLogger("macnat")

# syslog priorities (sd-daemon(3)): what journald reads from a "<N>" prefix on each stderr line.
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def event(name: str, message: str, level: int = logging.INFO, **fields) -> None:
    """Log an event: `message` for people, `name` and `fields` for machines."""
    log.log(level, message, extra={"macnat_event": name, "macnat_fields": fields})


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device and inode of the stream it connected to stderr."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class TextFormatter(logging.Formatter):
    def __init__(self, journal: bool):
        # The journal stamps every line itself; a terminal gets the time.
        super().__init__("%(message)s" if journal else "%(asctime)s macnat: %(message)s", datefmt="%H:%M:%S")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journal:
            prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
            return "\n".join(prefix + line for line in text.splitlines())
        return text


class JsonFormatter(logging.Formatter):
    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
                 + f".{int(record.msecs):03d}", "level": record.levelname.lower(), "message": record.getMessage()}
        if getattr(record, "macnat_event", None):
            entry["event"] = record.macnat_event
            entry.update(record.macnat_fields)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        text = json.dumps(entry, default=str)
        return f"<{PRIORITY.get(record.levelno, 6)}>{text}" if self.journal else text


def setup(log_format: str = "text", verbose: bool = False) -> None:
    journal = stderr_is_journal()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(journal) if log_format == "json" else TextFormatter(journal))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
