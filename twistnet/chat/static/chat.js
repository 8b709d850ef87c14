// The twistnet chat page: one WebSocket to /ws, text in and out, reconnecting with backoff.
// Everything a person typed is shown with textContent, never parsed as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "twistnet-chat-session";
  const NAME_KEY = "twistnet-chat-name";
  // Close codes after which coming back would undo what the server decided (a /QUIT, an idle
  // timeout, flooding): the page waits for the person to ask.
  const FINAL_CLOSE = new Set([1000, 1003, 1008]);
  const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 10000];
  const MAX_LINES = 2000;

  const log = document.getElementById("log");
  const status = document.getElementById("status");
  const nameView = document.getElementById("name");
  const who = document.getElementById("who");
  const whoCount = document.getElementById("who-count");
  const form = document.getElementById("say");
  const input = document.getElementById("line");
  const reconnectButton = document.getElementById("reconnect");

  let socket = null;
  let attempt = 0;
  let everConnected = false;
  let skippingHistory = false;
  let myName = sessionStorage.getItem(NAME_KEY) || "";

  function setState(state, text) {
    status.className = "state-" + state;
    status.textContent = text;
    document.body.dataset.state = state;
  }

  function addLine(text, kind) {
    const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    const line = document.createElement("div");
    line.textContent = text;
    if (kind) line.className = kind;
    else if (text.startsWith("***")) line.className = "notice";
    log.appendChild(line);
    while (log.childElementCount > MAX_LINES) log.firstElementChild.remove();
    if (stick) log.scrollTop = log.scrollHeight;
  }

  function showLines(lines) {
    for (const text of lines) {
      if (skippingHistory) {
        // This page already shows the conversation: not the history a second time.
        if (text.startsWith("*** The last ")) { skippingHistory = "block"; continue; }
        if (skippingHistory === "block") {
          if (text === "*** (end)") skippingHistory = false;
          continue;
        }
        if (text.startsWith("*** Welcome")) continue;
        skippingHistory = false;
      }
      addLine(text);
    }
  }

  function showName(name) {
    myName = name;
    sessionStorage.setItem(NAME_KEY, name);
    nameView.textContent = name;
  }

  function showWho(names) {
    who.replaceChildren(...names.map((name) => {
      const item = document.createElement("li");
      item.textContent = name;
      if (name === myName) item.className = "self";
      return item;
    }));
    whoCount.textContent = "(" + names.length + ")";
  }

  function received(event) {
    let message;
    try { message = JSON.parse(event.data); } catch (error) { return; }
    if (message.session) {
      const wasAway = everConnected;
      sessionStorage.setItem(TOKEN_KEY, message.session);
      everConnected = true;
      attempt = 0;
      setState("connected", "Connected");
      if (wasAway && !message.resumed) {
        // A new member (the server restarted, or the page was away too long): same name.
        skippingHistory = true;
        if (myName && !myName.startsWith("guest-")) socket.send("/NAME " + myName);
      }
    }
    if (message.lines) showLines(message.lines);
    if (message.you) showName(message.you);
    if (message.who) showWho(message.who);
  }

  function connect() {
    reconnectButton.hidden = true;
    setState(everConnected ? "reconnecting" : "connecting",
             everConnected ? "Reconnecting…" : "Connecting…");
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + "/ws");
    socket.addEventListener("open", () => {
      socket.send(JSON.stringify({ resume: sessionStorage.getItem(TOKEN_KEY) }));
    });
    socket.addEventListener("message", received);
    socket.addEventListener("close", (event) => {
      socket = null;
      if (FINAL_CLOSE.has(event.code)) {
        setState("disconnected", "Disconnected");
        sessionStorage.removeItem(TOKEN_KEY);
        reconnectButton.hidden = false;
        return;
      }
      const delay = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)];
      const jittered = Math.round(delay * (0.75 + Math.random() * 0.5));
      attempt += 1;
      setState("reconnecting", "Disconnected, reconnecting in " +
               Math.max(1, Math.round(jittered / 1000)) + " s…");
      setTimeout(connect, jittered);
    });
  }

  // The room sends a line to everyone but its sender (telnet users see their own typing):
  // the page shows its own lines itself, as the others will read them.
  function ownEcho(text) {
    if (text.startsWith("//")) return myName + ": " + text.slice(1);
    if (text.startsWith("/")) {
      const match = /^\/me\s+(.*\S)/i.exec(text);
      return match ? "* " + myName + " " + match[1] : null;
    }
    return text.trim() ? myName + ": " + text : null;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (!text || !socket || socket.readyState !== WebSocket.OPEN) {
      input.focus();
      return;
    }
    socket.send(text);
    const echo = ownEcho(text);
    if (echo !== null) addLine(echo, "mine");
    input.value = "";
    input.focus();
  });

  reconnectButton.addEventListener("click", () => {
    attempt = 0;
    connect();
    input.focus();
  });

  // Clicking the conversation (to select text, say) must not leave the input unfocused
  // for typing: any printable key goes back to it.
  document.addEventListener("keydown", (event) => {
    if (document.activeElement !== input && event.key.length === 1 &&
        !event.ctrlKey && !event.metaKey && !event.altKey &&
        document.activeElement.tagName !== "BUTTON") {
      input.focus();
    }
  });

  if (myName) nameView.textContent = myName;
  connect();
  input.focus();
})();
