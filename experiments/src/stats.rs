//! Latency percentiles from hdrhistogram.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Percentiles of one histogram, in the histogram's unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// A latency histogram (values in the unit the caller chooses: ns, us or ms).
#[derive(Debug, Clone)]
pub struct LatencyHist {
    h: Histogram<u64>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHist {
    /// Three significant digits, auto-resizing.
    pub fn new() -> LatencyHist {
        let mut h = Histogram::new(3).expect("3 significant figures is a valid precision");
        h.auto(true);
        LatencyHist { h }
    }
    pub fn record(&mut self, v: u64) {
        // With auto-resize on, recording cannot fail for any u64.
        let _ = self.h.record(v);
    }
    pub fn record_us(&mut self, d: Duration) {
        self.record(d.as_micros() as u64);
    }
    pub fn record_ns(&mut self, d: Duration) {
        self.record(d.as_nanos() as u64);
    }
    /// Records `value` `count` times (for histograms shipped between processes).
    pub fn record_n(&mut self, value: u64, count: u64) {
        let _ = self.h.record_n(value, count);
    }
    /// The recorded (value, count) pairs: with [`LatencyHist::record_n`], a histogram
    /// crosses a process boundary as plain numbers.
    pub fn recorded(&self) -> Vec<(u64, u64)> {
        self.h
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }
    pub fn merge(&mut self, other: &LatencyHist) {
        let _ = self.h.add(&other.h);
    }
    pub fn len(&self) -> u64 {
        self.h.len()
    }
    pub fn is_empty(&self) -> bool {
        self.h.is_empty()
    }
    pub fn percentiles(&self) -> Percentiles {
        if self.h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: self.h.len(),
            p50: self.h.value_at_quantile(0.50),
            p90: self.h.value_at_quantile(0.90),
            p99: self.h.value_at_quantile(0.99),
            p999: self.h.value_at_quantile(0.999),
            max: self.h.max(),
            mean: self.h.mean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_1_to_1000() {
        let mut h = LatencyHist::new();
        for v in 1..=1000 {
            h.record(v);
        }
        let p = h.percentiles();
        assert_eq!(p.count, 1000);
        assert_eq!(p.p50, 500);
        assert_eq!(p.p99, 990);
        assert_eq!(p.max, 1000);
        assert_eq!(LatencyHist::new().percentiles(), Percentiles::default());
        let mut copy = LatencyHist::new();
        for (v, c) in h.recorded() {
            copy.record_n(v, c);
        }
        assert_eq!(copy.percentiles(), p);
    }
}
