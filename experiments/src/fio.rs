//! fio's JSON output, which experiments read their device reference from.

use anyhow::Context;

/// The JSON document fio printed with `--output-format=json`, byte for byte (fio may print
/// warnings before it).
pub fn document(stdout: &[u8]) -> anyhow::Result<&[u8]> {
    let start = stdout
        .iter()
        .position(|&b| b == b'{')
        .context("fio printed no JSON")?;
    Ok(&stdout[start..])
}

/// The JSON document fio printed with `--output-format=json`, parsed.
pub fn json(stdout: &[u8]) -> anyhow::Result<serde_json::Value> {
    serde_json::from_slice(document(stdout)?).context("parsing fio's JSON output")
}
