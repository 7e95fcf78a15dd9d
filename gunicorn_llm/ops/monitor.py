"""The live monitor page: `GET /` and its static files under `/monitor/static/`.

A plain HTML page (static/monitor/index.html) whose script, static/monitor/monitor.js, polls `GET /metrics` (the
Prometheus text format, every worker's values) about once a second and draws, from the differences between polls,
tokens/s in and out, mean latency, requests and per-GPU utilization and memory, with the vendored chart library
uPlot (static/monitor/vendor/uplot/, MIT). No build step and no requests beyond this server: the page reads the same
numbers a Prometheus scraper reads, so it shows nothing the server does not already publish.
"""

from __future__ import annotations

from flask import Blueprint

monitor = Blueprint(
    "monitor", __name__, static_folder="static/monitor", static_url_path="/monitor/static"
)


@monitor.get("/")
def monitor_page():
    response = monitor.send_static_file("index.html")
    response.headers["Cache-Control"] = "no-cache"
    return response
