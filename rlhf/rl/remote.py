"""A reward computed in another process or on another machine (`rewards.functions: [{url: ...}]`), and the small
server that puts any reward function behind such a URL (`rlhf serve-reward`).

The request is OpenRLHF's remote reward convention (`--remote_rm_url`), with TRL's arguments beside it: one POST of
JSON per call,

    {"query": [prompt + completion text], "prompts": [...], "completions": [...], "labels": [...], <column>: [...]}

(`labels`: the data's `answer` or `label` column when it has one; every extra column by its name), and the answer is
`{"rewards": [one number or null per sample]}` (or the bare list). A call goes through the grader like any function
(rlhf/rl/grading.py: chunks, workers, timeout, retries, failure rate); an HTTP error or a reply of the wrong shape is a
failed call. DVC cannot see the code behind a URL: put its version in the URL or in a param so that a new grader
reruns step 3.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _text(value: Any) -> str:
    """A prompt or completion as text: a string, or a message list's contents joined."""
    if isinstance(value, str):
        return value
    return "\n".join(str(m.get("content", "")) for m in value)


class RemoteReward:
    """A reward function with TRL's signature that POSTs its batch to `url` (OpenRLHF's remote reward convention)."""

    def __init__(self, url: str, timeout_s: float = 0.0):
        self.url = url
        self.timeout_s = timeout_s or 300.0  # the socket's own limit; rewards.timeout_s bounds the call itself
        self.__name__ = "remote"

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        body = {"query": [_text(p) + _text(c) for p, c in zip(prompts, completions)],
                "prompts": prompts, "completions": completions, **columns}
        label = columns.get("answer", columns.get("label"))
        if label is not None:
            body["labels"] = label
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                answer = json.loads(reply.read())
        except urllib.error.HTTPError as err:
            raise ConnectionError(f"{self.url} answered HTTP {err.code}: {err.read()[:200].decode(errors='replace')}"
                                  ) from None
        except (urllib.error.URLError, OSError) as err:
            raise ConnectionError(f"{self.url} is unreachable ({getattr(err, 'reason', err)})") from None
        except json.JSONDecodeError:
            raise ValueError(f"{self.url} did not answer JSON") from None
        rewards = answer.get("rewards") if isinstance(answer, dict) else answer
        if not isinstance(rewards, list):
            raise ValueError(f"{self.url} answered {str(answer)[:120]}, not {{\"rewards\": [...]}}")
        return rewards


def reward_server(score: Callable[[list[Any], list[Any], list[dict]], list[float | None]], host: str,
                  port: int) -> ThreadingHTTPServer:
    """An HTTP server (not started) that answers each POST with {"rewards": score(prompts, completions, columns)};
    a bad request or a failing function answers 400 / 500 with the reason."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompts, completions = body["prompts"], body["completions"]
            except (ValueError, KeyError, TypeError) as err:
                return self._send(400, {"error": f"expected JSON with prompts and completions ({err})"})
            skip = {"query", "prompts", "completions", "labels"}
            names = [k for k in body if k not in skip]
            columns = [{k: body[k][i] for k in names} for i in range(len(completions))]
            try:
                rewards = score(prompts, completions, columns)
            except Exception as err:  # the function's failure: the client counts a failed call
                return self._send(500, {"error": f"{type(err).__name__}: {err}"})
            return self._send(200, {"rewards": rewards})

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:  # quiet: one line per request would drown the log
            pass

    return ThreadingHTTPServer((host, port), Handler)


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Serve in a daemon thread (tests); server.shutdown() stops it."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread
