"""What a server says about itself over HTTP: whether it may join, whether it is healthy, what it has in flight.

Every call is bounded by `timeout_s`; an unreachable or silent server is an answer too (a reason, or None).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

IN_FLIGHT_METRICS = ("llm_requests_running", "llm_requests_waiting")
# Straight to the server: an http_proxy in the environment is for the outside world, not for the cluster's nodes.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout_s: float) -> tuple[int, bytes]:
    try:
        with _opener.open(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def unhealthy(base_url: str, timeout_s: float) -> str | None:
    """Why the server's `/ready` is not 200 (unreachable, too slow, 503 ...); None when it is."""
    try:
        status, body = _get(f"{base_url}/ready", timeout_s)
    except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut short
        return f"/ready: {getattr(error, 'reason', error)}"
    if status != 200:
        return f"/ready answered {status}: {body[:200].decode(errors='replace')}"
    return None


def not_ready_to_join(base_url: str, timeout_s: float) -> str | None:
    """Why the server may not join yet; None once `/ready` is 200 and every worker has loaded its model (`/workers`),
    so that no request sent to it waits for a model still loading."""
    reason = unhealthy(base_url, timeout_s)
    if reason is not None:
        return reason
    try:
        status, body = _get(f"{base_url}/workers", timeout_s)
        counts = json.loads(body)
    except (OSError, http.client.HTTPException, ValueError) as error:
        return f"/workers: {getattr(error, 'reason', error)}"
    if status != 200 or counts.get("loaded", 0) < counts.get("workers", 1):
        return f"{counts.get('loaded')} of {counts.get('workers')} workers loaded"
    return None


def in_flight(base_url: str, timeout_s: float) -> int | None:
    """Generation requests the server is running or holding (all workers, from `/metrics`); None if it cannot say."""
    try:
        status, body = _get(f"{base_url}/metrics", timeout_s)
    except (OSError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    try:
        return round(sum(sample.value for family in text_string_to_metric_families(body.decode(errors="replace"))
                         if family.name in IN_FLIGHT_METRICS for sample in family.samples))
    except ValueError:  # not Prometheus' text format: something else answers there
        return None
