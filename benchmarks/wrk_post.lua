-- wrk script for the POST benchmark: every request submits a job of the built-in sleep tool.
-- Its long sleep keeps the workers out of the way (the first jobs sleep, the rest queue), so the
-- figure is the submission path itself: validate, store durably, answer 202.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"tool": "sleep", "params": {"seconds": 300}}'
