// The broker's HTTP API as the page uses it: the session check, the long
// poll of the change feed, one device, and writes of desired values.
// Every URL is relative to the page, so a broker behind a reverse proxy
// under a path prefix works unchanged.

import {learnClock, toJson} from "./dom.js";

/** A failed request: HTTP status (0: no answer) and the broker's error code and message. */
export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }

  /** Seconds the broker asked us to wait (Retry-After), or null. */
  get retryAfter() {
    return this.details.retryAfter ?? null;
  }
}

/**
 * Whether `token` could be a token at all: tokens are printable ASCII (id.secret in
 * base64url). Anything else (a smart quote, a non-breaking space copied from a document)
 * cannot go in a header: fetch would throw as if the broker were unreachable.
 */
export function plausibleToken(token) {
  return /^[\x21-\x7e]+$/.test(token);
}

/** Invisible characters a copy from a chat or a document may slip into a token. */
const INVISIBLE = /[\s\u00ad\u180e\u200b-\u200f\u2060-\u2064\ufeff]/g;

/** A token as pasted or handed over in a URL, without the invisible characters around or in it. */
export function cleanToken(text) {
  return text.replace(INVISIBLE, "");
}

export class Api {
  constructor(token, base = document.baseURI) {
    this.token = token;
    this.base = base;
  }

  url(path, query = {}) {
    const url = new URL(path, this.base);
    for (const [name, value] of Object.entries(query)) url.searchParams.set(name, String(value));
    return url;
  }

  async request(method, path, {query, body, headers = {}, signal} = {}) {
    if (!plausibleToken(this.token)) {
      // What the broker would answer, had the request been possible.
      throw new ApiError(401, "invalid_token", "this is not a token: it has characters no token has");
    }
    const init = {
      method, signal, cache: "no-store", credentials: "omit",
      headers: {accept: "application/json", authorization: `Bearer ${this.token}`, ...headers},
    };
    if (body !== undefined) {
      init.body = toJson(body);
      init.headers["content-type"] = "application/json";
    }
    let response;
    const sent = Date.now();
    try {
      response = await fetch(this.url(path, query), init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, "network", "the broker cannot be reached");
    }
    learnClock(response.headers.get("date"), sent);
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (error) {
      if (!(error instanceof SyntaxError)) throw error;
    }
    if (!response.ok) {
      const problem = data?.error ?? {};
      const retry = Number(response.headers.get("retry-after"));
      throw new ApiError(response.status, problem.code ?? `http_${response.status}`,
        problem.message ?? `the broker answered ${response.status}`,
        {...problem, retryAfter: Number.isFinite(retry) && retry > 0 ? retry : null});
    }
    return {data, headers: response.headers};
  }

  /** The token's role and the transports on offer: {role, token_id, transports, max_wait}. */
  async session() {
    return (await this.request("GET", "dashboard/session")).data;
  }

  /**
   * One page of the change feed after `since`, waiting up to `wait` s for a change;
   * with `history: false` the devices come without their history.
   */
  async changes(since, wait, signal, {history = true} = {}) {
    const query = {since, wait};
    if (!history) query.history = "false";
    const {data, headers} = await this.request("GET", "api/v1/changes", {query, signal});
    const interval = Number(headers.get("x-poll-interval"));
    return {...data, pollInterval: Number.isFinite(interval) ? interval : 0};
  }

  /** The current state of one device. */
  async device(name) {
    return (await this.request("GET", `api/v1/devices/${encodeURIComponent(name)}`)).data;
  }

  /** Merge `patch` into a device's desired values if it is still at `version` (412 if not). */
  async setDesired(name, patch, version) {
    const headers = version === null || version === undefined ? {} : {"if-match": `"${version}"`};
    return (await this.request("PATCH", `api/v1/devices/${encodeURIComponent(name)}/desired`,
      {body: patch, headers})).data;
  }
}
