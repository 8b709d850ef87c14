// The twistnet jobs page: a client of the public JSON API and nothing else. Forms come from
// each tool's parameter schema (GET /tools), jobs are submitted as JSON (POST /jobs), listed
// (GET /jobs), followed on their event stream (GET /jobs/{id}/log) and cancelled (DELETE).
// Every string the server sends is shown with textContent, never parsed as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "twistnet-http-token";
  const PAGE_SIZE = 20;
  // How often a shown job's status is read while it is not finished (the stream carries only
  // its output).
  const STATUS_POLL_MS = 1000;
  const TERMINAL = new Set(["succeeded", "failed", "timed_out", "cancelled", "lost"]);
  // A string this long or longer gets a text area rather than a one-line field.
  const TEXTAREA_LENGTH = 2000;

  const $ = (id) => document.getElementById(id);
  const status = $("status");
  const toolSelect = $("tool");
  const params = $("params");
  const jobForm = $("job-form");
  const submitError = $("submit-error");
  const jobList = $("job-list");
  const jobsError = $("jobs-error");
  const more = $("more");
  const tokenBox = $("token-box");
  const tokenInput = $("token");
  const tokenKeep = $("token-keep");
  const tokenState = $("token-state");
  const output = $("output");
  const cancelButton = $("cancel");
  const streamState = $("stream-state");
  const jobError = $("job-error");

  let tools = [];
  // In memory by default; in this tab's sessionStorage only when the person ticks the box.
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let nextCursor = null;
  // Each list request's number: an answer to an older one (filters changed since) is dropped.
  let listRequest = 0;
  // The job shown, its event stream and the byte offset its output is shown up to.
  let current = null;
  let stream = null;
  let shownOffset = 0;
  let statusPoll = null;

  function say(text) { status.textContent = text; }

  // --- the API ---------------------------------------------------------------------------

  class ApiFailure extends Error {
    constructor(code, body) {
      const detail = body && body.detail ? body.detail : "";
      const error = body && body.error ? body.error : "error";
      super(code ? `${code} ${error}: ${detail}`.trim() : detail);
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (method !== "GET" && token) headers.Authorization = "Bearer " + token;
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      throw new ApiFailure(0, { detail: "The server cannot be reached: " + error.message });
    }
    let answer = null;
    try {
      answer = await response.json();
    } catch (error) {
      answer = null;
    }
    if (!response.ok) {
      if (response.status === 401) askForToken(token ? "The server refused this token." : "");
      throw new ApiFailure(response.status, answer);
    }
    return answer;
  }

  // --- the token -------------------------------------------------------------------------

  function askForToken(why) {
    tokenBox.hidden = false;
    if (why) tokenState.textContent = why;
    tokenInput.focus();
  }

  function showTokenState() {
    if (!token) tokenState.textContent = "No token set.";
    else if (tokenKeep.checked) tokenState.textContent = "Token set, kept in this tab.";
    else tokenState.textContent = "Token set, in this page's memory only.";
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = tokenInput.value;
    tokenInput.value = "";
    if (tokenKeep.checked && token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
  });

  tokenKeep.addEventListener("change", () => {
    if (tokenKeep.checked && token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
  });

  $("token-forget").addEventListener("click", () => {
    token = "";
    tokenInput.value = "";
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
  });

  // --- forms from the tools' schemas -----------------------------------------------------

  function fieldFor(name, schema, required) {
    const id = "param-" + name;
    const wrapper = document.createElement("div");
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = required ? `${name} (required)` : name;
    let input;
    if (schema.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = schema.default === true;
      label.className = "check";
      label.textContent = "";
      label.append(input, required ? `${name} (required)` : name);
      wrapper.append(label);
    } else if (Array.isArray(schema.enum)) {
      input = document.createElement("select");
      if (!required) input.append(new Option(schema.default !== undefined ? `(default: ${schema.default})` : "(none)", ""));
      for (const choice of schema.enum) input.append(new Option(String(choice), String(choice)));
      if (required && schema.default !== undefined) input.value = String(schema.default);
      wrapper.append(label, input);
    } else if (schema.type === "integer") {
      input = document.createElement("input");
      input.type = "number";
      input.step = "1";
      input.inputMode = "numeric";
      if (schema.minimum !== undefined) input.min = String(schema.minimum);
      if (schema.maximum !== undefined) input.max = String(schema.maximum);
      if (schema.default !== undefined) input.value = String(schema.default);
      wrapper.append(label, input);
    } else {
      const long = (schema.maxLength || 0) >= TEXTAREA_LENGTH;
      input = document.createElement(long ? "textarea" : "input");
      if (!long) input.type = "text";
      if (schema.maxLength !== undefined) input.maxLength = schema.maxLength;
      if (schema.default !== undefined) input.value = String(schema.default);
      input.spellcheck = false;
      wrapper.append(label, input);
    }
    input.id = id;
    input.name = name;
    input.dataset.kind = Array.isArray(schema.enum) ? "choice" : schema.type;
    input.required = required && schema.type !== "boolean";
    const hints = [];
    if (schema.description) hints.push(schema.description);
    if (schema.type === "integer") {
      if (schema.minimum !== undefined && schema.maximum !== undefined) hints.push(`An integer from ${schema.minimum} to ${schema.maximum}.`);
      else if (schema.minimum !== undefined) hints.push(`An integer of at least ${schema.minimum}.`);
      else hints.push("An integer.");
    }
    if (schema.pattern) hints.push(`Matching ${schema.pattern}.`);
    if (schema.not && schema.not.pattern === "^-") hints.push("Must not start with -.");
    if (hints.length) {
      const hint = document.createElement("p");
      hint.className = "hint";
      hint.id = id + "-hint";
      hint.textContent = hints.join(" ");
      input.setAttribute("aria-describedby", hint.id);
      wrapper.append(hint);
    }
    return wrapper;
  }

  function showForm() {
    const tool = tools.find((candidate) => candidate.name === toolSelect.value);
    params.replaceChildren();
    $("tool-description").textContent = tool ? tool.description || "" : "";
    if (!tool) return;
    const schema = tool.params || {};
    const required = new Set(schema.required || []);
    for (const [name, property] of Object.entries(schema.properties || {})) {
      params.append(fieldFor(name, property, required.has(name)));
    }
  }

  function formValues() {
    const values = {};
    for (const input of params.querySelectorAll("input, select, textarea")) {
      const kind = input.dataset.kind;
      if (kind === "boolean") {
        values[input.name] = input.checked;
      } else if (input.value === "") {
        continue; // left out: the server applies the default, or says it is required
      } else if (kind === "integer") {
        const number = Number(input.value);
        values[input.name] = Number.isInteger(number) ? number : input.value;
      } else {
        values[input.name] = input.value;
      }
    }
    return values;
  }

  jobForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    submitError.textContent = "";
    const button = $("submit-button");
    button.disabled = true;
    try {
      const accepted = await api("POST", "/jobs", { tool: toolSelect.value, params: formValues() });
      say(`Job ${accepted.id} ${accepted.status}.`);
      location.hash = "#/jobs/" + accepted.id;
      loadJobs();
    } catch (error) {
      submitError.textContent = error.code === 401
        ? error.message + " Type the server's token above, then submit again."
        : error.message;
    } finally {
      button.disabled = false;
    }
  });

  toolSelect.addEventListener("change", showForm);

  // --- the jobs list ---------------------------------------------------------------------

  function badge(state) {
    const span = document.createElement("span");
    span.className = "badge " + state;
    span.textContent = state;
    return span;
  }

  function listItem(job) {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = "#/jobs/" + encodeURIComponent(job.id);
    link.dataset.id = job.id;
    if (current === job.id) link.className = "current";
    const tool = document.createElement("strong");
    tool.textContent = job.tool;
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = job.id.slice(0, 8);
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = job.created_at ? new Date(job.created_at).toLocaleTimeString() : "";
    link.append(badge(job.status), tool, id, when);
    item.append(link);
    return item;
  }

  async function loadJobs(append) {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    const state = $("filter-status").value;
    const tool = $("filter-tool").value;
    if (state) query.set("status", state);
    if (tool) query.set("tool", tool);
    if (append && nextCursor) query.set("cursor", nextCursor);
    jobsError.textContent = "";
    const number = ++listRequest;
    try {
      const page = await api("GET", "/jobs?" + query);
      if (number !== listRequest) return;
      const items = page.jobs.map(listItem);
      if (append) jobList.append(...items);
      else jobList.replaceChildren(...items);
      if (!append && !items.length) {
        const empty = document.createElement("li");
        empty.className = "hint";
        empty.textContent = "No jobs.";
        jobList.append(empty);
      }
      nextCursor = page.next_cursor;
      more.hidden = !nextCursor;
    } catch (error) {
      jobsError.textContent = error.message;
    }
  }

  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    loadJobs();
  });
  $("filter-status").addEventListener("change", () => loadJobs());
  $("filter-tool").addEventListener("change", () => loadJobs());
  more.addEventListener("click", () => loadJobs(true));

  // --- one job: its fields, live output, cancel ------------------------------------------

  function showJob(job) {
    $("job-id").textContent = job.id;
    $("job-tool").textContent = job.tool;
    const state = $("job-status");
    state.className = "badge " + job.status;
    state.textContent = job.status;
    $("job-params").textContent = JSON.stringify(job.params);
    $("job-exit").textContent = job.exit_code === null ? "—" : String(job.exit_code);
    $("job-created").textContent = job.created_at || "—";
    $("job-duration").textContent = job.duration === null ? "—" : `${job.duration} s`;
    cancelButton.hidden = TERMINAL.has(job.status);
    const result = { status: job.status, exit_code: job.exit_code, result: job.result, error: job.error, truncated: job.truncated };
    $("result").textContent = TERMINAL.has(job.status) ? JSON.stringify(result, null, 2) : "";
    if (job.error) jobError.textContent = job.error;
    for (const link of jobList.querySelectorAll("a")) {
      if (link.dataset.id === job.id) link.querySelector(".badge").replaceWith(badge(job.status));
    }
  }

  function stopStream() {
    if (stream) stream.close();
    stream = null;
    stopPolling();
  }

  function stopPolling() {
    clearInterval(statusPoll);
    statusPoll = null;
  }

  function appendOutput(offset, text) {
    // An event's id is the byte offset after its line: one already shown is not shown again.
    if (offset <= shownOffset) return;
    shownOffset = offset;
    const stick = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
    output.append(text + "\n");
    if (stick) output.scrollTop = output.scrollHeight;
  }

  // The job's fields, read again; polling stops once it is finished. The stream is left to
  // close on its own "end" event, so the last lines still arrive.
  async function refreshJob(id) {
    const job = await api("GET", "/jobs/" + encodeURIComponent(id));
    if (current !== id) return null;
    showJob(job);
    if (TERMINAL.has(job.status)) {
      stopPolling();
      say(`Job ${job.id} ${job.status}.`);
    }
    return job;
  }

  function follow(id) {
    // EventSource sends Last-Event-ID itself when it reconnects: the stream resumes there.
    const source = new EventSource("/jobs/" + encodeURIComponent(id) + "/log");
    stream = source;
    const mine = () => stream === source && current === id;
    source.addEventListener("open", () => {
      if (mine()) streamState.textContent = "Following the output live.";
    });
    source.addEventListener("message", (event) => {
      if (mine()) appendOutput(Number(event.lastEventId), event.data);
    });
    source.addEventListener("end", () => {
      if (!mine()) return;
      // The whole output is here: closed, or the browser would open the stream again.
      source.close();
      streamState.textContent = "Finished.";
      refreshJob(id).catch((error) => { jobError.textContent = error.message; });
    });
    source.addEventListener("error", () => {
      if (!mine()) return;
      streamState.textContent = source.readyState === EventSource.CLOSED
        ? "The output stream closed; open the job again to follow it."
        : "Connection lost; reconnecting to the output stream…";
    });
  }

  async function openJob(id) {
    current = id;
    stopStream();
    shownOffset = 0;
    output.textContent = "";
    $("result").textContent = "";
    jobError.textContent = "";
    streamState.textContent = "";
    $("job").hidden = false;
    for (const link of jobList.querySelectorAll("a")) {
      link.classList.toggle("current", link.dataset.id === id);
    }
    let job;
    try {
      job = await refreshJob(id);
    } catch (error) {
      jobError.textContent = error.message;
      return;
    }
    if (!job) return;
    follow(id);
    if (!TERMINAL.has(job.status)) {
      statusPoll = setInterval(() => {
        refreshJob(id).catch((error) => {
          if (current === id) streamState.textContent = error.message;
        });
      }, STATUS_POLL_MS);
    }
  }

  cancelButton.addEventListener("click", async () => {
    const id = current;
    jobError.textContent = "";
    try {
      const job = await api("DELETE", "/jobs/" + encodeURIComponent(id));
      if (current === id) showJob(job);
      say(`Job ${id} ${job.status}.`);
      loadJobs();
    } catch (error) {
      jobError.textContent = error.code === 401
        ? error.message + " Type the server's token above, then cancel again."
        : error.message;
    }
  });

  function route() {
    const match = /^#\/jobs\/([0-9a-f]{32})$/.exec(location.hash);
    if (match) {
      openJob(match[1]);
      $("job-title").focus();
    }
  }

  window.addEventListener("hashchange", route);

  // --- start -----------------------------------------------------------------------------

  async function start() {
    tokenKeep.checked = Boolean(token);
    showTokenState();
    try {
      const [catalogue, description] = await Promise.all([
        api("GET", "/tools"),
        api("GET", "/openapi.json"),
      ]);
      tools = catalogue.tools;
      const post = description.paths["/jobs"] && description.paths["/jobs"].post;
      if (post && post.security && post.security.length) tokenBox.hidden = false;
    } catch (error) {
      say(error.message);
      return;
    }
    const filterTool = $("filter-tool");
    for (const tool of tools) {
      toolSelect.append(new Option(tool.name, tool.name));
      filterTool.append(new Option(tool.name, tool.name));
    }
    showForm();
    say(`${tools.length} tools.`);
    await loadJobs();
    route();
  }

  start();
})();
