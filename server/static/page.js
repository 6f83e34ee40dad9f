// The live page: shows the events of the subscription path it was served on, newest first.
const MAX_SHOWN = 500;
const list = document.getElementById("events");
const stateEl = document.getElementById("state");
const countEl = document.getElementById("count");
const pathEl = document.getElementById("path");
const pauseEl = document.getElementById("pause");
let count = 0;
let sub = null;

function show(li) {
  list.insertBefore(li, list.firstChild);
  while (list.childElementCount > MAX_SHOWN) list.removeChild(list.lastChild);
}

function onEvent(event) {
  const li = document.createElement("li");
  li.className = "event";
  if (event.pubsub_cursor) li.dataset.cursor = event.pubsub_cursor;
  const meta = document.createElement("div");
  meta.className = "meta";
  const topics = document.createElement("span");
  topics.className = "topics";
  topics.textContent = (event.pubsub_topics || []).join(" / ") || "/";
  const when = document.createElement("time");
  const ts = Number(event.pubsub_timestamp);
  when.textContent = Number.isFinite(ts) ? new Date(ts * 1000).toISOString() : "";
  const cursor = document.createElement("span");
  cursor.textContent = event.pubsub_cursor || "";
  meta.append(topics, when, cursor);
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(event, null, 2);
  li.append(meta, pre);
  show(li);
  count += 1;
  countEl.textContent = count + (count === 1 ? " event" : " events");
}

function onGap(info) {
  const li = document.createElement("li");
  li.className = "gap";
  li.textContent = "Events may have been missed: " + (info.reason || "unknown cursor");
  show(li);
}

function onState(state) {
  stateEl.textContent = state;
  stateEl.dataset.state = state;
  pauseEl.textContent = state === "paused" ? "Resume" : "Pause";
}

function subscribe(path, lastEventId) {
  if (sub) sub.close();
  const params = new URLSearchParams(location.search);
  sub = new PubSubSubscription(path, {
    onEvent, onGap, onState, lastEventId,
    transport: params.get("transport") === "websocket" ? "websocket" : "sse",
  });
  sub.start();
}

pathEl.value = location.pathname;
document.getElementById("form").addEventListener("submit", (e) => {
  e.preventDefault();
  let path = pathEl.value.trim() || "/";
  if (!path.startsWith("/")) path = "/" + path;
  history.replaceState(null, "", path + location.search);
  subscribe(path, null);
});
pauseEl.addEventListener("click", () => {
  if (sub.state === "paused") sub.resume();
  else sub.pause();
});
subscribe(location.pathname, new URLSearchParams(location.search).get("last_event_id"));
