"""Exports Prometheus metrics, when the settings ask for them: a file for node_exporter's textfile
collector (written atomically every TEXTFILE_INTERVAL, removed when the manager stops, so a stopped
service exports nothing stale) and/or a listener (`metrics.listen`, e.g. 127.0.0.1:9877).

prometheus_client is imported only then: a manager without metrics stays as small as before.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from macnat.manager import events
from macnat.manager.duties import Duty

log = logging.getLogger("macnat")
TEXTFILE_INTERVAL = 15.0   # node_exporter's default scrape interval


class Metrics(Duty):
    def __init__(self):
        self.registry = None
        self.textfile: Path | None = None
        self.next_write: float | None = None
        self.server = None
        self.listening: str | None = None

    def handle(self, event, state) -> None:
        if isinstance(event, (events.Started, events.Reloaded)):
            self.configure(state)
        elif isinstance(event, events.Stopping):
            if self.textfile is not None:
                self.textfile.unlink(missing_ok=True)
            self.close()

    def configure(self, state) -> None:
        settings = state.settings
        if (settings.metrics_textfile or settings.metrics_listen) and self.registry is None:
            from prometheus_client import CollectorRegistry

            from macnat.metrics import AttachmentCollector

            self.registry = CollectorRegistry(auto_describe=True)
            self.registry.register(AttachmentCollector(state))
        new_textfile = Path(settings.metrics_textfile) if settings.metrics_textfile else None
        if self.textfile is not None and new_textfile != self.textfile:
            self.textfile.unlink(missing_ok=True)
        self.textfile = new_textfile
        self.next_write = time.monotonic() if self.textfile else None
        if settings.metrics_listen != self.listening:
            self.stop_listening()
            if settings.metrics_listen:
                self.listen(settings.metrics_listen)

    def listen(self, address: str) -> None:
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        try:
            self.server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        except OSError as exc:
            log.error("cannot serve metrics on %s: %s", address, exc.strerror)
            return
        self.listening = address
        log.info("serving Prometheus metrics on http://%s/metrics", address)

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.server, self.listening = None, None

    def due(self) -> float | None:
        return self.next_write

    def on_timer(self, now: float, state) -> None:
        from prometheus_client import write_to_textfile

        self.next_write = now + TEXTFILE_INTERVAL
        try:
            self.textfile.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(self.textfile), self.registry)  # a temporary file, then a rename
        except OSError as exc:
            log.error("cannot write the metrics to %s: %s", self.textfile, exc.strerror)

    def close(self) -> None:
        self.stop_listening()
        self.next_write = None
