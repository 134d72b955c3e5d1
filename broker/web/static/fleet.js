// The page's copy of the registry: the latest JSON of every device, and the
// feed cursor up to which it is complete. Both transports write here, so a
// switch from one to the other resumes from the same cursor and the views
// never know which one is in use.

export class Fleet extends EventTarget {
  constructor() {
    super();
    /** name -> device JSON (DeviceView.to_json()). */
    this.devices = new Map();
    /** Resume point: every change up to it is in `devices` (null: nothing yet). */
    this.cursor = null;
    this._stale = null;
    this._changed = new Set();
    this._scheduled = false;
  }

  /** Take one device from the feed: the latest state, a tombstone, or an older copy (ignored). */
  apply(device) {
    const known = this.devices.get(device.name);
    this._stale?.delete(device.name);
    if (device.removed) {
      if (!known) return;
      this.devices.delete(device.name);
    } else {
      // Two transports may overlap for a moment: never go back in versions.
      const sameDevice = known && known.device_number === device.device_number;
      if (sameDevice && known.version > device.version) return;
      this.devices.set(device.name, device);
    }
    this._touch(device.name);
  }

  /** The feed is about to send a full snapshot: devices it does not send are gone. */
  beginSnapshot() {
    this._stale = new Set(this.devices.keys());
  }

  /** The full snapshot is complete: drop the devices it did not include. */
  endSnapshot() {
    for (const name of this._stale ?? []) {
      this.devices.delete(name);
      this._touch(name);
    }
    this._stale = null;
    this._touch(null);    // even an empty fleet is now known to be empty
  }

  /**
   * Take a copy read outside the feed (the device view's GET): it only freshens a device
   * the feed holds, never adds one. Such a read may have been answered before a removal
   * the feed already applied (it would bring the device back for good), and it says
   * nothing about a snapshot in progress (which devices still exist is the feed's word).
   */
  refresh(device) {
    const known = this.devices.get(device.name);
    if (!known || device.removed || known.device_number !== device.device_number) return;
    if (known.version > device.version) return;
    this.devices.set(device.name, device);
    this._touch(device.name);
  }

  /** Forget everything (signing out). */
  clear() {
    for (const name of this.devices.keys()) this._touch(name);
    this.devices.clear();
    this.cursor = null;
    this._stale = null;
  }

  /** Counts of online, offline and all devices. */
  counts() {
    let online = 0;
    for (const device of this.devices.values()) if (device.connection.online) online += 1;
    return {online, offline: this.devices.size - online, total: this.devices.size};
  }

  /** Dispatch one "change" event (detail: the set of names) per task, however many changes. */
  _touch(name) {
    if (name !== null) this._changed.add(name);
    if (this._scheduled) return;
    this._scheduled = true;
    setTimeout(() => {
      const names = this._changed;
      this._changed = new Set();
      this._scheduled = false;
      this.dispatchEvent(new CustomEvent("change", {detail: names}));
    }, 0);
  }
}
