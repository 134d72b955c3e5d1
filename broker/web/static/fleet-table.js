// The fleet view: one row per device, filtered by name, sorted by any
// column, updated in place as changes arrive (rows are rebuilt only for
// devices that changed, and the table at most a few times a second).

import {ago, brokerNow, h, place, rtt, show, when} from "./dom.js";

/** Rows drawn at most; a bigger match asks for a narrower filter. */
const MAX_ROWS = 500;
/** Least time between two redraws (ms). */
const REDRAW_MS = 150;
/** Values listed per cell before "+N more". */
const MAX_VALUES = 6;

const COLUMNS = {
  name: (d) => d.name,
  online: (d) => (d.connection.online ? 0 : 1),
  last_heard: (d) => -(d.connection.last_heard ?? -Infinity),
  address: (d) => d.connection.address ?? "\uffff",
  rtt: (d) => d.connection.rtt ?? Infinity,
  version: (d) => d.version,
  reported: (d) => Object.keys(d.reported).length,
  delta: (d) => -Object.keys(d.delta).length,
};

/**
 * Whether `text` matches `glob` (arrays of characters; * any run, ? any one character).
 * A backtracking RegExp of `.*`s takes time exponential in the stars (a few stars froze the
 * tab); this goes back only to the last star, so at most length(glob) x length(text) steps.
 */
function globMatch(glob, text) {
  let g = 0;
  let t = 0;
  let star = -1;      // where the last * was in glob ...
  let resume = 0;     // ... and where in text what it swallows would end next
  while (t < text.length) {
    if (g < glob.length && glob[g] === "*") {
      star = g++;
      resume = t;
    } else if (g < glob.length && (glob[g] === "?" || glob[g] === text[t])) {
      g++;
      t++;
    } else if (star >= 0) {
      g = star + 1;
      t = ++resume;
    } else {
      return false;
    }
  }
  while (g < glob.length && glob[g] === "*") g++;
  return g === glob.length;
}

/** A name filter: a glob when it has * or ?, else a case-insensitive substring. */
export function nameFilter(text) {
  const pattern = text.trim();
  if (!pattern) return () => true;
  if (/[*?]/.test(pattern)) {
    const glob = [...pattern.toLowerCase().replace(/\*+/g, "*")];
    return (name) => globMatch(glob, [...name.toLowerCase()]);
  }
  const lower = pattern.toLowerCase();
  return (name) => name.toLowerCase().includes(lower);
}

/** key=value chips for a map; `kind` is a CSS class ("delta" highlights). */
export function chips(map, kind) {
  const keys = Object.keys(map);
  const cell = h("span", {class: `chips ${kind}`});
  for (const key of keys.slice(0, MAX_VALUES)) {
    cell.append(h("span", {class: "chip", title: `${key} = ${show(map[key])}`},
      h("span", {class: "k"}, key), "=", h("span", {class: "v"}, show(map[key]))));
  }
  if (keys.length > MAX_VALUES) {
    cell.append(h("span", {class: "more"}, `+${keys.length - MAX_VALUES} more`));
  }
  return cell;
}

export class FleetTable {
  constructor(fleet, {table, filter, summary, empty}) {
    this.fleet = fleet;
    this.table = table;
    this.body = table.tBodies[0];
    this.filter = filter;
    this.summary = summary;
    this.empty = empty;
    this.sortKey = "name";
    this.ascending = true;
    this.match = nameFilter("");
    this._rows = new Map();     // name -> {row, device, heard}
    this._order = [];
    this._timer = null;
    fleet.addEventListener("change", () => this.schedule());
    filter.addEventListener("input", () => {
      this.match = nameFilter(filter.value);
      this.schedule();
    });
    for (const button of table.tHead.querySelectorAll("button[data-sort]")) {
      button.addEventListener("click", () => this.sortBy(button.dataset.sort));
    }
    setInterval(() => this.refreshTimes(), 5000);
  }

  sortBy(key) {
    this.ascending = this.sortKey === key ? !this.ascending : true;
    this.sortKey = key;
    for (const th of this.table.tHead.querySelectorAll("th")) {
      const button = th.querySelector("button[data-sort]");
      if (button) th.setAttribute("aria-sort", button.dataset.sort !== key ? "none"
        : this.ascending ? "ascending" : "descending");
    }
    this.schedule();
  }

  schedule() {
    if (this._timer === null) this._timer = setTimeout(() => this.render(), REDRAW_MS);
  }

  render() {
    this._timer = null;
    const value = COLUMNS[this.sortKey];
    const direction = this.ascending ? 1 : -1;
    const matching = [];
    for (const device of this.fleet.devices.values()) if (this.match(device.name)) matching.push(device);
    matching.sort((a, b) => {
      const [x, y] = [value(a), value(b)];
      const order = x < y ? -1 : x > y ? 1 : 0;
      return order * direction || (a.name < b.name ? -1 : 1);
    });
    const shown = matching.slice(0, MAX_ROWS);
    const rows = shown.map((device) => this._row(device));
    const order = shown.map((device) => device.name);
    if (order.length !== this._order.length || order.some((name, i) => name !== this._order[i])) {
      place(this.body, rows);
      this._order = order;
    }
    for (const name of this._rows.keys()) if (!this.fleet.devices.has(name)) this._rows.delete(name);
    const total = this.fleet.devices.size;
    this.summary.textContent = matching.length > MAX_ROWS
      ? `showing ${MAX_ROWS} of ${matching.length} matching devices: narrow the filter`
      : matching.length === total ? "" : `${matching.length} of ${total} devices match`;
    this.empty.hidden = total > 0 || this.fleet.cursor === null;
  }

  /**
   * The row of a device: the cached one if the device did not change, else rebuilt in
   * place. The name cell (the link) is kept: replacing it would take the focus from it.
   */
  _row(device) {
    const cached = this._rows.get(device.name);
    if (cached && cached.device === device) return cached.row;
    let row = cached?.row;
    const name = cached?.name ?? h("td", {class: "name"},
      h("a", {href: `#/device/${encodeURIComponent(device.name)}`}, device.name));
    if (row) {
      while (row.lastChild !== name) row.lastChild.remove();
    } else {
      row = h("tr", {}, name);
    }
    const c = device.connection;
    const heard = h("td", {class: "heard", title: when(c.last_heard)}, ago(c.last_heard));
    const pending = Object.keys(device.delta).length > 0;
    row.className = pending ? "has-delta" : "";
    row.dataset.name = device.name;
    const state = c.online ? "online" : "offline";
    row.append(
      h("td", {}, h("span", {class: `status ${state}`}, state)),
      heard,
      h("td", {class: "address"}, c.address ?? ""),
      h("td", {class: "num"}, rtt(c.rtt)),
      h("td", {class: "num"}, String(device.version)),
      h("td", {class: "reported"}, chips(device.reported, "reported")),
      h("td", {class: "delta"}, pending ? chips(device.delta, "delta") : ""),
    );
    this._rows.set(device.name, {row, name, device, heard});
    return row;
  }

  /** Relative times age without any change: rewrite just those cells. */
  refreshTimes() {
    const now = brokerNow();
    for (const {device, heard} of this._rows.values()) {
      heard.textContent = ago(device.connection.last_heard, now);
    }
  }
}
