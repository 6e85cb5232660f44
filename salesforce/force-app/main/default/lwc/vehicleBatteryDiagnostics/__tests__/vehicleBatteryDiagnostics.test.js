import { createElement } from 'lwc';
import VehicleBatteryDiagnostics from 'c/vehicleBatteryDiagnostics';
import getDiagnostics from '@salesforce/apex/VehicleBatteryDiagnosticsController.getDiagnostics';
import { batteryPoints, fitDrain } from '../drain';

jest.mock(
    '@salesforce/apex/VehicleBatteryDiagnosticsController.getDiagnostics',
    () => ({ default: jest.fn() }),
    { virtual: true }
);

const VIN = '5YJ3E1EA001000004';
const START = Date.parse('2026-11-22T10:00:00Z');
const MINUTE = 60000;

/** A Chart.js stand-in: keeps the data it is given. */
class MockChart {
    static instances = [];
    constructor(context, config) {
        this.data = config.data;
        MockChart.instances.push(this);
    }
}

/** A raw history: a reading a minute from an hour before the episode to 10 minutes into it,
 * the battery flat at 80 before and falling `drain` % a minute during. */
function rawHistory(drain) {
    const points = [];
    for (let m = -60; m <= 10; m++) {
        const battery = m < 0 ? 80 : 80 - drain * m;
        points.push({ time: new Date(START + m * MINUTE).toISOString(), event_id: `e${m}`, battery });
    }
    return { vin: VIN, resolution: 'raw', points };
}

function diagnostics(history, extra = {}) {
    return {
        vin: VIN,
        rule: 'battery_drain',
        episodeStart: new Date(START).toISOString(),
        episodeEnd: new Date(START + 10 * MINUTE).toISOString(),
        lastFiredAt: new Date(START + 9 * MINUTE).toISOString(),
        firings: 7,
        history: JSON.stringify(history),
        ...extra
    };
}

const flush = () => new Promise((resolve) => setTimeout(resolve, 0));

async function mount() {
    const element = createElement('c-vehicle-battery-diagnostics', { is: VehicleBatteryDiagnostics });
    element.recordId = '500xx000000001';
    document.body.appendChild(element);
    await flush();
    await flush();
    return element;
}

const find = (element, id) => element.shadowRoot.querySelector(`[data-id="${id}"]`);

beforeEach(() => {
    MockChart.instances = [];
    window.Chart = MockChart;
});

afterEach(() => {
    while (document.body.firstChild) {
        document.body.removeChild(document.body.firstChild);
    }
    jest.clearAllMocks();
});

describe('drain arithmetic', () => {
    it('fits the slope of a straight fall exactly, as a positive drain', () => {
        const points = batteryPoints(rawHistory(3));
        const fit = fitDrain(points, START, START + 10 * MINUTE);
        expect(fit.n).toBe(11);
        expect(fit.ratePerMinute).toBeCloseTo(3, 9);
        // The line passes through the points.
        expect(fit.intercept + fit.slope * (START + 5 * MINUTE)).toBeCloseTo(65, 6);
    });

    it('needs two points spread in time', () => {
        const one = [{ t: START, battery: 50 }];
        expect(fitDrain(one, START, START + MINUTE)).toBeNull();
        expect(fitDrain([...one, { t: START, battery: 40 }], START, START)).toBeNull();
    });

    it('reads the mean of rollup points and leaves out points without a battery', () => {
        const history = {
            resolution: '1m',
            points: [
                { time: '2026-11-22T10:00:00Z', battery_mean: 70, battery_min: 60 },
                { time: '2026-11-22T10:01:00Z', battery_mean: null },
                { time: '2026-11-22T10:02:00Z', battery_mean: 66 }
            ]
        };
        expect(batteryPoints(history)).toEqual([
            { t: Date.parse('2026-11-22T10:00:00Z'), battery: 70 },
            { t: Date.parse('2026-11-22T10:02:00Z'), battery: 66 }
        ]);
        expect(batteryPoints(null)).toEqual([]);
    });
});

describe('c-vehicle-battery-diagnostics', () => {
    it('shows that it is loading until the history arrives', async () => {
        let answer;
        getDiagnostics.mockReturnValue(new Promise((resolve) => (answer = resolve)));
        const element = await mount();
        expect(find(element, 'loading')).not.toBeNull();
        expect(find(element, 'drain')).toBeNull();
        answer(diagnostics(rawHistory(3)));
        await flush();
        await flush();
        expect(find(element, 'loading')).toBeNull();
        expect(find(element, 'drain')).not.toBeNull();
    });

    it('asks for the Case and the hours before, and fits the drain against the threshold', async () => {
        getDiagnostics.mockResolvedValue(diagnostics(rawHistory(3)));
        const element = await mount();
        expect(getDiagnostics).toHaveBeenCalledWith({ caseId: '500xx000000001', hoursBefore: 6 });
        const drain = find(element, 'drain');
        expect(drain.textContent).toContain('3.00 %/min');
        expect(drain.textContent).toContain('above the threshold of 2 %/min');
        expect(drain.className).toContain('error');
        expect(find(element, 'firings').textContent).toContain('fired 7 times');
        expect(find(element, 'other-rule')).toBeNull();
    });

    it('says a slow drain is within the threshold', async () => {
        getDiagnostics.mockResolvedValue(diagnostics(rawHistory(0.5)));
        const element = await mount();
        expect(find(element, 'drain').textContent).toContain('0.50 %/min');
        expect(find(element, 'drain').textContent).toContain('within the threshold');
    });

    it('charts the hours before and the episode apart, with the fitted line over the episode', async () => {
        getDiagnostics.mockResolvedValue(diagnostics(rawHistory(3)));
        await mount();
        await flush();
        expect(MockChart.instances).toHaveLength(1);
        const [before, during, line] = MockChart.instances[0].data.datasets;
        expect(before.data.filter((v) => v !== null)).toHaveLength(60);
        expect(during.data.filter((v) => v !== null)).toHaveLength(11);
        expect(line.data.filter((v) => v !== null)).toHaveLength(11);
        expect(line.data[60]).toBeCloseTo(80, 6);
    });

    it('says so when the history is empty', async () => {
        getDiagnostics.mockResolvedValue(diagnostics({ vin: VIN, resolution: '1m', points: [] }));
        const element = await mount();
        expect(find(element, 'empty')).not.toBeNull();
        expect(find(element, 'drain')).toBeNull();
        expect(MockChart.instances).toHaveLength(0);
    });

    it('shows the reason when Apex fails', async () => {
        getDiagnostics.mockRejectedValue({ body: { message: 'ecars-realtime refused the history (HTTP 401).' } });
        const element = await mount();
        expect(find(element, 'error').textContent).toBe('ecars-realtime refused the history (HTTP 401).');
        expect(find(element, 'loading')).toBeNull();
    });

    it('notes when another rule opened the Case', async () => {
        getDiagnostics.mockResolvedValue(diagnostics(rawHistory(3), { rule: 'low_battery' }));
        const element = await mount();
        expect(find(element, 'other-rule')).not.toBeNull();
    });
});
