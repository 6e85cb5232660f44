import { LightningElement, api, wire } from 'lwc';
import { getRecord, getFieldValue } from 'lightning/uiRecordApi';
import { loadScript } from 'lightning/platformResourceLoader';
import CHART_JS from '@salesforce/resourceUrl/chartJs';
import getRelayToken from '@salesforce/apex/VehicleLiveDataController.getRelayToken';
import VIN_FIELD from '@salesforce/schema/Case.Vehicle__r.VIN__c';

/** Points kept on the chart. */
const MAX_POINTS = 60;
/** What the chart shows, as eCars' component did. */
const SERIES = [
    { field: 'battery', label: 'Battery (%)' },
    { field: 'range', label: 'Range (mi)' },
    { field: 'mpge', label: 'MPGe' },
    { field: 'speed', label: 'Speed (mph)' }
];
/** Longest wait between reconnects. */
const MAX_BACKOFF_MS = 30000;
/** Close code of the relay for a refused token. */
const POLICY_VIOLATION = 1008;

/**
 * The live view of a Case's car: reads the Case's Vehicle VIN, gets a relay token through Apex
 * (a Named Credential holds the relay's API key), opens the relay's WebSocket for that car only,
 * and charts its readings. Pause/resume, reconnect with backoff, and plain messages when the
 * relay is unreachable or the Case has no vehicle.
 */
export default class VehicleLiveData extends LightningElement {
    @api recordId;

    vin;
    paused = false;
    message = 'Loading…';
    latest;
    points = [];
    socket;
    attempts = 0;
    reconnectTimer;
    chart;
    chartLoading;

    @wire(getRecord, { recordId: '$recordId', fields: [VIN_FIELD] })
    wiredCase({ data, error }) {
        if (error) {
            this.message = 'The Case could not be read.';
            return;
        }
        if (!data) {
            return;
        }
        const vin = getFieldValue(data, VIN_FIELD);
        if (!vin) {
            this.close();
            this.vin = undefined;
            this.message = 'This Case has no vehicle. Link a vehicle to see it live.';
            return;
        }
        if (vin !== this.vin) {
            this.vin = vin;
            this.points = [];
            this.latest = undefined;
            this.redraw();
            this.connect();
        }
    }

    renderedCallback() {
        if (this.chartLoading) {
            return;
        }
        this.chartLoading = loadScript(this, CHART_JS)
            .then(() => this.initChart())
            .catch(() => {
                this.message = 'The chart library could not be loaded.';
            });
    }

    disconnectedCallback() {
        this.close();
    }

    get title() {
        return this.vin ? `Live data: ${this.vin}` : 'Live data';
    }

    get pauseLabel() {
        return this.paused ? 'Resume' : 'Pause';
    }

    get cannotPause() {
        return !this.vin;
    }

    get latestText() {
        const r = this.latest;
        return r
            ? `${new Date(r.date).toLocaleTimeString()}: battery ${r.battery} %, range ${r.range} mi, ${r.mpge} MPGe, ${r.speed} mph`
            : '';
    }

    togglePause() {
        this.paused = !this.paused;
    }

    initChart() {
        const container = this.template.querySelector('div.chart');
        if (!container || !window.Chart) {
            return;
        }
        const canvas = document.createElement('canvas');
        container.appendChild(canvas);
        this.chart = new window.Chart(canvas, {
            type: 'line',
            data: {
                labels: [],
                datasets: SERIES.map((s) => ({ label: s.label, data: [], pointRadius: 0 }))
            },
            options: { animation: false, responsive: true }
        });
        this.redraw();
    }

    async connect() {
        this.close();
        const vin = this.vin;
        this.message = 'Connecting to the live relay…';
        let relay;
        try {
            relay = await getRelayToken({ vin });
        } catch (e) {
            this.retryLater('The live relay is unreachable');
            return;
        }
        if (vin !== this.vin) {
            return;
        }
        const socket = new WebSocket(`${relay.url}/v1/vehicles/${encodeURIComponent(vin)}/live`);
        this.socket = socket;
        socket.onopen = () => {
            // The token goes in the first message, not the URL, so it stays out of logs.
            socket.send(JSON.stringify({ access_token: relay.token }));
            this.attempts = 0;
            this.message = undefined;
        };
        socket.onmessage = (event) => this.receive(event.data);
        socket.onclose = (event) => {
            if (this.socket !== socket) {
                return;
            }
            this.socket = undefined;
            this.retryLater(
                event.code === POLICY_VIOLATION
                    ? 'The live relay refused access'
                    : 'The live relay is unreachable'
            );
        };
    }

    receive(text) {
        let reading;
        try {
            reading = JSON.parse(text);
        } catch (e) {
            return;
        }
        // Only this Case's car, whatever the socket carries.
        if (!reading || reading.vin !== this.vin || this.paused) {
            return;
        }
        this.points = [...this.points, reading].slice(-MAX_POINTS);
        this.latest = reading;
        this.redraw();
    }

    redraw() {
        if (!this.chart) {
            return;
        }
        this.chart.data.labels = this.points.map((p) => new Date(p.date).toLocaleTimeString());
        SERIES.forEach((s, i) => {
            this.chart.data.datasets[i].data = this.points.map((p) => p[s.field]);
        });
        this.chart.update();
    }

    retryLater(reason) {
        const delay = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** this.attempts);
        this.attempts += 1;
        this.message = `${reason}; trying again in ${Math.round(delay / 1000)} s.`;
        clearTimeout(this.reconnectTimer);
        // eslint-disable-next-line @lwc/lwc/no-async-operation
        this.reconnectTimer = setTimeout(() => this.connect(), delay);
    }

    close() {
        clearTimeout(this.reconnectTimer);
        this.reconnectTimer = undefined;
        if (this.socket) {
            const socket = this.socket;
            this.socket = undefined;
            socket.onclose = null;
            socket.close();
        }
    }
}
