/**
 * The arithmetic of the battery diagnostic, apart from the component so it can be tested alone.
 */

/**
 * The battery curve of a history answer (`GET /v1/vehicles/{vin}/history`), oldest first:
 * `{ t, battery }` with `t` in epoch milliseconds. Raw points give their battery; rollup points
 * (`1m`, `1h`) their mean. Points without a battery are left out.
 * @param {object} history the parsed answer
 * @returns {{t: number, battery: number}[]}
 */
export function batteryPoints(history) {
    const points = (history && Array.isArray(history.points) && history.points) || [];
    const raw = history && history.resolution === 'raw';
    return points
        .map((p) => ({ t: Date.parse(p.time), battery: raw ? p.battery : p.battery_mean }))
        .filter((p) => Number.isFinite(p.t) && typeof p.battery === 'number');
}

/**
 * The least-squares line of the battery against time over `[from, to]`, as a drain rate:
 * percent per minute, positive when the battery falls (the rule's `max_percent_per_minute`
 * compares with the same number).
 * @param {{t: number, battery: number}[]} points
 * @param {number} from epoch milliseconds
 * @param {number} to epoch milliseconds
 * @returns {{ratePerMinute: number, slope: number, intercept: number, n: number} | null} null
 *   with fewer than two points or no spread in time
 */
export function fitDrain(points, from, to) {
    const inside = points.filter((p) => p.t >= from && p.t <= to);
    const n = inside.length;
    if (n < 2) {
        return null;
    }
    // Centred on the first point: epoch milliseconds squared lose precision.
    const t0 = inside[0].t;
    const xs = inside.map((p) => (p.t - t0) / 60000);
    const ys = inside.map((p) => p.battery);
    const meanX = xs.reduce((a, b) => a + b, 0) / n;
    const meanY = ys.reduce((a, b) => a + b, 0) / n;
    let sxx = 0;
    let sxy = 0;
    for (let i = 0; i < n; i++) {
        sxx += (xs[i] - meanX) ** 2;
        sxy += (xs[i] - meanX) * (ys[i] - meanY);
    }
    if (sxx === 0) {
        return null;
    }
    const slope = sxy / sxx;
    return {
        ratePerMinute: -slope,
        // The line in epoch milliseconds, for drawing.
        slope: slope / 60000,
        intercept: meanY - slope * meanX - (slope / 60000) * t0,
        n
    };
}
