#!/usr/bin/env node
/*
 * A PyPubSub client that survives real networks. Node.js standard library only.
 *
 * Owns reading a PyPubSub stream and keeping it alive: records ("JSON\n", one per HTTP chunk,
 * but TCP may merge several into one read or split one over reads) are line-buffered; a line
 * longer than maxLine is skipped without being held; pings are hidden unless asked for;
 * silence longer than `timeout` means a dead path and triggers a reconnect; reconnects back
 * off exponentially with full jitter and resume with X-Fetch-Since-Cursor from the last
 * pubsub_cursor seen.
 *
 *   const { PubSubClient } = require('./pypubsub-client');
 *   const client = new PubSubClient('http://localhost:2069/commits', { user: 'u', password: 'p' });
 *   client.on('event', (ev) => console.log(ev));
 *   client.start();            // client.close() to stop
 *
 * CLI:  node pypubsub-client.js listen URL [--user U] [--since EPOCH] [--pretty]
 *       node pypubsub-client.js publish URL '{"json": 1}' [--user U]
 * The password for --user comes from $PUBSUB_PASSWORD.
 */
'use strict';

const http = require('http');
const https = require('https');
const { EventEmitter } = require('events');

const VERSION = '1.0.0';
const USER_AGENT = `pypubsub-client/${VERSION} (nodejs)`;
// The server pings every 5 s by default: three missed pings and some slack mean a dead path.
const DEFAULT_TIMEOUT = 16.0;
// A record longer than this is skipped (the daemon's default payload limit is 100 KiB).
const DEFAULT_MAX_LINE = 1024 * 1024;
// First backoff step and cap, in seconds; each delay is uniform in [0, step] ("full jitter").
const DEFAULT_BACKOFF_BASE = 1.0;
const DEFAULT_BACKOFF_CAP = 60.0;
// A cursor is opaque, but it goes back into a request header: visible ASCII, bounded.
const CURSOR_RE = /^[\x21-\x7e]{1,256}$/;

/** Turns arbitrary slices of a byte stream into complete lines (Buffers, without "\n"). */
class LineBuffer {
  constructor(maxLine = DEFAULT_MAX_LINE) {
    this.maxLine = maxLine;
    this.parts = [];
    this.size = 0;
    this.discarding = false;
    this.skipped = 0;
  }

  feed(data) {
    const lines = [];
    let start = 0;
    for (;;) {
      const nl = data.indexOf(0x0a, start);
      if (nl < 0) break;
      const len = this.size + nl - start;
      if (this.discarding) {
        this.discarding = false;
      } else if (len > this.maxLine) {
        this.skip(len);
      } else {
        this.parts.push(data.subarray(start, nl));
        lines.push(Buffer.concat(this.parts));
      }
      this.parts = [];
      this.size = 0;
      start = nl + 1;
    }
    if (!this.discarding && start < data.length) {
      const rest = data.subarray(start);
      this.parts.push(Buffer.from(rest)); // copy: the caller may reuse its buffer
      this.size += rest.length;
      if (this.size > this.maxLine) {
        this.skip(this.size);
        this.parts = [];
        this.size = 0;
        this.discarding = true;
      }
    }
    return lines;
  }

  skip(size) {
    this.skipped += 1;
    console.error(`pypubsub-client: skipping a record of at least ${size} bytes (maxLine ${this.maxLine})`);
  }
}

/** Exponential backoff with full jitter; reset() after a connection that delivered data. */
class Backoff {
  constructor(base = DEFAULT_BACKOFF_BASE, cap = DEFAULT_BACKOFF_CAP) {
    this.base = base;
    this.cap = cap;
    this.attempt = 0;
  }

  next() {
    const step = Math.min(this.cap, this.base * 2 ** Math.min(this.attempt, 32));
    this.attempt += 1;
    return Math.random() * step;
  }

  reset() {
    this.attempt = 0;
  }
}

/** The JSON object in one line, or null (blank, NUL-only, not JSON, not an object). */
function parseRecord(line) {
  const text = line.toString('utf8').replace(/^[\0\s]+|[\0\s]+$/g, '');
  if (!text) return null;
  try {
    const obj = JSON.parse(text);
    if (obj && typeof obj === 'object' && !Array.isArray(obj)) return obj;
  } catch (e) {
    console.error(`pypubsub-client: skipping a record that is not JSON (${e.message})`);
    return null;
  }
  console.error('pypubsub-client: skipping a record that is not a JSON object');
  return null;
}

function authHeader(user, password) {
  return 'Basic ' + Buffer.from(`${user}:${password || ''}`).toString('base64');
}

/**
 * Events: 'event' (obj), 'ping' (obj, only with pings: true), 'connect' ({cursor, cursorFound}),
 * 'disconnect' (reason), 'error' (Error: only fatal ones, after which the client stops),
 * 'close'.
 */
class PubSubClient extends EventEmitter {
  constructor(url, opts = {}) {
    super();
    this.url = new URL(url);
    if (!['http:', 'https:'].includes(this.url.protocol)) throw new Error(`not an http(s) URL: ${url}`);
    this.user = opts.user;
    this.password = opts.password;
    this.since = opts.since;
    this.cursor = opts.cursor || null;
    this.pings = !!opts.pings;
    this.timeout = (opts.timeout || DEFAULT_TIMEOUT) * 1000;
    this.maxLine = opts.maxLine || DEFAULT_MAX_LINE;
    this.backoff = new Backoff(opts.backoffBase ?? DEFAULT_BACKOFF_BASE, opts.backoffCap ?? DEFAULT_BACKOFF_CAP);
    this.headers = opts.headers || {};
    this.agentOptions = opts.agentOptions || {};
    this.connections = 0;
    this.skipped = 0;
    this.closed = false;
    this.req = null;
    this.retryTimer = null;
  }

  start() {
    this.closed = false;
    this.connect();
    return this;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.retryTimer);
    if (this.req) this.req.destroy();
    this.req = null;
    this.emit('close');
  }

  requestHeaders() {
    const h = { 'User-Agent': USER_AGENT, Accept: '*/*', ...this.headers };
    if (this.user !== undefined) h.Authorization = authHeader(this.user, this.password);
    if (this.cursor) h['X-Fetch-Since-Cursor'] = this.cursor;
    else if (this.since !== undefined && this.since !== null) h['X-Fetch-Since'] = String(Math.floor(this.since));
    return h;
  }

  connect() {
    if (this.closed) return;
    const mod = this.url.protocol === 'https:' ? https : http;
    const asked = this.cursor;
    let delivered = false;
    let finished = false;
    const lines = new LineBuffer(this.maxLine);
    const done = (reason, fatal) => {
      if (finished) return;
      finished = true;
      this.skipped += lines.skipped;
      if (req) req.destroy();
      if (this.req === req) this.req = null;
      if (this.closed) return;
      if (fatal) {
        this.closed = true;
        this.emit('error', fatal);
        this.emit('close');
        return;
      }
      if (delivered) this.backoff.reset();
      const delay = this.backoff.next();
      this.emit('disconnect', reason);
      console.error(`pypubsub-client: ${reason}; reconnecting in ${delay.toFixed(2)}s`);
      this.retryTimer = setTimeout(() => this.connect(), delay * 1000);
    };
    let req;
    try {
      // `timeout` also covers the connect, which req.setTimeout alone would not
      req = mod.request(this.url, { method: 'GET', headers: this.requestHeaders(), timeout: this.timeout, ...this.agentOptions });
    } catch (e) { // a header the user passed is invalid: retrying will not help
      this.closed = true;
      process.nextTick(() => { this.emit('error', e); this.emit('close'); });
      return;
    }
    this.req = req;
    // Silence on the socket (no data, no ping) for `timeout` ms: the path is dead.
    req.setTimeout(this.timeout, () => done(`no data for ${this.timeout / 1000}s`));
    req.on('error', (e) => done(`connection lost: ${e.message}`));
    req.on('response', (res) => {
      if (res.statusCode !== 200) {
        let body = '';
        res.on('data', (d) => { if (body.length < 4096) body += d; });
        res.on('end', () => {
          const msg = `HTTP ${res.statusCode} ${res.statusMessage}: ${body.trim().slice(0, 200)}`;
          const retry = res.statusCode >= 500 || res.statusCode === 408 || res.statusCode === 429;
          done(msg, retry ? null : Object.assign(new Error(msg), { status: res.statusCode }));
        });
        res.on('error', (e) => done(`connection lost: ${e.message}`));
        return;
      }
      this.connections += 1;
      const found = res.headers['x-fetch-since-cursor-found'];
      if (asked && found === 'false') {
        console.error(`pypubsub-client: the server no longer holds cursor ${asked}: events may have been missed`);
      }
      this.emit('connect', { cursor: asked, cursorFound: found !== 'false' });
      res.on('data', (chunk) => {
        for (const line of lines.feed(chunk)) {
          if (finished) return;
          const ev = parseRecord(line);
          if (!ev) continue;
          if ('stillalive' in ev && Object.keys(ev).length === 1) {
            if (this.pings) this.emit('ping', ev);
            continue;
          }
          if (typeof ev.pubsub_cursor === 'string' && CURSOR_RE.test(ev.pubsub_cursor)) this.cursor = ev.pubsub_cursor;
          delivered = true;
          this.emit('event', ev);
        }
      });
      res.on('end', () => done('stream ended'));
      res.on('error', (e) => done(`connection lost: ${e.message}`));
      res.on('aborted', () => done('connection aborted'));
      res.on('close', () => done('connection closed'));
    });
    req.end();
  }
}

/** Publish a JSON object; resolves to {status, text}; rejects on a non-2xx answer. */
function publish(url, obj, opts = {}) {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const mod = u.protocol === 'https:' ? https : http;
    const body = Buffer.from(JSON.stringify(obj));
    const headers = { 'Content-Type': 'application/json', 'Content-Length': body.length, 'User-Agent': USER_AGENT };
    if (opts.user !== undefined) headers.Authorization = authHeader(opts.user, opts.password);
    const req = mod.request(u, { method: opts.method || 'PUT', headers, timeout: (opts.timeout || 30) * 1000 });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
    req.on('response', (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { text += d; });
      res.on('end', () => {
        if (res.statusCode >= 200 && res.statusCode < 300) resolve({ status: res.statusCode, text });
        else reject(Object.assign(new Error(`HTTP ${res.statusCode}: ${text.trim()}`), { status: res.statusCode, text }));
      });
    });
    req.end(body);
  });
}

function parseArgs(argv) {
  const args = { _: [] };
  const flags = new Set(['pretty', 'pings', 'verbose']);
  for (let i = 0; i < argv.length; i += 1) {
    const a = argv[i];
    if (a.startsWith('--')) {
      const name = a.slice(2);
      if (flags.has(name)) args[name] = true;
      else args[name] = argv[++i];
    } else {
      args._.push(a);
    }
  }
  return args;
}

const USAGE = `usage: node pypubsub-client.js listen URL [--user U] [--since EPOCH] [--cursor C] [--pretty]
                         [--pings] [--timeout S] [--max-line N] [--backoff S] [--backoff-cap S]
       node pypubsub-client.js publish URL JSON [--user U] [--method PUT|POST]
(the password for --user is read from $PUBSUB_PASSWORD)`;

function main(argv) {
  const args = parseArgs(argv);
  const [cmd, url, json] = args._;
  if (!url || !['listen', 'publish'].includes(cmd) || (cmd === 'publish' && json === undefined)) {
    console.error(USAGE);
    process.exitCode = 2;
    return;
  }
  const password = process.env.PUBSUB_PASSWORD;
  if (args.user !== undefined && !password) {
    // running anonymous instead would silently show only public events
    console.error(`pypubsub-client: --user ${args.user} needs a password: set $PUBSUB_PASSWORD`);
    process.exitCode = 2;
    return;
  }
  const auth = args.user !== undefined ? { user: args.user, password } : {};
  if (cmd === 'publish') {
    let obj;
    try {
      obj = JSON.parse(json);
    } catch (e) {
      console.error(`not JSON: ${e.message}`);
      process.exitCode = 2;
      return;
    }
    publish(url, obj, { ...auth, method: args.method }).then(
      ({ status, text }) => console.log(`${status} ${text.trim()}`),
      (e) => { console.error(e.message); process.exitCode = 1; },
    );
    return;
  }
  const client = new PubSubClient(url, {
    ...auth,
    since: args.since !== undefined ? Number(args.since) : undefined,
    cursor: args.cursor,
    pings: args.pings,
    timeout: args.timeout !== undefined ? Number(args.timeout) : undefined,
    maxLine: args['max-line'] !== undefined ? Number(args['max-line']) : undefined,
    backoffBase: args.backoff !== undefined ? Number(args.backoff) : undefined,
    backoffCap: args['backoff-cap'] !== undefined ? Number(args['backoff-cap']) : undefined,
  });
  const out = (ev) => process.stdout.write(JSON.stringify(ev, null, args.pretty ? 2 : undefined) + '\n');
  client.on('event', out);
  client.on('ping', out);
  if (args.verbose) client.on('connect', (c) => console.error(`pypubsub-client: connected${c.cursor ? ` (resuming after ${c.cursor})` : ''}`));
  client.on('error', (e) => { console.error(e.message); process.exitCode = 1; });
  const stop = () => { client.close(); };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  process.stdout.on('error', stop); // EPIPE: the reader went away
  client.start();
}

module.exports = { PubSubClient, LineBuffer, Backoff, parseRecord, publish, VERSION };

if (require.main === module) main(process.argv.slice(2));
