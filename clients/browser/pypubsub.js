// PyPubSub browser client: subscribe to a PyPubSub daemon from a web page.
//
// A small ES module with no dependencies. It speaks Server-Sent Events (default) or WebSocket
// to the same subscription URL the daemon serves NDJSON on, reconnects with backoff, and resumes
// after the last event it saw by cursor (pubsub_cursor), so nothing is lost while the backlog
// still holds it. Usage:
//
//   import { PubSubSubscription } from "./pypubsub.js";
//   const sub = new PubSubSubscription("/fruits/apples", {
//     onEvent: (event) => console.log(event.pubsub_topics, event),
//     onState: (state) => console.log(state),   // connecting | open | reconnecting | paused | closed
//     onGap: (info) => console.warn("events may have been missed", info),
//   });
//   sub.start();   // later: sub.pause(); sub.resume(); sub.close();

const BACKOFF_MS = [500, 1000, 2000, 5000, 10000];

export class PubSubSubscription {
  constructor(path, options = {}) {
    this.path = path || "/";
    this.base = options.base || (typeof location !== "undefined" ? location.origin : "");
    this.transport = options.transport === "websocket" ? "websocket" : "sse";
    this.onEvent = options.onEvent || (() => {});
    this.onState = options.onState || (() => {});
    this.onGap = options.onGap || (() => {});
    this.lastEventId = options.lastEventId || null;
    this.state = "closed";
    this._source = null;
    this._timer = null;
    this._failures = 0;
  }

  // The subscription URL, with the cursor to resume after (browsers cannot set headers on a
  // WebSocket or on an EventSource's first request: the daemon reads ?last_event_id= too).
  url() {
    const u = new URL(this.path, this.base);
    if (this.lastEventId) u.searchParams.set("last_event_id", this.lastEventId);
    if (this.transport === "websocket") u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    return u.toString();
  }

  start() {
    this._stop();
    this._setState(this._failures ? "reconnecting" : "connecting");
    if (this.transport === "websocket") this._openWebSocket();
    else this._openEventSource();
  }

  pause() {
    this._stop();
    this._setState("paused");
  }

  resume() {
    this._failures = 0;
    this.start();
  }

  close() {
    this._stop();
    this._setState("closed");
  }

  // -- internals ---------------------------------------------------------------------------
  _setState(state) {
    if (this.state !== state) {
      this.state = state;
      this.onState(state);
    }
  }

  _stop() {
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
    const s = this._source;
    this._source = null;
    if (s) {
      s.onopen = s.onmessage = s.onerror = s.onclose = null;
      s.close();
    }
  }

  _deliver(text, id) {
    let event;
    try {
      event = JSON.parse(text);
    } catch (e) {
      return;
    }
    if (event === null || typeof event !== "object" || "stillalive" in event) return;
    if ("pubsub_gap" in event) {
      this.onGap(event.pubsub_gap);
      return;
    }
    const cursor = id || event.pubsub_cursor;
    if (cursor) this.lastEventId = cursor;
    this.onEvent(event);
  }

  _opened() {
    this._failures = 0;
    this._setState("open");
  }

  _retry() {
    this._stop();
    const delay = BACKOFF_MS[Math.min(this._failures, BACKOFF_MS.length - 1)];
    this._failures += 1;
    this._setState("reconnecting");
    this._timer = setTimeout(() => this.start(), delay);
  }

  _openEventSource() {
    const es = new EventSource(this.url());
    this._source = es;
    es.onopen = () => this._opened();
    es.onmessage = (m) => this._deliver(m.data, m.lastEventId);
    es.addEventListener("gap", (m) => {
      let info = {};
      try { info = JSON.parse(m.data); } catch (e) { /* keep {} */ }
      this.onGap(info);
    });
    es.onerror = () => {
      // CONNECTING: the browser reconnects by itself, sending Last-Event-ID.
      // CLOSED: it gave up (an error status): reconnect ourselves with the cursor in the URL.
      if (es.readyState === EventSource.CLOSED) this._retry();
      else this._setState("reconnecting");
    };
  }

  _openWebSocket() {
    const ws = new WebSocket(this.url());
    this._source = ws;
    ws.onopen = () => this._opened();
    ws.onmessage = (m) => this._deliver(m.data, null);
    ws.onerror = () => {};
    ws.onclose = () => this._retry();
  }
}
