//! Progress for people: an indicatif bar on a terminal, plain log lines otherwise.
//!
//! ```no_run
//! let mut p = dpo::train::progress::Progress::new(100, 10);
//! p.step(1, 0.69, Some(0.5), 1234.0);
//! p.finish();
//! ```
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

pub struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    every: usize,
    started: Instant,
}

impl Progress {
    pub fn new(total: usize, every: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                    .expect("valid template"),
            );
            bar
        });
        Self { bar, total, every: every.max(1), started: Instant::now() }
    }

    /// Step `step`'s loss, its reward accuracy when the task ranks pairs, and its speed.
    pub fn step(&mut self, step: usize, loss: f64, accuracy: Option<f64>, tokens_per_sec: f64) {
        let acc = accuracy.map(|a| format!(" acc {a:.2}")).unwrap_or_default();
        let msg = format!("loss {loss:.4}{acc} {tokens_per_sec:.0} tok/s");
        match &self.bar {
            Some(bar) => {
                bar.set_position(step as u64);
                bar.set_message(msg);
            }
            None if step == 1 || step % self.every == 0 || step == self.total => {
                let elapsed = self.started.elapsed().as_secs_f64();
                let eta = elapsed / step as f64 * (self.total - step) as f64;
                eprintln!("step {step}/{} {msg} elapsed {elapsed:.1}s eta {eta:.1}s", self.total);
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
