// How the page stays in step with the broker: a WebSocket subscription
// first, long polling of the change feed when the WebSocket cannot be
// used. Both feed the same Fleet and resume from its cursor, so switching
// (or reconnecting) misses nothing. Protocol: docs/websocket.md and
// docs/http-api.md; the policy is described in docs/dashboard.md.

import {ApiError} from "./api.js";
import {toJson} from "./dom.js";

const SUBPROTOCOL = "ssp-broker.v1.json";
const TOKEN_SUBPROTOCOL_PREFIX = "bearer.";
/** The broker closes with this code when the connection's token is revoked. */
const CLOSE_TOKEN_REVOKED = 4001;
/**
 * The broker closes with this code when it shuts down (or restarts): not the WebSocket's
 * fault, so it does not count as a failure, unless it keeps coming right after every
 * snapshot (a proxy that cuts WebSockets so): see TIMING.goingAwayFallbackAfter.
 */
const CLOSE_GOING_AWAY = 1001;
/**
 * The reason the broker gives with its own 1001 (docs/websocket.md, close codes): a real
 * stop, so it never counts towards a fallback, however soon it comes.
 */
const BROKER_STOPPING = "broker shutting down";
/** Why the page stops: a token refused after it was accepted can only have been revoked. */
const REVOKED = "The access token was revoked.";

/** How long things may take; a Link takes others (tests use short ones). */
export const TIMING = Object.freeze({
  /** A WebSocket must deliver its first snapshot within this many ms. */
  openTimeoutMs: 10_000,
  /** A connection that dies sooner than this after going live counts as a failure. */
  stableAfterMs: 10_000,
  /** Consecutive WebSocket failures after which the page switches to long polling. */
  fallbackAfter: 2,
  /**
   * Consecutive 1001 (going away) closes, each within goingAwayWithinMs of going live and
   * without the broker's own reason, after which the page switches to long polling: a
   * proxy that closes every WebSocket right after the snapshot.
   */
  goingAwayFallbackAfter: 4,
  /**
   * A 1001 counts towards goingAwayFallbackAfter only this soon after going live: a proxy
   * loop closes at once, a broker restart comes any time (a rolling restart of several
   * brokers, a few seconds apart, must leave the page on the WebSocket).
   */
  goingAwayWithinMs: 2_000,
  /** While long polling, try the WebSocket again this often. */
  probeIntervalMs: 5 * 60_000,
  /** An application ping this often; no pong by the next one: the link is dead. */
  pingIntervalMs: 25_000,
  /** Longest long-poll wait asked for (the broker cuts it to its polling.max_wait). */
  longPollWaitS: 25,
  /**
   * Least time between the starts of two polls (ms). The broker answers a long poll as
   * soon as anything changed, so without it a busy fleet costs one request per change
   * (and soon the per-token rate limit); with it, changes come in batches.
   */
  pollGapMs: 500,
});

/** Seconds before retry number `failures` (1, 2, 4 ... 30, with jitter). */
function backoff(failures) {
  const base = Math.min(30, 2 ** Math.max(0, failures - 1));
  return Math.round(base * (0.75 + Math.random() * 0.5) * 10) / 10;
}

/**
 * Resolves after `ms`, or at once when `signal` aborts. The abort listener goes when the
 * timer fires: the feed's one signal would otherwise gather one per poll.
 */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const aborted = () => { clearTimeout(timer); resolve(); };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", aborted);
      resolve();
    }, ms);
    signal?.addEventListener("abort", aborted, {once: true});
  });
}

/** The fleet over one WebSocket: subscribe to every device, resume from the fleet's cursor. */
class WebSocketFeed {
  constructor(fleet, token, timing, {onLive, onClose}) {
    this.fleet = fleet;
    this.token = token;
    this.timing = timing;
    this.onLive = onLive;
    this.onClose = onClose;
    this.live = false;
    this.closed = false;
    this._snapshot = false;
    this._pending = new Map();
    this._nextId = 1;
    this._pinged = null;
    this._timers = [];
  }

  start() {
    const url = new URL("ws", document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(url, [SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + this.token]);
    this.socket = socket;
    socket.addEventListener("open", () => {
      // Without history: it is most of a device's JSON, and only the open device view
      // draws it (it reads that one device with its history).
      const subscribe = {op: "subscribe", id: "fleet", patterns: ["*"], history: false};
      if (this.fleet.cursor !== null) subscribe.cursor = this.fleet.cursor;
      socket.send(JSON.stringify(subscribe));
    });
    socket.addEventListener("message", (event) => this._receive(event.data));
    socket.addEventListener("close", (event) => this._closed(event.code, event.reason || ""));
    this._timers.push(setTimeout(() => {
      if (!this.live) this._abandon(`no snapshot within ${this.timing.openTimeoutMs / 1000} s`);
    }, this.timing.openTimeoutMs));
  }

  stop() {
    if (this._snapshot) this.fleet.cursor = null;
    this.closed = true;
    this._cleanUp("the page stopped this connection");
    this.socket?.close(1000, "done");
  }

  /** Merge `patch` into a device's desired values if it is still at `version`. */
  setDesired(name, patch, version) {
    return this._request({op: "set_desired", name, desired: patch, expected_version: version});
  }

  _request(message) {
    const id = `r${this._nextId++}`;
    return new Promise((resolve, reject) => {
      const text = toJson({...message, id});    // throws (rejects) before anything is pending
      this._pending.set(id, {resolve, reject});
      this.socket.send(text);
    });
  }

  _receive(data) {
    if (this.closed) return;
    let message;
    try {
      message = JSON.parse(data);
    } catch (error) {
      if (error instanceof SyntaxError) return this._abandon("the broker sent invalid JSON");
      throw error;
    }
    const fleet = this.fleet;
    switch (message.type) {
      case "snapshot":
        if (message.full && !this._snapshot) {
          fleet.beginSnapshot();
          this._snapshot = true;
        }
        for (const device of message.devices) fleet.apply(device);
        fleet.cursor = message.cursor;
        if (message.done) {
          if (this._snapshot) fleet.endSnapshot();
          this._snapshot = false;
          if (!this.live) this._goLive();
        }
        break;
      case "update":
        fleet.apply(message.device);
        fleet.cursor = message.cursor;
        break;
      case "result":
        this._settle(message.id, (waiter) => waiter.resolve(message));
        break;
      case "pong":
        fleet.cursor = message.cursor;
        this._settle(message.id, (waiter) => waiter.resolve(message));
        break;
      case "error":
        if (message.id === "fleet") return this._abandon(`subscription refused: ${message.message}`);
        if (!this._settle(message.id, (waiter) => waiter.reject(
          new ApiError(null, message.code, message.message, message)))) {
          console.warn("broker error", message.code, message.message);
        }
        break;
      default:
        break;      // newer message types: ignored
    }
  }

  _goLive() {
    this.live = true;
    this._timers.push(setInterval(() => this._ping(), this.timing.pingIntervalMs));
    this.onLive();
  }

  _ping() {
    if (this._pinged !== null) return this._abandon("no answer to a ping");
    const sent = this._pinged = this._request({op: "ping"});
    sent.then(() => { if (this._pinged === sent) this._pinged = null; }, () => {});
  }

  _settle(id, how) {
    const waiter = this._pending.get(id);
    if (!waiter) return false;
    this._pending.delete(id);
    how(waiter);
    return true;
  }

  /** Give up on this socket now (do not wait for a closing handshake on a dead link). */
  _abandon(reason) {
    if (this.closed) return;
    this.socket.close(4000, reason.slice(0, 100));
    this._closed(4000, reason);
  }

  _closed(code, reason) {
    if (this.closed) return;
    this.closed = true;
    // A snapshot's pages do not count in the resume cursor: an unfinished one starts over.
    if (this._snapshot) this.fleet.cursor = null;
    this._cleanUp(reason || `closed (${code})`);
    this.onClose({code, reason, live: this.live});
  }

  _cleanUp(reason) {
    for (const timer of this._timers) { clearTimeout(timer); clearInterval(timer); }
    this._timers = [];
    for (const waiter of this._pending.values()) {
      waiter.reject(new ApiError(0, "disconnected", `the connection closed first: ${reason}`));
    }
    this._pending.clear();
  }
}

/** The fleet by long polling /api/v1/changes from the fleet's cursor. */
class PollingFeed {
  constructor(fleet, api, wait, gapMs, {onLive, onTrouble, onUnauthorized}) {
    this.fleet = fleet;
    this.api = api;
    this.wait = wait;
    this.gapMs = gapMs;
    this.onLive = onLive;
    this.onTrouble = onTrouble;
    this.onUnauthorized = onUnauthorized;
    this.live = false;
    this._troubled = false;     // a poll failed since the last report of live
    this._snapshot = false;
    this._controller = new AbortController();
  }

  start() {
    this._run();
  }

  stop() {
    this._controller.abort();
    if (this._snapshot) this.fleet.cursor = null;
  }

  async _run() {
    const signal = this._controller.signal;
    const fleet = this.fleet;
    let failures = 0;
    if (fleet.cursor === null) {
      // Nothing held yet (or an unfinished snapshot): the whole feed from 0 is the snapshot.
      fleet.beginSnapshot();
      this._snapshot = true;
    }
    while (!signal.aborted) {
      let page;
      // The first request answers at once, and so does the first after a failure (to learn
      // soon that the feed is caught up again); the next ones wait for a change.
      const wait = this.live && !this._troubled ? this.wait : 0;
      const started = Date.now();
      try {
        // Without history, as over the WebSocket: the device view reads its own device.
        page = await this.api.changes(fleet.cursor ?? 0, wait, signal, {history: false});
      } catch (error) {
        if (signal.aborted) return;
        if (error.status === 401) return this.onUnauthorized(error);
        failures += 1;
        this._troubled = true;
        const delay = error.retryAfter ?? backoff(failures);
        this.onTrouble(error, delay);
        await sleep(delay * 1000, signal);
        continue;
      }
      if (signal.aborted) return;
      failures = 0;
      if (page.reset && !this._snapshot) {
        fleet.beginSnapshot();
        this._snapshot = true;
      }
      for (const device of page.devices) fleet.apply(device);
      fleet.cursor = page.cursor;
      if (this._snapshot && !page.more) {
        fleet.endSnapshot();
        this._snapshot = false;
      }
      if (!this.live) {
        this.live = true;
        this._troubled = false;
        this.onLive();
      } else if (this._troubled && !page.more) {
        // Answers again after a failure, and caught up: live again (the page stops
        // calling its values stale).
        this._troubled = false;
        this.onLive();
      }
      // The rest of a full page at once; otherwise let changes gather. A short poll's answer
      // says how often to ask (X-Poll-Interval; every answer when the broker only answers
      // short polls, [polling] max_wait = 0); a long poll's carries none (pollInterval 0).
      if (!page.more) {
        const interval = Math.max(this.gapMs, page.pollInterval * 1000);
        await sleep(started + interval - Date.now(), signal);
      }
    }
  }
}

/**
 * Chooses the transport and keeps it going. Dispatches "status" events
 * (detail: {transport: "websocket" | "polling" | "none", state: "connecting" |
 * "live" | "retrying" | "stopped", detail}) and "unauthorized" (detail: message).
 */
export class Link extends EventTarget {
  constructor(fleet, api, session, {forcePolling = false, timing = {}} = {}) {
    super();
    this.fleet = fleet;
    this.api = api;
    this.session = session;
    this.timing = {...TIMING, ...timing};
    this.webSocket = session.transports.websocket && !forcePolling;
    this.polling = session.transports.polling;
    this.wait = Math.min(this.timing.longPollWaitS, session.max_wait ?? this.timing.longPollWaitS);
    this.status = {transport: "none", state: "connecting", detail: ""};
    this._feed = null;
    this._failures = 0;
    this._unreachable = 0;
    this._goingAway = 0;        // proxy-like 1001 closes in a row (see goingAwayWithinMs)
    this._goneAway = 0;         // any 1001 closes since a connection lasted: the backoff
    this._liveSince = 0;
    this._timer = null;
    this._stopped = false;
  }

  start() {
    if (this.webSocket) this._useWebSocket();
    else if (this.polling) this._usePolling(this.session.transports.websocket
      ? "WebSocket turned off for this page (?transport=polling)"
      : "WebSocket turned off on this broker");
    else this._report("none", "stopped", "the broker offers neither WebSocket nor polling");
  }

  stop() {
    this._stopped = true;
    clearTimeout(this._timer);
    this._feed?.stop();
  }

  /** Write desired values over the WebSocket when it is live, else over HTTP. */
  setDesired(name, patch, version) {
    if (this._feed instanceof WebSocketFeed && this._feed.live && !this._feed.closed) {
      return this._feed.setDesired(name, patch, version);
    }
    return this.api.setDesired(name, patch, version);
  }

  _report(transport, state, detail = "") {
    this.status = {transport, state, detail};
    this.dispatchEvent(new CustomEvent("status", {detail: this.status}));
  }

  _unauthorized(message) {
    this.stop();
    this._report("none", "stopped", message);
    this.dispatchEvent(new CustomEvent("unauthorized", {detail: message}));
  }

  _useWebSocket() {
    this._report("websocket", "connecting");
    this._feed = new WebSocketFeed(this.fleet, this.api.token, this.timing, {
      onLive: () => {
        this._liveSince = Date.now();
        this._unreachable = 0;
        this._report("websocket", "live");
      },
      onClose: (closed) => this._webSocketClosed(closed),
    });
    this._feed.start();
  }

  async _webSocketClosed({code, reason, live}) {
    if (this._stopped) return;
    if (code === CLOSE_TOKEN_REVOKED) return this._unauthorized(REVOKED);
    const uptime = live ? Date.now() - this._liveSince : 0;
    const lasted = live && uptime >= this.timing.stableAfterMs;
    if (lasted) this._goingAway = this._goneAway = 0;
    const stopping = code === CLOSE_GOING_AWAY && reason === BROKER_STOPPING;
    if (stopping || (code === CLOSE_GOING_AWAY && live)) {
      // A restart: polling would meet the same broker. Keep to the WebSocket (while the
      // broker is down, the handshake fails and the session check says so, as below),
      // backing off more with each 1001 in a row: only a connection that lasted starts
      // over. A 1001 that comes right after the snapshot, again and again, without the
      // broker's reason, is no restart but a proxy closing WebSockets so: polling then, or
      // the page would reconnect forever. The broker's own 1001 never counts (a rolling
      // restart of several brokers), nor does one that comes later than a proxy loop's.
      // Any other 1001 before the snapshot is a failure like any other (below).
      const why = reason || "the broker went away";
      const quick = live && !stopping && uptime < this.timing.goingAwayWithinMs;
      this._goingAway = quick ? this._goingAway + 1 : 0;
      this._goneAway += 1;
      if (this._goingAway >= this.timing.goingAwayFallbackAfter && this.polling) {
        return this._usePolling(`WebSocket closed as going away ${this._goingAway} times in a`
          + ` row, each within ${this.timing.goingAwayWithinMs / 1000} s of going live (${why})`);
      }
      // While the broker is down, the reconnects go on backing off from here.
      this._unreachable = this._goneAway;
      const delay = backoff(this._goneAway);
      this._report("websocket", "retrying", `${why}; reconnecting in ${delay} s`);
      this._timer = setTimeout(() => this._useWebSocket(), delay * 1000);
      return;
    }
    if (!live) {
      // A browser cannot see why a handshake was refused: ask whether the token is the
      // reason, or the broker (down, restarting, or a proxy without it: 502-504).
      let unreachable = false;
      try {
        await this.api.session();
      } catch (error) {
        if (error.status === 401) return this._unauthorized(REVOKED);
        unreachable = error.status === 0 || error.status >= 500;
      }
      if (this._stopped) return;
      if (unreachable) {
        // Not the WebSocket's fault: polling would fail too. Keep trying the WebSocket.
        const delay = backoff(++this._unreachable);
        this._report("websocket", "retrying",
          `the broker cannot be reached; reconnecting in ${delay} s`);
        this._timer = setTimeout(() => this._useWebSocket(), delay * 1000);
        return;
      }
    }
    this._failures = lasted ? 0 : this._failures + 1;
    const why = reason || (live ? "connection lost" : "the WebSocket could not be opened");
    if (this._failures >= this.timing.fallbackAfter && this.polling) {
      return this._usePolling(`WebSocket failed ${this._failures} times in a row (${why})`);
    }
    const delay = lasted ? 1 : backoff(this._failures);
    this._report("websocket", "retrying", `${why}; reconnecting in ${delay} s`);
    this._timer = setTimeout(() => this._useWebSocket(), delay * 1000);
  }

  _usePolling(reason) {
    this._report("polling", "connecting", reason);
    this._feed = new PollingFeed(this.fleet, this.api, this.wait, this.timing.pollGapMs, {
      onLive: () => this._report("polling", "live", reason),
      onTrouble: (error, delay) => this._report("polling", "retrying",
        `${error.message}; retrying in ${delay} s`),
      onUnauthorized: () => this._unauthorized(REVOKED),
    });
    this._feed.start();
    if (this.webSocket) this._timer = setTimeout(() => this._probe(), this.timing.probeIntervalMs);
  }

  /** Try the WebSocket again; one more failure brings the page back to polling. */
  _probe() {
    this._feed.stop();
    this._failures = this.timing.fallbackAfter - 1;
    if (this._goingAway > 0) this._goingAway = this.timing.goingAwayFallbackAfter - 1;
    this._goneAway = 0;
    this._useWebSocket();
  }
}
