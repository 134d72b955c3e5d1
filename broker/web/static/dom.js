// Small DOM and formatting helpers. The page builds every element with
// these (text nodes only, never HTML strings), which is what lets the
// Content-Security-Policy forbid inline script and require Trusted Types.

/** Create an element: h("td", {class: "num", title: "x"}, "text", child). */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  element.append(...children.filter((child) => child !== null && child !== undefined));
  return element;
}

/**
 * Make `children` the children of `parent`, in this order, moving only those out of place.
 * A moved or removed element loses the keyboard focus (and an input its selection), so
 * children that go are removed first (the others then rarely need to move), and if the
 * focused element had to move all the same, it gets the focus and its selection back.
 */
export function place(parent, children) {
  const focused = parent.contains(document.activeElement) ? document.activeElement : null;
  const selection = focused && typeof focused.selectionStart === "number"
    ? [focused.selectionStart, focused.selectionEnd, focused.selectionDirection] : null;
  const keep = new Set(children);
  for (const child of [...parent.childNodes]) if (!keep.has(child)) child.remove();
  let at = parent.firstChild;
  for (const child of children) {
    if (child === at) at = at.nextSibling;
    else parent.insertBefore(child, at);
  }
  if (focused?.isConnected && document.activeElement !== focused) {
    focused.focus({preventScroll: true});
    if (selection) focused.setSelectionRange(...selection);
  }
}

/** Create an SVG element with attributes. */
export function svg(tag, attributes = {}) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  return element;
}

/**
 * Seconds to add to the browser's clock to read the broker's. Times in the registry come
 * from the broker's clock; measured against a browser's clock that is off (no time sync,
 * a gateway without a real-time clock) a value heard now would read "3 h ago", or a
 * silent device "just now".
 */
let clockOffset = 0;

/** The broker's time now, in epoch seconds (as far as its Date headers tell). */
export function brokerNow() {
  return Date.now() / 1000 + clockOffset;
}

/**
 * Learn the broker's clock from an answer's Date header. Twisted dates it when the request
 * arrives (even a long poll answered much later), so it is compared with when the request
 * was sent (ms). The header has whole seconds: a difference under 2 s is read as none.
 */
export function learnClock(dateHeader, sentMs) {
  const at = Date.parse(dateHeader ?? "");
  if (!Number.isFinite(at)) return;
  const offset = (at + 500 - sentMs) / 1000;
  clockOffset = Math.abs(offset) < 2 ? 0 : offset;
}

/** "just now", "12 s ago", "5 min ago", "3 h ago", "2 d ago"; "never" for null. */
export function ago(epochSeconds, nowSeconds = brokerNow()) {
  if (epochSeconds === null || epochSeconds === undefined) return "never";
  const seconds = Math.max(0, nowSeconds - epochSeconds);
  if (seconds < 2) return "just now";
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

/** A full local date and time for an epoch-seconds value (tooltips). */
export function when(epochSeconds) {
  return epochSeconds === null || epochSeconds === undefined
    ? "" : new Date(epochSeconds * 1000).toLocaleString();
}

/** Round-trip time in seconds as "12 ms". */
export function rtt(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 0.0001) return "<0.1 ms";
  return seconds < 0.01 ? `${(seconds * 1000).toFixed(1)} ms` : `${Math.round(seconds * 1000)} ms`;
}

/** A reported or desired value as short text ({"$bytes": b64} shown as its size). */
export function show(value) {
  if (value === null || value === undefined) return "null";
  if (typeof value === "string") return value;
  if (typeof value === "object" && !Array.isArray(value)
      && Object.keys(value).length === 1 && typeof value.$bytes === "string") {
    return `<${Math.floor(value.$bytes.replace(/=+$/, "").length * 3 / 4)} bytes>`;
  }
  return JSON.stringify(value);
}

/** Text typed in the editor as a value: JSON if it parses (42, true, "x", {...}), else the text. */
export function parseValue(text) {
  const trimmed = text.trim();
  if (trimmed === "") return "";
  try {
    return JSON.parse(trimmed);
  } catch (error) {
    if (error instanceof SyntaxError) return text;
    throw error;
  }
}

/** A JSON string or number (matchAll copies it: the `g` state is never shared). */
const JSON_TOKEN = /"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;

/**
 * The first integer in JSON `text` that a browser cannot hold exactly (beyond
 * ±Number.MAX_SAFE_INTEGER, 2^53 - 1), or null. The registry keeps integers up to 2^64;
 * the page's numbers are doubles, so such an integer, read or typed, is rounded
 * (2^60 + 1 becomes 2^60) and writing it back would change it. Numbers with a fraction or
 * an exponent are floats on both sides: they are not integers here.
 */
export function unsafeInteger(text) {
  for (const [found] of text.matchAll(JSON_TOKEN)) {
    if (found.startsWith('"') || /[.eE]/.test(found)) continue;
    if (!Number.isSafeInteger(Number(found))) return found;
  }
  return null;
}

/**
 * The first number in JSON `text` too large for a browser at all (1e400, -1e999), or null.
 * JSON.parse reads it as Infinity, which JSON has no word for: JSON.stringify would send
 * it as null, and in a merge patch null deletes the key.
 */
export function overflowingNumber(text) {
  for (const [found] of text.matchAll(JSON_TOKEN)) {
    if (!found.startsWith('"') && !Number.isFinite(Number(found))) return found;
  }
  return null;
}

/**
 * Why text typed in the editor cannot be saved as it reads (null if it can): it holds a
 * number beyond the browser's range, or an integer the browser would round. Text that is
 * not JSON is saved as text: nothing rounds.
 */
export function unsavable(text) {
  if (typeof parseValue(text) === "string") return null;
  const huge = overflowingNumber(text);
  if (huge !== null) {
    return `${huge} is beyond the numbers a browser holds (\u00b1${Number.MAX_VALUE}),`
      + " so it cannot be saved as a number. Put it in quotes to save it as text.";
  }
  const found = unsafeInteger(text);
  return found === null ? null
    : `${found} is beyond the integers a browser holds exactly (\u00b1${Number.MAX_SAFE_INTEGER}),`
      + " so it would be saved rounded. Change this value over the API, or put the number"
      + " in quotes to save it as text; a float this large is written with an exponent"
      + " (1e17).";
}

/**
 * JSON text of `value` whose numbers beyond 2^53 keep an exponent (1e+17), as floats.
 * JSON.stringify writes such a double as bare digits, which the registry reads as an
 * integer: a float typed as 1e17 would be stored as the integer 10^17, and 1e20 refused as
 * an integer beyond 64 bits. Integers that large never get here (unsavable refuses them).
 * Infinity and NaN throw a RangeError: JSON.stringify would write them as null, which in a
 * merge patch deletes the key.
 */
export function toJson(value) {
  const marks = new Map();
  const tag = `\u0000${Math.random().toString(36).slice(2)}:`;
  const text = JSON.stringify(value, (key, item) => {
    if (typeof item === "number" && !Number.isFinite(item)) {
      throw new RangeError(`${key ? `"${key}" is ` : ""}${item}, which JSON cannot carry`
        + " (it would be sent as null, and null deletes)");
    }
    if (typeof item !== "number" || Number.isSafeInteger(item) || !Number.isInteger(item)) {
      return item;
    }
    const mark = `${tag}${marks.size}`;
    marks.set(mark, item.toExponential());
    return mark;
  });
  return marks.size === 0 ? text
    : text.replace(/"\\u0000[0-9a-z]*:\d+"/g,
                   (quoted) => marks.get(JSON.parse(quoted)) ?? quoted);
}

/** A value as the editor shows it: strings bare unless they would parse as something else. */
export function editable(value) {
  if (typeof value !== "string") return JSON.stringify(value);
  return parseValue(value) === value ? value : JSON.stringify(value);
}

/**
 * `object[key]` if `object` has that key of its own, else undefined. A key read from the
 * registry may be named like a member every object inherits ("constructor", "toString"):
 * `key in object` and a bare `object[key]` would find the inherited one.
 */
export function own(object, key) {
  return object !== null && typeof object === "object" && Object.hasOwn(object, key)
    ? object[key] : undefined;
}

/** Whether two JSON values are equal (as the registry compares them). */
export function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}
