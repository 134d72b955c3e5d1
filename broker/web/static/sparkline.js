// Sparklines: one small inline SVG line per numeric reading, drawn from the
// change history the registry keeps for each device (registry.history_size
// entries) plus the current value.

import {own, svg} from "./dom.js";

const WIDTH = 120;
const HEIGHT = 28;
const PAD = 3;

/** The value of `key` in one history entry's data, if that entry reported it. */
function reportedIn(entry, key) {
  if (entry.kind !== "reported" || entry.data === null || typeof entry.data !== "object") {
    return undefined;
  }
  // A report that carried events keeps its patch under "patch".
  const data = entry.data;
  const patch = Object.hasOwn(data, "patch") && Object.hasOwn(data, "events") ? data.patch : data;
  return own(patch, key);
}

/** [[time, value], ...] of a numeric reported key, oldest first. */
export function series(device, key) {
  const points = [];
  for (const entry of device.history ?? []) {
    const value = reportedIn(entry, key);
    if (typeof value === "number" && Number.isFinite(value)) points.push([entry.at, value]);
  }
  const current = own(device.reported, key);
  const at = own(device.updated_at?.reported, key);
  if (typeof current === "number" && Number.isFinite(current)
      && (points.length === 0 || (at !== undefined && at > points[points.length - 1][0]))) {
    points.push([at ?? points[points.length - 1]?.[0] ?? 0, current]);
  }
  return points;
}

/** An SVG sparkline of points ([[time, value], ...]), or null when there is nothing to draw. */
export function sparkline(points, label) {
  if (points.length === 0) return null;
  const times = points.map(([t]) => t);
  const values = points.map(([, v]) => v);
  const [t0, t1] = [Math.min(...times), Math.max(...times)];
  const [low, high] = [Math.min(...values), Math.max(...values)];
  const x = (t) => t1 === t0 ? WIDTH - PAD : PAD + (t - t0) / (t1 - t0) * (WIDTH - 2 * PAD);
  const y = (v) => high === low
    ? HEIGHT / 2 : HEIGHT - PAD - (v - low) / (high - low) * (HEIGHT - 2 * PAD);
  const chart = svg("svg", {class: "spark", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, width: WIDTH,
                            height: HEIGHT, role: "img",
                            "aria-label": `${label}: ${points.length} values from ${low} to ${high}`});
  const title = svg("title");
  title.textContent = `${label}: ${points.length} values, min ${low}, max ${high}`;
  chart.append(title);
  const coordinates = points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`);
  if (points.length > 1) chart.append(svg("polyline", {points: coordinates.join(" ")}));
  const [lastX, lastY] = coordinates[coordinates.length - 1].split(",");
  chart.append(svg("circle", {cx: lastX, cy: lastY, r: 2}));
  return chart;
}
