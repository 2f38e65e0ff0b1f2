//! The keys and values a decoder layer has computed so far, for decoding one token at a time:
//! `[rows, kv_heads, slots, head_dim]` each (before grouped-query heads are repeated), one entry
//! per layer.
//!
//! ```
//! let cache = dpo::model::kv_cache::KvCache::new(4);
//! assert_eq!(cache.slots(), 0);
//! ```
use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl LayerKv {
    /// Appends this forward's keys and values (`[rows, kv_heads, new, head_dim]`) and returns
    /// all of them.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match (self.k.take(), self.v.take()) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            _ => (k, v),
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }

    fn slots(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[2])
    }
}

/// Every layer's cached keys and values.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![LayerKv::default(); num_layers] }
    }

    /// Slots cached per row.
    pub fn slots(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::slots)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let size = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes());
        self.layers.iter().map(|l| size(&l.k) + size(&l.v)).sum()
    }
}
