//! SIGINT / SIGTERM: finish the current optimizer step, write a checkpoint, then stop.
//!
//! ```no_run
//! let stop = dpo::train::interrupt::StopSignal::install().unwrap();
//! if let Some(sig) = stop.received() { println!("stopping on signal {sig}"); }
//! ```
use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;

/// The first stop signal received, if any.
pub struct StopSignal {
    received: Arc<AtomicUsize>,
}

impl StopSignal {
    pub fn install() -> Result<Self> {
        let received = Arc::new(AtomicUsize::new(0));
        for sig in [SIGINT, SIGTERM] {
            let r = received.clone();
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe {
                signal_hook::low_level::register(sig, move || {
                    let _ = r.compare_exchange(0, sig as usize, Ordering::SeqCst, Ordering::SeqCst);
                })?;
            }
        }
        Ok(Self { received })
    }

    pub fn received(&self) -> Option<i32> {
        match self.received.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

/// The run stopped on a signal after writing a checkpoint; the CLI exits with 128 + signal.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub checkpoint: std::path::PathBuf,
    pub output_dir: std::path::PathBuf,
    /// The subcommand that resumes it (`dpo train`, `dpo sft`, `dpo reward train`).
    pub command: &'static str,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted by signal {}: checkpoint written to {}; resume with `{} --resume {}`",
            self.signal,
            self.checkpoint.display(),
            self.command,
            self.output_dir.display()
        )
    }
}

impl std::error::Error for Interrupted {}
