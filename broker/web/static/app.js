// The dashboard's entry point: the access token, the session, the
// transport, and which view is shown (#/ the fleet, #/device/NAME one device).

import {Api} from "./api.js";
import {DevicePage} from "./device-page.js";
import {Fleet} from "./fleet.js";
import {FleetTable} from "./fleet-table.js";
import {Link} from "./transport.js";

const TOKEN_KEY = "ssp-broker.token";
const TRANSPORT_NAMES = {websocket: "WebSocket", polling: "Long polling", none: "Not connected"};
const STATE_NAMES = {connecting: " (connecting\u2026)", retrying: " (reconnecting\u2026)"};
const $ = (id) => document.getElementById(id);

/** A token handed over in the URL (#token=...): kept in session storage, removed from the URL. */
function takeTokenFromFragment() {
  const match = /^#token=([^&]+)/.exec(location.hash);
  if (!match) return;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  history.replaceState(null, "", `${location.pathname}${location.search}#/`);
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
    // ?transport=polling: skip the WebSocket (for proxies known to break it).
    this.forcePolling = new URLSearchParams(location.search).get("transport") === "polling";
    this.fleet.addEventListener("change", () => this.showCounts());
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (token) this.open(token);
    });
    $("sign-out").addEventListener("click", () => this.askToken(""));
    addEventListener("hashchange", () => this.route());
  }

  start() {
    takeTokenFromFragment();
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) this.open(token);
    else this.askToken("");
  }

  /** Show the token form, with a message saying why (empty on a first visit or after signing out). */
  askToken(message) {
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
    const api = new Api(token);
    let session;
    try {
      session = await api.session();
    } catch (error) {
      if (error.status === 401) {
        return this.askToken("This token is not valid: it was mistyped, or it has been revoked.");
      }
      this.notice(`Cannot reach the broker (${error.message}); retrying\u2026`);
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
    if (match) {
      document.body.dataset.view = "device";
      const {readOnly, link, api} = this;
      this.page.show(decodeURIComponent(match[1]), {readOnly, link, api});
    } else {
      document.body.dataset.view = "fleet";
      this.page.hide();
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
  }

  notice(text) {
    $("notice").textContent = text;
    $("notice").hidden = !text;
  }
}

new Dashboard().start();
