//! Streaming at scale (ignored by default; run with `cargo test --release --test data_stream -- --ignored --nocapture`):
//! generates a large orca JSONL (DPO_STREAM_MB, default 1024 MB) and audits it, printing rows/s
//! and the peak RSS (VmHWM) — memory is the offset index (8 bytes a row), not the data.
mod common;
use common::*;
use dpo::data::PairTokenizer;
use dpo::data::pipeline::{Pipeline, Settings};
use std::io::Write;

#[test]
#[ignore]
fn large_jsonl_streams_with_bounded_memory() {
    let mb: usize = std::env::var("DPO_STREAM_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let dir = scratch("data_stream");
    let path = dir.join("big.jsonl");
    let src = std::fs::read(orca("train")).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for _ in 0..(mb << 20).div_ceil(src.len()) {
        f.write_all(&src).unwrap();
    }
    drop(f);
    let tok = PairTokenizer::from_model_dir(&model_dir("tiny-llama")).unwrap();
    let start = std::time::Instant::now();
    let (p, audit) =
        Pipeline::build(std::slice::from_ref(&path), Settings::default(), tok, &model_dir("tiny-llama")).unwrap();
    let secs = start.elapsed().as_secs_f64();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status.lines().find(|l| l.starts_with("VmHWM")).unwrap_or("VmHWM: ?").to_string();
    println!("{mb} MB, {} rows in {secs:.1}s = {:.0} rows/s; {hwm}", audit.rows_read, audit.rows_read as f64 / secs);
    assert_eq!(p.len(), audit.rows_read);
    assert_eq!(p.pair(p.len() - 1).unwrap(), p.pair(63).unwrap());
    std::fs::remove_file(path).unwrap();
}
