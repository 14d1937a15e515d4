"""Throughput of the chat writer against a loopback chat-completions server with a fixed latency.

Run: `.venv/bin/python benchmarks/chat_writer_throughput.py [--latency-ms 20] [--items 400]`; prints items
per second with 16 concurrent requests and with 1. No network: the server listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from datamodules.perturb import Perturbation
from datamodules.writers import WRITTEN, ChatWriter

REPLY = ("<|Start of Question|>\nWhat colour is the belt the barber holds?\n<|End of Question|>\n"
         "<|Start of Answer|>\nThe question is unanswerable because there is no belt in the video.\n"
         "<|End of Answer|>")


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def start_server(latency: float) -> tuple[LoopbackServer, str]:
    message = {"role": "assistant", "content": REPLY}
    body = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(latency)  # the model's "thinking" time
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = LoopbackServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def items_per_second(base_url: str, concurrency: int, count: int) -> float:
    items = [Perturbation("object", "barber holding comb", f"barber holding belt {i}", "belt", {})
             for i in range(count)]
    # No cache: every item is a request.
    writer = ChatWriter(base_url, "bench", concurrency=concurrency, timeout=10)
    start = time.perf_counter()
    outcomes = writer.write_outcomes(items)
    elapsed = time.perf_counter() - start
    assert all(o.status == WRITTEN for o in outcomes), writer.stats
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=20.0, help="latency per request (default 20)")
    parser.add_argument("--items", type=int, default=400, help="items for the concurrent run (default 400)")
    args = parser.parse_args()
    server, url = start_server(args.latency_ms / 1000)
    try:
        items_per_second(url, 16, 32)  # warm-up
        concurrent = items_per_second(url, 16, args.items)
        serial = items_per_second(url, 1, max(20, args.items // 8))
    finally:
        server.shutdown()
        server.server_close()
    print(f"loopback server, {args.latency_ms:g} ms latency per request")
    print(f"  concurrency 16: {concurrent:7.1f} items/s")
    print(f"  concurrency  1: {serial:7.1f} items/s")
    print(f"  speed-up: {concurrent / serial:.1f}x (ideal {1000 / args.latency_ms * 16:.0f} items/s at 16)")


if __name__ == "__main__":
    main()
