"""A small HTTP server on 127.0.0.1 for the download tests: serves named files with HTTP Range support,
records every request, and misbehaves on demand, one fault per request, in order:

- "404": answers 404 Not Found;
- "cut:N": promises the whole rest of the file (its Content-Length) but sends N bytes and closes;
- "stall": sends the headers and 16 bytes, then nothing until the server stops;
- "truncate:N": serves only the first N bytes as if they were the whole file;
- "norange": ignores a Range header (answers 200 with the whole file).

    with WeightsServer({"a.pth": data}) as server:
        server.faults["a.pth"] = ["cut:100"]
        url = server.url  # http://127.0.0.1:PORT/
"""

import http.server
import re
import threading
from typing import Dict, List


class WeightsServer:
    def __init__(self, files: Dict[str, bytes]):
        self.files = dict(files)
        self.faults: Dict[str, List[str]] = {}
        self.requests: List[tuple] = []  # (name, Range header or None)
        self._release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                outer.requests.append((name, self.headers.get("Range")))
                queue = outer.faults.get(name) or []
                fault = queue.pop(0) if queue else ""
                data = outer.files.get(name)
                if data is None or fault == "404":
                    self.send_error(404, "Not Found")
                    return
                if fault.startswith("truncate:"):
                    data = data[:int(fault.split(":")[1])]
                start = 0
                ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if ranged and fault != "norange":
                    start = int(ranged.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                if fault.startswith("cut:") or fault == "stall":
                    self.send_header("Connection", "close")
                self.end_headers()
                if fault.startswith("cut:"):
                    self.wfile.write(body[:int(fault.split(":")[1])])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if fault == "stall":
                    self.wfile.write(body[:16])
                    self.wfile.flush()
                    outer._release.wait(30)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def __enter__(self) -> "WeightsServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
