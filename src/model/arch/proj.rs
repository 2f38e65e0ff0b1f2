//! The linear layers of a decoder layer, by name: what they read, where their output goes,
//! and their peft module names. Families with fused projections (Phi-3's `qkv_proj` and
//! `gate_up_proj`) have one linear where others have two or three.
//!
//! ```
//! use dpo::model::arch::Proj;
//! assert_eq!(Proj::GateUp.module(), "gate_up_proj");
//! assert_eq!(Proj::parse_short("v").unwrap(), Proj::V);
//! ```
use anyhow::{Result, bail};

/// A decoder layer's linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    /// q, k and v as one `[q + 2·kv, hidden]` weight (Phi-3).
    Qkv,
    O,
    Gate,
    Up,
    /// gate then up as one `[2·intermediate, hidden]` weight (Phi-3).
    GateUp,
    Down,
}

/// What a linear reads: linears with the same input share it (and, on the CPU layer op, one
/// LoRA `A` GEMM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjInput {
    /// The attention block's (normed) input; output into the `[q | k | v]` buffer.
    Attention,
    /// The attention heads' output; output into the residual stream.
    AttentionOut,
    /// The MLP's (normed) input; output into the `[gate | up]` buffer.
    Mlp,
    /// The activated MLP hidden state; output into the residual stream.
    MlpOut,
}

/// Every linear a family can have, in the order a forward pass uses them.
pub const ALL: [Proj; 9] =
    [Proj::Q, Proj::K, Proj::V, Proj::Qkv, Proj::O, Proj::Gate, Proj::Up, Proj::GateUp, Proj::Down];

impl Proj {
    /// The module's name in transformers and peft (`q_proj`).
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::Qkv => "qkv_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::GateUp => "gate_up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The short name `--lora-targets` takes (`q`, `gate_up`).
    pub fn short(self) -> &'static str {
        self.module().trim_end_matches("_proj")
    }

    /// Its path inside a decoder layer: `self_attn.q_proj`.
    pub fn path(self) -> String {
        format!("{}.{}", self.parent(), self.module())
    }

    /// The submodule holding it: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self.input() {
            ProjInput::Attention | ProjInput::AttentionOut => "self_attn",
            ProjInput::Mlp | ProjInput::MlpOut => "mlp",
        }
    }

    pub fn input(self) -> ProjInput {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::Qkv => ProjInput::Attention,
            Proj::O => ProjInput::AttentionOut,
            Proj::Gate | Proj::Up | Proj::GateUp => ProjInput::Mlp,
            Proj::Down => ProjInput::MlpOut,
        }
    }

    /// `(out, in)` features, and the first column it writes in its output buffer, for a layer
    /// with `q`/`kv` attention widths (heads · head_dim), `hidden` and `inter` sizes.
    pub fn geometry(self, hidden: usize, q: usize, kv: usize, inter: usize) -> ((usize, usize), usize) {
        match self {
            Proj::Q => ((q, hidden), 0),
            Proj::K => ((kv, hidden), q),
            Proj::V => ((kv, hidden), q + kv),
            Proj::Qkv => ((q + 2 * kv, hidden), 0),
            Proj::O => ((hidden, q), 0),
            Proj::Gate => ((inter, hidden), 0),
            Proj::Up => ((inter, hidden), inter),
            Proj::GateUp => ((2 * inter, hidden), 0),
            Proj::Down => ((hidden, inter), 0),
        }
    }

    /// `q`, `q_proj` → [`Proj::Q`].
    pub fn parse_short(name: &str) -> Result<Proj> {
        let name = name.trim();
        let module = if name.ends_with("_proj") { name.to_string() } else { format!("{name}_proj") };
        match ALL.iter().find(|p| p.module() == module) {
            Some(p) => Ok(*p),
            None => bail!(
                "unknown LoRA target {name:?}: choose from {} (or all)",
                ALL.iter().map(|p| p.short()).collect::<Vec<_>>().join(",")
            ),
        }
    }
}
