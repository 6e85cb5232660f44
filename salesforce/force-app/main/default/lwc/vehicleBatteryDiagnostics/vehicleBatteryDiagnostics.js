import { LightningElement, api } from 'lwc';
import { loadScript } from 'lightning/platformResourceLoader';
import CHART_JS from '@salesforce/resourceUrl/chartJs';
import getDiagnostics from '@salesforce/apex/VehicleBatteryDiagnosticsController.getDiagnostics';
import { batteryPoints, fitDrain } from './drain';

/** The rule whose drain rate this tab explains. */
const BATTERY_DRAIN = 'battery_drain';

/**
 * The battery diagnostic tab of a Case (eCars' "battery diagnostic", next to the live view):
 * the car's battery from some hours before the anomaly episode to its end, from ecars-realtime's
 * history API (through Apex and the Ecars_Relay Named Credential), the drain rate fitted over
 * the episode against the rule's threshold, and the firings. Loading, empty and error states
 * say what is happening.
 */
export default class VehicleBatteryDiagnostics extends LightningElement {
    @api recordId;
    /** The `battery_drain` rule's `max_percent_per_minute` on the server (2 by default). */
    @api thresholdPercentPerMinute = 2;
    /** Hours of history shown before the episode started. */
    @api hoursBefore = 6;

    state = 'loading';
    errorMessage;
    diagnostics;
    points = [];
    fit;
    chart;
    chartLoading;

    connectedCallback() {
        this.load();
    }

    async load() {
        this.state = 'loading';
        try {
            this.diagnostics = await getDiagnostics({
                caseId: this.recordId,
                hoursBefore: Number(this.hoursBefore)
            });
        } catch (e) {
            this.state = 'error';
            this.errorMessage =
                (e && e.body && e.body.message) || 'The battery history could not be loaded.';
            return;
        }
        let history;
        try {
            history = JSON.parse(this.diagnostics.history);
        } catch (e) {
            this.state = 'error';
            this.errorMessage = 'ecars-realtime answered something that is not a history.';
            return;
        }
        this.resolution = history.resolution;
        this.points = batteryPoints(history);
        this.fit = fitDrain(this.points, this.episodeStart, this.episodeEnd);
        this.state = this.points.length ? 'ready' : 'empty';
    }

    renderedCallback() {
        if (this.state !== 'ready' || this.chartLoading) {
            return;
        }
        this.chartLoading = loadScript(this, CHART_JS)
            .then(() => this.drawChart())
            .catch(() => {
                this.errorMessage = 'The chart library could not be loaded.';
            });
    }

    get isLoading() {
        return this.state === 'loading';
    }

    get isError() {
        return this.state === 'error';
    }

    get isEmpty() {
        return this.state === 'empty';
    }

    get isReady() {
        return this.state === 'ready';
    }

    get title() {
        return this.diagnostics && this.diagnostics.vin
            ? `Battery diagnostic: ${this.diagnostics.vin}`
            : 'Battery diagnostic';
    }

    /** Epoch milliseconds of the episode's start. */
    get episodeStart() {
        return Date.parse(this.diagnostics && this.diagnostics.episodeStart);
    }

    /** Epoch milliseconds of its end: the end, or the last firing while it is open. */
    get episodeEnd() {
        const d = this.diagnostics || {};
        const end = Date.parse(d.episodeEnd || d.lastFiredAt);
        return Number.isFinite(end) ? end : Date.now();
    }

    get isOtherRule() {
        return !!this.diagnostics && this.diagnostics.rule !== BATTERY_DRAIN;
    }

    get threshold() {
        return Number(this.thresholdPercentPerMinute);
    }

    get drainText() {
        if (!this.fit) {
            return 'Too few readings in the episode to fit a drain rate.';
        }
        const rate = this.fit.ratePerMinute.toFixed(2);
        const verdict =
            this.fit.ratePerMinute > this.threshold ? 'above' : 'within';
        return `Fitted drain over the episode: ${rate} %/min (${this.fit.n} points), ${verdict} the threshold of ${this.threshold} %/min.`;
    }

    get aboveThreshold() {
        return !!this.fit && this.fit.ratePerMinute > this.threshold;
    }

    get drainClass() {
        return this.aboveThreshold ? 'slds-text-color_error' : 'slds-text-color_success';
    }

    get firingsText() {
        const d = this.diagnostics || {};
        const firings = d.firings == null ? 0 : d.firings;
        const last = d.lastFiredAt ? `, the last at ${new Date(d.lastFiredAt).toLocaleString()}` : '';
        const state = d.episodeEnd
            ? `ended ${new Date(d.episodeEnd).toLocaleString()}`
            : 'still open';
        return `${d.rule || 'The rule'} fired ${firings} time${firings === 1 ? '' : 's'}${last}; the episode began ${new Date(this.episodeStart).toLocaleString()} and is ${state}.`;
    }

    get rangeText() {
        return `${this.hoursBefore} h before the episode to its end, ${this.resolution === 'raw' ? 'every reading' : `per ${this.resolution === '1h' ? 'hour' : 'minute'} (mean)`}.`;
    }

    drawChart() {
        const container = this.template.querySelector('div.chart');
        if (!container || !window.Chart) {
            return;
        }
        const start = this.episodeStart;
        const end = this.episodeEnd;
        const before = this.points.map((p) => (p.t < start ? p.battery : null));
        const during = this.points.map((p) => (p.t >= start && p.t <= end ? p.battery : null));
        const fit = this.fit;
        const line = this.points.map((p) =>
            fit && p.t >= start && p.t <= end ? fit.intercept + fit.slope * p.t : null
        );
        const canvas = document.createElement('canvas');
        container.appendChild(canvas);
        this.chart = new window.Chart(canvas, {
            type: 'line',
            data: {
                labels: this.points.map((p) => new Date(p.t).toLocaleString()),
                datasets: [
                    { label: 'Battery before the episode (%)', data: before, pointRadius: 0 },
                    { label: 'Battery during the episode (%)', data: during, pointRadius: 0 },
                    { label: 'Fitted drain', data: line, pointRadius: 0, borderDash: [6, 4] }
                ]
            },
            options: { animation: false, responsive: true, spanGaps: false }
        });
    }
}
