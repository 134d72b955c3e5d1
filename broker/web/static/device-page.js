// The device view: connection facts, reported state with a sparkline per
// numeric reading, and the desired values (desired-editor.js).

import {ago, brokerNow, h, own, rtt, show, when} from "./dom.js";
import {DesiredEditor} from "./desired-editor.js";
import {series, sparkline} from "./sparkline.js";

/** How often the open device is read again (ms): its last-heard time and RTT change in place. */
const REFRESH_MS = 10_000;
/**
 * Least time between two reads of the open device for its history (ms). The fleet's
 * stream leaves histories out (they would be most of its bytes): the view reads its
 * device's history when the device changes, at most this often.
 */
const HISTORY_MS = 1_000;

export class DevicePage {
  constructor(fleet, root) {
    this.fleet = fleet;
    this.root = root;
    this.name = null;
    this.editor = null;
    this._refresh = null;
    this._history = null;       // the open device's history, as last read
    this._historyOf = -1;       // the device version that history belongs to
    this._reading = null;       // timer of the next read of the open device
    this._readAt = 0;           // when the last read started (ms)
    fleet.addEventListener("change", (event) => {
      if (this.name !== null && event.detail.has(this.name)) this.update();
    });
    setInterval(() => { if (this.name !== null) this._refreshTimes(); }, 5000);
  }

  get device() {
    return this.fleet.devices.get(this.name);
  }

  /** Show device `name`; its desired values are editable unless readOnly. */
  show(name, {readOnly, link, api}) {
    this._stopReading();
    this.name = name;
    this._api = api;
    this._history = null;
    this._historyOf = -1;
    this.editor = new DesiredEditor(name, {readOnly, link, api, current: () => this.device,
                                           learn: (device) => this.fleet.refresh(device),
                                           changed: () => { if (this.name === name) this.update(); }});
    this.status = h("span", {class: "status"});
    this.missing = h("p", {class: "missing", hidden: true});
    this.facts = h("dl", {class: "facts"});
    this.reported = h("tbody");
    const headings = ["Key", "Value", "Updated", "History"].map((label) => h("th", {}, label));
    this.cards = [
      h("div", {class: "columns"},
        h("section", {class: "card"}, h("h2", {}, "Connection"), this.facts),
        h("section", {class: "card"}, h("h2", {}, "Reported"),
          h("table", {class: "state", id: "reported"}, h("thead", {}, h("tr", {}, ...headings)),
            this.reported))),
      this.editor.element,
    ];
    this.root.replaceChildren(
      h("p", {}, h("a", {href: "#/"}, "\u2190 All devices")),
      h("div", {class: "title"}, h("h1", {tabindex: -1}, name), this.status),
      this.missing,
      ...this.cards);
    this.update();
    // The registry updates last heard and RTT without a change (no feed entry) until the
    // device reports again: read the device now and then, so the view shows them fresh.
    this._read();
    this._refresh = setInterval(() => this._read(), REFRESH_MS);
  }

  /** Read the open device (with its history) now. */
  _read() {
    clearTimeout(this._reading);
    this._reading = null;
    this._readAt = Date.now();
    const name = this.name;
    this._api.device(name).then((device) => {
      if (this.name !== name) return;
      this._history = device.history;
      this._historyOf = device.version;
      const known = this.device;
      this.fleet.refresh(device);
      // Not applied (older than the copy held, or a device the feed removed or does not
      // hold yet): draw the history read all the same.
      if (known === this.device) this.update();
    }, () => {});
  }

  /** The open device changed without its history: read it again, at most every HISTORY_MS. */
  _readSoon() {
    if (this._reading !== null) return;
    const wait = Math.max(0, this._readAt + HISTORY_MS - Date.now());
    this._reading = setTimeout(() => this._read(), wait);
  }

  _stopReading() {
    clearInterval(this._refresh);
    clearTimeout(this._reading);
    this._reading = null;
  }

  /** Put the keyboard focus on the device's name (the view was just opened). */
  focus() {
    this.root.querySelector("h1")?.focus();
  }

  hide() {
    this._stopReading();
    this.name = null;
    this._history = null;
    this.editor = null;
    this.root.replaceChildren();
  }

  update() {
    const device = this.device;
    this.missing.hidden = device !== undefined;
    this.status.hidden = device === undefined;
    for (const card of this.cards) card.hidden = device === undefined;
    if (device === undefined) {
      this.missing.textContent = this.fleet.cursor === null
        ? "Loading\u2026" : `There is no device named "${this.name}" (it may have been removed).`;
      return;
    }
    const online = device.connection.online;
    this.status.className = `status ${online ? "online" : "offline"}`;
    this.status.textContent = online ? "online" : "offline";
    this._renderFacts(device);
    this._renderReported(device);
    this.editor.refresh(device);
  }

  _renderFacts(device) {
    const c = device.connection;
    const facts = [
      ["Last heard", h("span", {class: "heard", title: when(c.last_heard)}, ago(c.last_heard))],
      ["Address", c.address ?? "\u2014"],
      ["RTT", rtt(c.rtt) || "\u2014"],
      ["Session", c.session_id ?? "\u2014"],
      ["Device number", device.device_number],
      ["Version", String(device.version)],
    ];
    this.facts.replaceChildren(
      ...facts.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
  }

  _renderReported(device) {
    if (device.history) {
      this._history = device.history;      // a copy that carries it (a read)
      this._historyOf = device.version;
    } else {
      if (this._history === null || device.version > this._historyOf) this._readSoon();
      device = {...device, history: this._history ?? []};
    }
    const rows = Object.keys(device.reported).sort().map((key) => {
      const at = own(device.updated_at?.reported, key);
      return h("tr", {class: Object.hasOwn(device.delta, key) ? "has-delta" : "", "data-key": key},
        h("th", {scope: "row"}, key),
        h("td", {class: "value"}, show(device.reported[key])),
        h("td", {class: "heard", "data-at": at ?? "", title: when(at)}, ago(at)),
        h("td", {}, sparkline(series(device, key), key)));
    });
    if (rows.length === 0) {
      rows.push(h("tr", {}, h("td", {colspan: 4, class: "note"}, "Nothing reported yet.")));
    }
    this.reported.replaceChildren(...rows);
  }

  /** Relative times age without any change: rewrite just those. */
  _refreshTimes() {
    const now = brokerNow();
    for (const cell of this.reported.querySelectorAll("td.heard")) {
      cell.textContent = ago(cell.dataset.at === "" ? null : Number(cell.dataset.at), now);
    }
    const heard = this.facts.querySelector(".heard");
    if (heard && this.device) heard.textContent = ago(this.device.connection.last_heard, now);
  }
}
