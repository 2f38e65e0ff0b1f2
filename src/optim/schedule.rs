//! Learning-rate schedules with transformers' `get_*_schedule_with_warmup` semantics.
//!
//! The rate of optimizer step `k` (1-based) is `lr · λ(k − 1)`, as `LambdaLR` gives it.
//!
//! ```
//! use dpo::optim::schedule::{LrSchedule, Schedule};
//! let s = LrSchedule { kind: Schedule::Linear, base_lr: 1.0, warmup_steps: 2, total_steps: 10 };
//! assert_eq!(s.lr_at(1), 0.0);
//! assert_eq!(s.lr_at(2), 0.5);
//! assert_eq!(s.lr_at(3), 1.0);
//! ```

/// `--lr-scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    /// The rate used by optimizer step `step` (1-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step.saturating_sub(1))
    }

    fn factor(&self, current: usize) -> f64 {
        let (w, total) = (self.warmup_steps, self.total_steps);
        if current < w {
            return current as f64 / w.max(1) as f64;
        }
        let progress = (current - w) as f64 / total.saturating_sub(w).max(1) as f64;
        match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => (total.saturating_sub(current) as f64 / total.saturating_sub(w).max(1) as f64).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        let s = |kind| LrSchedule { kind, base_lr: 1.0, warmup_steps: 2, total_steps: 10 };
        // step k uses lambda(k-1): warmup 0, 0.5, then the decay from step 3 on.
        assert_eq!(s(Schedule::Constant).lr_at(1), 0.0);
        assert_eq!(s(Schedule::Constant).lr_at(10), 1.0);
        assert_eq!(s(Schedule::Linear).lr_at(7), 0.5); // (10 - 6) / 8
        assert!((s(Schedule::Cosine).lr_at(7) - 0.5).abs() < 1e-12); // progress 0.5
        assert_eq!(s(Schedule::Linear).lr_at(11), 0.0);
    }
}
