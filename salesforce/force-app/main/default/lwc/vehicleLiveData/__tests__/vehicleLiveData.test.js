import { createElement } from 'lwc';
import VehicleLiveData from 'c/vehicleLiveData';
import { getRecord } from 'lightning/uiRecordApi';
import getRelayToken from '@salesforce/apex/VehicleLiveDataController.getRelayToken';

jest.mock(
    '@salesforce/apex/VehicleLiveDataController.getRelayToken',
    () => ({ default: jest.fn() }),
    { virtual: true }
);

const VIN = '5YJ3E1EA001000004';
const OTHER_VIN = '5YJ3E1EA001000007';

/** A WebSocket stand-in that records what the component does with it. */
class MockSocket {
    static instances = [];
    constructor(url) {
        this.url = url;
        this.sent = [];
        this.closed = false;
        MockSocket.instances.push(this);
    }
    send(message) {
        this.sent.push(message);
    }
    close() {
        this.closed = true;
    }
    // What the relay does:
    open() {
        this.onopen && this.onopen();
    }
    deliver(reading) {
        this.onmessage && this.onmessage({ data: JSON.stringify(reading) });
    }
    drop(code = 1006) {
        this.onclose && this.onclose({ code });
    }
}

/** A Chart.js stand-in: keeps the data it is given. */
class MockChart {
    static instances = [];
    constructor(context, config) {
        this.data = config.data;
        this.update = jest.fn();
        MockChart.instances.push(this);
    }
}

function caseWithVin(vin) {
    return {
        apiName: 'Case',
        id: '500xx000000001',
        fields: {
            Vehicle__r: {
                value: vin
                    ? { apiName: 'Vehicle__c', fields: { VIN__c: { value: vin } } }
                    : null
            }
        }
    };
}

function reading(vin, battery) {
    return { vin, battery, range: 200, mpge: 110, speed: 40, date: '2026-11-22T10:00:00.000Z' };
}

const flush = () => new Promise((resolve) => setTimeout(resolve, 0));

async function mount(vin) {
    const element = createElement('c-vehicle-live-data', { is: VehicleLiveData });
    element.recordId = '500xx000000001';
    document.body.appendChild(element);
    getRecord.emit(caseWithVin(vin));
    await flush();
    await flush();
    return element;
}

const chartPoints = () => MockChart.instances[0].data.datasets[0].data;
const status = (element) => element.shadowRoot.querySelector('[data-id="status"]');

beforeEach(() => {
    MockSocket.instances = [];
    MockChart.instances = [];
    global.WebSocket = MockSocket;
    window.Chart = MockChart;
    getRelayToken.mockResolvedValue({ url: 'wss://relay.example.com', token: 'tok-123' });
});

afterEach(() => {
    while (document.body.firstChild) {
        document.body.removeChild(document.body.firstChild);
    }
    jest.useRealTimers();
    jest.clearAllMocks();
});

describe('c-vehicle-live-data', () => {
    it('opens the relay socket for the Case car and sends the token as the first message', async () => {
        await mount(VIN);
        expect(getRelayToken).toHaveBeenCalledWith({ vin: VIN });
        expect(MockSocket.instances).toHaveLength(1);
        const socket = MockSocket.instances[0];
        expect(socket.url).toBe(`wss://relay.example.com/v1/vehicles/${VIN}/live`);
        socket.open();
        expect(JSON.parse(socket.sent[0])).toEqual({ access_token: 'tok-123' });
    });

    it('charts the readings of its own VIN only', async () => {
        const element = await mount(VIN);
        const socket = MockSocket.instances[0];
        socket.open();
        socket.deliver(reading(OTHER_VIN, 10));
        socket.deliver(reading(VIN, 81));
        socket.deliver(reading(VIN, 80));
        await flush();
        expect(chartPoints()).toEqual([81, 80]);
        const latest = element.shadowRoot.querySelector('[data-id="latest"]');
        expect(latest.textContent).toContain('battery 80 %');
    });

    it('stops updating while paused and carries on after resume', async () => {
        const element = await mount(VIN);
        const socket = MockSocket.instances[0];
        socket.open();
        socket.deliver(reading(VIN, 90));
        const button = element.shadowRoot.querySelector('[data-id="pause"]');
        button.click();
        await flush();
        expect(button.label).toBe('Resume');
        socket.deliver(reading(VIN, 89));
        expect(chartPoints()).toEqual([90]);
        button.click();
        socket.deliver(reading(VIN, 88));
        expect(chartPoints()).toEqual([90, 88]);
    });

    it('reconnects with growing delays after the socket closes and says so', async () => {
        jest.useFakeTimers();
        const element = await mountWithFakeTimers(VIN);
        const first = MockSocket.instances[0];
        first.open();
        first.drop();
        await Promise.resolve();
        expect(status(element).textContent).toContain('unreachable; trying again in 1 s');
        jest.advanceTimersByTime(1000);
        await flushFake();
        expect(MockSocket.instances).toHaveLength(2);
        MockSocket.instances[1].drop();
        await Promise.resolve();
        expect(status(element).textContent).toContain('trying again in 2 s');
        jest.advanceTimersByTime(1999);
        await flushFake();
        expect(MockSocket.instances).toHaveLength(2);
        jest.advanceTimersByTime(1);
        await flushFake();
        expect(MockSocket.instances).toHaveLength(3);
        MockSocket.instances[2].open();
        await Promise.resolve();
        expect(status(element)).toBeNull();
    });

    it('says plainly when the Case has no vehicle, and opens nothing', async () => {
        const element = await mount(null);
        expect(MockSocket.instances).toHaveLength(0);
        expect(status(element).textContent).toContain('This Case has no vehicle');
    });

    it('says when the relay is unreachable (no token) and when it refuses access', async () => {
        getRelayToken.mockRejectedValueOnce(new Error('callout failed'));
        const element = await mount(VIN);
        expect(MockSocket.instances).toHaveLength(0);
        expect(status(element).textContent).toContain('The live relay is unreachable');
        element.remove();

        const again = await mount(VIN);
        MockSocket.instances[0].drop(1008);
        await flush();
        expect(status(again).textContent).toContain('refused access');
    });

    it('closes its socket when removed from the page', async () => {
        const element = await mount(VIN);
        const socket = MockSocket.instances[0];
        element.remove();
        expect(socket.closed).toBe(true);
    });
});

/** Mounting with fake timers: settle promises without waiting on real timers. */
async function mountWithFakeTimers(vin) {
    const element = createElement('c-vehicle-live-data', { is: VehicleLiveData });
    element.recordId = '500xx000000001';
    document.body.appendChild(element);
    getRecord.emit(caseWithVin(vin));
    await flushFake();
    return element;
}

async function flushFake() {
    for (let i = 0; i < 5; i += 1) {
        await Promise.resolve();
    }
}
