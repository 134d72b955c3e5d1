// The dashboard's entry point: the access token, the session, the
// transport, and which view is shown (#/ the fleet, #/device/NAME one device).

import {Api, cleanToken} from "./api.js";
import {DevicePage} from "./device-page.js";
import {Fleet} from "./fleet.js";
import {FleetTable} from "./fleet-table.js";
import {Link} from "./transport.js";

const TOKEN_KEY = "ssp-broker.token";
const TRANSPORT_NAMES = {websocket: "WebSocket", polling: "Long polling", none: "Not connected"};
const STATE_NAMES = {connecting: " (connecting\u2026)", retrying: " (reconnecting\u2026)"};
/** A (re)connection that takes longer than this (ms) marks what the page shows as stale. */
const STALE_AFTER_MS = 3000;
const $ = (id) => document.getElementById(id);

/**
 * A token handed over in the URL (#token=...): kept in session storage, removed from the
 * URL (and so from the history). Returns whether there was one.
 */
function takeTokenFromFragment() {
  const match = /^#token=([^&]+)/.exec(location.hash);
  if (!match) return false;
  let token = match[1];
  try {
    token = decodeURIComponent(token);
  } catch (error) {
    if (!(error instanceof URIError)) throw error;    // a mangled copy: let the broker judge it
  }
  sessionStorage.setItem(TOKEN_KEY, cleanToken(token));
  history.replaceState(null, "", `${location.pathname}${location.search}#/`);
  return true;
}

class Dashboard {
  constructor() {
    this.fleet = new Fleet();
    this.table = new FleetTable(this.fleet, {table: $("fleet-table"), filter: $("filter"),
                                             summary: $("summary"), empty: $("empty")});
    this.page = new DevicePage(this.fleet, $("device"));
    this.link = null;
    this.api = null;
    this.readOnly = true;
    this._lostAt = null;      // when the page stopped receiving updates (null: live, or never was)
    this._attempt = 0;        // counts open() calls: only the latest may connect
    // ?transport=polling: skip the WebSocket (for proxies known to break it).
    this.forcePolling = new URLSearchParams(location.search).get("transport") === "polling";
    this.fleet.addEventListener("change", () => this.showCounts());
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = cleanToken($("token-input").value);
      if (token) this.open(token);
    });
    $("sign-out").addEventListener("click", () => this.askToken(""));
    // A URL with a token pasted into this tab changes only the fragment: take it then too.
    addEventListener("hashchange", () => {
      if (takeTokenFromFragment()) this.open(sessionStorage.getItem(TOKEN_KEY));
      else this.route();
    });
  }

  start() {
    takeTokenFromFragment();
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) this.open(token);
    else this.askToken("");
  }

  /** Show the token form, with a message saying why (empty on a first visit or after signing out). */
  askToken(message) {
    this._attempt++;
    this.close();
    sessionStorage.removeItem(TOKEN_KEY);
    document.body.dataset.view = "login";
    $("login-error").textContent = message;
    $("login-error").hidden = !message;
    $("token-input").value = "";
    $("token-input").focus();
  }

  /** Check the token, then connect with it. */
  async open(token) {
    this.close();
    // A newer open() (another token) or askToken() while this one waits makes it moot.
    const attempt = ++this._attempt;
    const api = new Api(token);
    let session;
    try {
      session = await api.session();
      if (attempt !== this._attempt) return;
    } catch (error) {
      if (attempt !== this._attempt) return;
      if (error.status === 401) {
        return this.askToken("This token is not valid: it was mistyped, or it has been revoked.");
      }
      this.notice(error.status === 0 ? "Cannot reach the broker; retrying\u2026"
        : `The broker cannot answer now (${error.message}); retrying\u2026`);
      this._retry = setTimeout(() => this.open(token), 3000);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    this.notice("");
    this.api = api;
    this.readOnly = session.role !== "write";
    document.body.classList.toggle("read-only", this.readOnly);
    $("role").textContent = this.readOnly ? "read-only" : "read & write";
    $("role").dataset.role = session.role;
    $("role").hidden = false;
    $("sign-out").hidden = false;
    this.link = new Link(this.fleet, api, session, {forcePolling: this.forcePolling});
    this.link.addEventListener("status", (event) => this.showTransport(event.detail));
    this.link.addEventListener("unauthorized", (event) => this.askToken(
      `${event.detail} Enter a valid token to continue.`));
    this.link.start();
    this.showCounts();
    this.route();
  }

  /** Stop the transport and forget the fleet. */
  close() {
    clearTimeout(this._retry);
    this.link?.stop();
    this.link = null;
    this.api = null;
    this.page.hide();
    this.fleet.clear();
    $("counts").hidden = true;
    $("role").hidden = true;
    $("sign-out").hidden = true;
    this.showTransport({transport: "none", state: "stopped", detail: ""});
  }

  route() {
    if (!this.link) return;
    const match = /^#\/device\/(.+)$/.exec(location.hash);
    // The focus goes with the view: to the device's name, or back to the link that opened it.
    if (match) {
      document.body.dataset.view = "device";
      const {readOnly, link, api} = this;
      let name = match[1];
      try {
        name = decodeURIComponent(name);
      } catch (error) {
        if (!(error instanceof URIError)) throw error;   // a mangled link: no such device
      }
      this.page.show(name, {readOnly, link, api});
      this.page.focus();
    } else {
      const left = this.page.name;
      document.body.dataset.view = "fleet";
      this.page.hide();
      if (left !== null) {
        $("fleet-table").querySelector(`tr[data-name="${CSS.escape(left)}"] a`)?.focus();
      }
    }
  }

  showCounts() {
    const {online, offline, total} = this.fleet.counts();
    $("count-online").textContent = online;
    $("count-offline").textContent = offline;
    $("count-total").textContent = total;
    $("counts").hidden = this.link === null;
  }

  showTransport({transport, state, detail}) {
    const pill = $("transport");
    pill.dataset.transport = transport;
    pill.dataset.state = state;
    pill.textContent = `${TRANSPORT_NAMES[transport]}${STATE_NAMES[state] ?? ""}`;
    pill.title = detail;
    this.showStale(state);
  }

  /**
   * Values held while no update arrives may be out of date: say since when, and dim them
   * (at once after a failure, after a few seconds while merely connecting, as when the
   * page switches transport), until the link is live again.
   */
  showStale(state) {
    clearTimeout(this._staleTimer);
    if (state === "live" || state === "stopped") {
      if (this._lostAt !== null) this.notice("");
      this._lostAt = null;
      document.body.classList.remove("stale");
      return;
    }
    if (this._lostAt === null && this.fleet.cursor === null) return;   // nothing shown yet
    this._lostAt ??= new Date();
    const mark = () => {
      document.body.classList.add("stale");
      this.notice(`Not receiving updates since ${this._lostAt.toLocaleTimeString()}: `
        + "the values shown may be out of date. Reconnecting\u2026");
    };
    if (state === "retrying") mark();
    else this._staleTimer = setTimeout(mark, STALE_AFTER_MS);
  }

  notice(text) {
    $("notice").textContent = text;
    $("notice").hidden = !text;
  }
}

new Dashboard().start();
