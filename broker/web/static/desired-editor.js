// The editor of one device's desired values: change, delete or add a key.
//
// Writes carry the device version the page last saw (expected_version /
// If-Match). The version counts every change of the device, reports
// included, so a refusal alone does not mean another writer touched the
// key: the editor reads the device again, and only when the key's desired
// value is no longer the one the user started from does it show a
// conflict. Otherwise it retries with the new version. Every copy of the
// device read or answered on the way goes into the page's fleet, so the page
// is not left with an older one while its feed is down.
//
// A write whose answer never came (the connection dropped) may or may not
// have been applied: the editor reads the device to find out, and says
// "Saved" only if the key holds the value.

import {editable, h, own, parseValue, place, same, show, unsavable} from "./dom.js";

/** Writes tried before giving up on a device that keeps changing. */
const MAX_ATTEMPTS = 3;

/** `copy`, or `other` if that is a later version of the same device. */
function newer(copy, other) {
  return other && other.device_number === copy.device_number && other.version > copy.version
    ? other : copy;
}

/** One desired key: its input keeps what the user types across updates. */
class DesiredRow {
  constructor(key, editor) {
    this.key = key;
    this.editing = false;
    this.base = undefined;      // the desired value when the edit began
    this._original = "";
    this._desired = h("td", {class: "value"});
    this._reported = h("td", {class: "value"});
    this._state = h("td", {});
    this.row = h("tr", {"data-key": key}, h("th", {scope: "row"}, key), this._desired,
      this._reported, this._state);
    if (editor.readOnly) return;
    this.input = h("input", {type: "text", "aria-label": `desired value of ${key}`,
                             spellcheck: "false"});
    this.input.addEventListener("input", () => {
      if (!this.editing) this.base = own(editor.device?.desired, key);
      this.editing = this.input.value !== this._original;
    });
    const save = () => {
      const problem = unsavable(this.input.value);
      if (problem) return editor.say(`Not saved: ${problem}`, true);
      const base = this.editing ? this.base : own(editor.device?.desired, key);
      editor.write(key, parseValue(this.input.value), base, () => { this.editing = false; });
    };
    this.input.addEventListener("keydown", (event) => { if (event.key === "Enter") save(); });
    this._desired.append(this.input);
    this.row.append(h("td", {class: "actions"},
      h("button", {type: "button", class: "save", "aria-label": `Save ${key}`, onclick: save},
        "Save"),
      h("button", {type: "button", class: "delete", "aria-label": `Delete ${key}`,
                   onclick: () => editor.write(key, null, own(editor.device?.desired, key),
                                           () => {})},
        "Delete")));
  }

  refresh(device) {
    const key = this.key;
    const present = Object.hasOwn(device.desired, key);
    const pending = Object.hasOwn(device.delta, key);
    this.row.className = !present ? "removed" : pending ? "has-delta" : "";
    if (!this.input) {
      this._desired.textContent = present ? show(device.desired[key]) : "";
    } else if (!this.editing) {
      this._original = present ? editable(device.desired[key]) : "";
      this.input.value = this._original;
      // Already rounded when it arrived: say so before anyone edits it.
      const problem = unsavable(this._original);
      this.input.title = problem ? `Shown rounded: ${problem}` : "";
    }
    this._reported.textContent = Object.hasOwn(device.reported, key)
      ? show(device.reported[key]) : "\u2014";
    this._state.replaceChildren(
      !present ? h("span", {class: "badge"}, "deleted elsewhere")
        : pending ? h("span", {class: "badge pending",
                               title: "the device has not reported this value yet"}, "pending")
          : h("span", {class: "badge reached"}, "reached"));
  }
}

export class DesiredEditor {
  /**
   * `current()` gives the page's copy of the device; writes go through `link`,
   * re-reads after a refusal through `api`; `learn(device)` hands the page a copy read
   * or answered outside its feed; `changed()` redraws the page.
   */
  constructor(name, {readOnly, link, api, current, learn, changed}) {
    this.name = name;
    this.readOnly = readOnly;
    this.link = link;
    this.api = api;
    this._current = current;
    this._learn = learn;
    this._changed = changed;
    this._rows = new Map();
    this._body = h("tbody");
    this._none = h("tr", {}, h("td", {colspan: 5, class: "note"}, "No desired values."));
    this.message = h("p", {class: "message", role: "status", "aria-live": "polite"});
    this.conflict = h("div", {id: "conflict", class: "conflict", role: "alert", hidden: true});
    const columns = ["Key", "Desired", "Reported", "State"];
    this.element = h("section", {class: "card"}, h("h2", {}, "Desired"),
      readOnly ? h("p", {class: "note"}, "Read-only token: desired values cannot be changed.") : null,
      this.conflict,
      h("table", {class: "state", id: "desired"},
        h("thead", {}, h("tr", {}, ...columns.map((label) => h("th", {}, label)),
          readOnly ? null : h("th", {}, h("span", {class: "visually-hidden"}, "Actions")))),
        this._body,
        readOnly ? null : h("tfoot", {}, this._addRow())),
      this.message);
  }

  get device() {
    return this._current();
  }

  /** Redraw for the device's latest state (rows being edited keep their input). */
  refresh(device) {
    for (const [key, row] of this._rows) {
      if (!Object.hasOwn(device.desired, key) && !row.editing) this._rows.delete(key);
    }
    for (const key of Object.keys(device.desired)) {
      if (!this._rows.has(key)) this._rows.set(key, new DesiredRow(key, this));
    }
    const rows = [...this._rows.keys()].sort().map((key) => {
      const row = this._rows.get(key);
      row.refresh(device);
      return row.row;
    });
    if (rows.length === 0) rows.push(this._none);
    // Only rows out of place move: a key added or deleted elsewhere leaves the input being
    // typed in, its focus and its selection alone.
    place(this._body, rows);
  }

  /** The row that adds a key. */
  _addRow() {
    const key = h("input", {type: "text", placeholder: "key", "aria-label": "new desired key",
                            spellcheck: "false"});
    const value = h("input", {type: "text", placeholder: "value (JSON or text)",
                              "aria-label": "new desired value", spellcheck: "false"});
    const add = () => {
      const name = key.value.trim();
      if (!name) return this.say("Type a key first.", true);
      const problem = unsavable(value.value);
      if (problem) return this.say(`Not saved: ${problem}`, true);
      this.write(name, parseValue(value.value), own(this.device?.desired, name), () => {
        key.value = "";
        value.value = "";
      });
    };
    value.addEventListener("keydown", (event) => { if (event.key === "Enter") add(); });
    return h("tr", {class: "add"}, h("td", {}, key), h("td", {}, value), h("td", {}), h("td", {}),
      h("td", {class: "actions"}, h("button", {type: "button", class: "add", onclick: add}, "Add")));
  }

  /**
   * Set `key` to `value` (null deletes) if its desired value is still `base`, starting
   * from the copy `device` (by default the page's). `done` runs once the broker accepted
   * the write (or the user kept theirs).
   */
  async write(key, value, base, done, device = this.device) {
    this.conflict.hidden = true;
    for (let attempt = 1; device && attempt <= MAX_ATTEMPTS; attempt++) {
      // Already there (this page's own earlier write, a double click): nothing to do.
      if (same(own(device.desired, key), value ?? undefined)) return this._saved(key, value, done);
      if (!same(own(device.desired, key), base)) {
        return this._showConflict(key, value, device, done);
      }
      this.say(`Sending ${key}\u2026`);
      try {
        this._take(await this.link.setDesired(this.name, {[key]: value}, device.version));
        return this._saved(key, value, done);
      } catch (error) {
        // No answer (status 0): sent or not, applied or not, only the device can tell.
        if (error.status === 0) return this._check(key, value, error, done);
        if (error.code !== "version_conflict") return this.say(`Not saved: ${error.message}`, true);
      }
      // The device changed since the page saw it: was it this key?
      try {
        device = this._fresher(await this.api.device(this.name));
      } catch (error) {
        return this.say(`Not saved: ${error.message}`, true);
      }
    }
    this.say(device ? `Not saved: ${this.name} keeps changing; try again.`
      : `Not saved: there is no device ${this.name}.`, true);
  }

  /** Hand the page a device copy (an HTTP write's answer; a set_desired result is none). */
  _take(answer) {
    if (answer && typeof answer === "object" && answer.name === this.name && answer.desired) {
      this._learn(answer);
    }
  }

  /** The newer of `read` (just read from the broker) and the page's copy, once it has both. */
  _fresher(read) {
    this._take(read);
    return newer(read, this.device);
  }

  /** The write's answer was lost: read the device to learn whether it was applied. */
  async _check(key, value, lost, done) {
    const what = value === null ? `the delete of ${key}` : `${key} = ${show(value)}`;
    this.say(`No answer for ${what} (${lost.message}); reading ${this.name} again\u2026`);
    let device;
    try {
      device = this._fresher(await this.api.device(this.name));
    } catch (error) {
      this._follow(key);
      return this.say(`Not known whether ${what} was saved: ${lost.message}, and ${this.name}`
        + ` could not be read again (${error.message}).`, true);
    }
    if (same(own(device.desired, key), value ?? undefined)) return this._saved(key, value, done);
    const now = own(device.desired, key);
    this._follow(key);
    this.say(`Not known whether ${what} was saved (${lost.message}): ${key} is now `
      + `${now === undefined ? "deleted" : show(now)}.`, true);
  }

  /** Let the row of `key` show the device's value again (not what was typed). */
  _follow(key) {
    const row = this._rows.get(key);
    if (row) row.editing = false;
    this._changed();
  }

  _saved(key, value, done) {
    done();
    this.say(value === null ? `Deleted ${key}.` : `Saved ${key} = ${show(value)}.`);
    this._changed();
  }

  _showConflict(key, value, device, done) {
    const now = own(device.desired, key);
    const theirs = now === undefined ? "it deleted the key" : `it is now ${JSON.stringify(now)}`;
    const mine = value === null ? "Your delete" : `Your value ${JSON.stringify(value)}`;
    const overwrite = () => {
      this.conflict.hidden = true;
      // From the copy the conflict was found in (or a newer one the feed brought since),
      // never the page's older copy: that would only meet the same conflict again.
      this.write(key, value, now, done, newer(device, this.device));
    };
    const discard = () => {
      this.conflict.hidden = true;
      const row = this._rows.get(key);
      if (row) row.editing = false;
      done();
      this._changed();
    };
    this.say("");
    this.conflict.replaceChildren(
      h("strong", {}, "Conflict. "),
      `Another writer changed "${key}" first: ${theirs} (device version ${device.version}). `,
      `${mine} was not saved. `,
      h("button", {type: "button", class: "overwrite", onclick: overwrite},
        value === null ? "Delete anyway" : "Save mine anyway"),
      " ",
      h("button", {type: "button", class: "discard", onclick: discard}, "Keep theirs"));
    this.conflict.hidden = false;
  }

  say(text, error = false) {
    this.message.textContent = text;
    this.message.classList.toggle("error", error);
  }
}
