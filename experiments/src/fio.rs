//! fio's JSON output, which experiments read their device reference from.

use anyhow::Context;

/// The JSON document fio printed with `--output-format=json` (fio may print warnings
/// before it).
pub fn json(stdout: &[u8]) -> anyhow::Result<serde_json::Value> {
    let start = stdout
        .iter()
        .position(|&b| b == b'{')
        .context("fio printed no JSON")?;
    serde_json::from_slice(&stdout[start..]).context("parsing fio's JSON output")
}
