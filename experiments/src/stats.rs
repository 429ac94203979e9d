//! Latency percentiles from hdrhistogram, and the histograms themselves as text.

use std::time::Duration;

use base64::Engine as _;
use hdrhistogram::serialization::{Serializer as _, V2DeflateSerializeError, V2DeflateSerializer};
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
    /// The histogram in HdrHistogram's V2 deflate serialisation, base64 encoded (the
    /// `HISTFAAA…` text that the Java and Python HdrHistogram `decode` read), so
    /// percentiles can be taken later from histograms merged across repetitions.
    pub fn to_v2_base64(&self) -> Result<String, V2DeflateSerializeError> {
        let mut bytes = Vec::new();
        V2DeflateSerializer::new().serialize(&self.h, &mut bytes)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
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

    fn decode(text: &str) -> Histogram<u64> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .unwrap();
        hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .unwrap()
    }

    #[test]
    fn v2_base64_round_trip() {
        let mut h = LatencyHist::new();
        for v in 1..=1000 {
            h.record(v);
        }
        h.record(3_600_000_000);
        let text = h.to_v2_base64().unwrap();
        assert!(text.starts_with("HISTFAAA"), "{text}");
        let back = decode(&text);
        assert_eq!(back, h.h);
        assert_eq!(LatencyHist { h: back }.percentiles(), h.percentiles());
        // An empty histogram is written too (a configuration that measured nothing).
        assert!(decode(&LatencyHist::new().to_v2_base64().unwrap()).is_empty());
    }

    /// The histogram of 1..=1000 that notebooks/test_claims.py decodes with Python's
    /// HdrHistogram: both sides read the same bytes to the same percentiles.
    #[test]
    fn fixture_shared_with_the_notebooks() {
        let h = decode(include_str!("../../notebooks/testdata/hist-1-to-1000.txt"));
        assert_eq!(h.len(), 1000);
        assert_eq!(h.value_at_quantile(0.50), 500);
        assert_eq!(h.value_at_quantile(0.99), 990);
    }
}
