-- wrk script for the POST benchmark: submit the harmless built-in echo job on every request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"tool": "echo", "params": {"text": "benchmark"}}'
