//! `config.json` → [`Architecture`], the way transformers 5 reads each family's config class:
//! both key styles (transformers 5's `rope_parameters`, per layer type for Gemma 3, and the older
//! `rope_theta` / `rope_scaling` / `partial_rotary_factor` / `rope_local_base_freq` /
//! `sliding_window_pattern` / `hidden_act` keys most Hub files still carry), each class's
//! defaults for absent keys, and a clear error for anything outside the description.
use super::*;
use anyhow::{Context, bail};
use serde_json::{Map, Value};

/// What a family's config class and modeling file fix, beside the values config.json gives.
struct Traits {
    placement: NormPlacement,
    /// Gemma's `x̂·(1 + w)` norms, scaled in f32.
    gemma_norms: bool,
    /// OLMo 2 scales by the weight in f32 too (without the offset).
    norm_scale_in_f32: bool,
    qk_norm: Option<QkNorm>,
    /// `qkv_proj` and `gate_up_proj` (Phi-3).
    fused: bool,
    qkv_bias: Bias,
    o_bias: Bias,
    mlp_bias: Bias,
    /// Embeddings × √hidden, `query_pre_attn_scalar`, soft-capping keys (Gemma).
    embed_scale: bool,
    query_pre_attn_scalar: bool,
    attn_softcap: bool,
    final_softcap: bool,
    activation_key: &'static str,
    /// The config class's defaults for keys a config.json may omit.
    default_tie: bool,
    default_head_dim: Option<usize>,
    default_eps: f64,
    default_max_positions: usize,
}

#[derive(Clone, Copy)]
enum Bias {
    Never,
    Always,
    /// As the config key says (default false).
    Key(&'static str),
}

/// The Llama layout most families start from.
const LLAMA_LIKE: Traits = Traits {
    placement: NormPlacement::Pre,
    gemma_norms: false,
    norm_scale_in_f32: false,
    qk_norm: None,
    fused: false,
    qkv_bias: Bias::Key("attention_bias"),
    o_bias: Bias::Key("attention_bias"),
    mlp_bias: Bias::Never,
    embed_scale: false,
    query_pre_attn_scalar: false,
    attn_softcap: false,
    final_softcap: false,
    activation_key: "hidden_act",
    default_tie: false,
    default_head_dim: None,
    default_eps: 1e-6,
    default_max_positions: 2048,
};

/// Gemma 1's, which Gemma 2 and 3 start from.
const GEMMA: Traits = Traits {
    gemma_norms: true,
    norm_scale_in_f32: true,
    embed_scale: true,
    default_tie: true,
    default_head_dim: Some(256),
    default_max_positions: 8192,
    ..LLAMA_LIKE
};

/// The family table: what each family changes from the layout it starts from.
fn traits(family: Family) -> Traits {
    let (llama_like, gemma) = (LLAMA_LIKE, GEMMA);
    match family {
        Family::Llama => Traits { mlp_bias: Bias::Key("mlp_bias"), ..llama_like },
        Family::Mistral => {
            Traits { qkv_bias: Bias::Never, o_bias: Bias::Never, default_max_positions: 131072, ..llama_like }
        }
        Family::Qwen2 => {
            Traits { qkv_bias: Bias::Always, o_bias: Bias::Never, default_max_positions: 32768, ..llama_like }
        }
        Family::Qwen3 => Traits {
            qk_norm: Some(QkNorm::PerHead),
            default_head_dim: Some(128),
            default_max_positions: 32768,
            ..llama_like
        },
        Family::Gemma => gemma,
        Family::Gemma2 => Traits {
            placement: NormPlacement::Sandwich,
            query_pre_attn_scalar: true,
            attn_softcap: true,
            final_softcap: true,
            activation_key: "hidden_activation",
            ..gemma
        },
        // transformers' Gemma 3 attention never passes attn_logit_softcapping on: not read.
        Family::Gemma3 => Traits {
            placement: NormPlacement::Sandwich,
            qk_norm: Some(QkNorm::PerHead),
            query_pre_attn_scalar: true,
            final_softcap: true,
            activation_key: "hidden_activation",
            default_max_positions: 131072,
            ..gemma
        },
        Family::Phi3 => Traits {
            fused: true,
            qkv_bias: Bias::Never,
            o_bias: Bias::Never,
            default_eps: 1e-5,
            default_max_positions: 4096,
            ..llama_like
        },
        Family::SmolLm3 => {
            Traits { mlp_bias: Bias::Key("mlp_bias"), default_tie: true, default_max_positions: 32768, ..llama_like }
        }
        Family::Olmo2 => Traits {
            placement: NormPlacement::Post,
            norm_scale_in_f32: true,
            qk_norm: Some(QkNorm::AcrossHeads),
            default_eps: 1e-5,
            ..llama_like
        },
    }
}

/// Typed reads of config.json keys; `null` counts as absent, a wrong type is an error naming the key.
struct Keys<'a>(&'a Map<String, Value>);

impl<'a> Keys<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64().map(|n| n as usize).with_context(|| format!("{key} must be a non-negative integer, got {v}"))
            })
            .transpose()
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.usize(key)?.with_context(|| format!("missing required key {key}"))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().with_context(|| format!("{key} must be a number, got {v}"))).transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().with_context(|| format!("{key} must be true or false, got {v}"))).transpose()
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key).map(|v| v.as_str().with_context(|| format!("{key} must be a string, got {v}"))).transpose()
    }
}

pub(super) fn resolve(text: &str) -> Result<Architecture> {
    let json: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
    let map = json.as_object().context("config.json is not a JSON object")?;
    let k = Keys(map);
    let (model_type, family) = family_of(&k)?;
    refuse_features_outside_the_description(&k)?;
    let t = traits(family);

    let hidden_size = k.required("hidden_size")?;
    let num_heads = k.required("num_attention_heads")?;
    let num_kv_heads = k.usize("num_key_value_heads")?.unwrap_or(num_heads);
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        bail!("num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})");
    }
    let head_dim = match k.usize("head_dim")?.or(t.default_head_dim) {
        Some(d) => d,
        None => hidden_size / num_heads,
    };
    let num_layers = k.required("num_hidden_layers")?;
    let max_position_embeddings = k.usize("max_position_embeddings")?.unwrap_or(t.default_max_positions);

    let projections: Vec<Proj> = if t.fused {
        vec![Proj::Qkv, Proj::O, Proj::GateUp, Proj::Down]
    } else {
        vec![Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down]
    };
    let biased = biased_projections(&k, &t, &projections)?;

    let (ropes, rope_of_layer) = ropes(&k, family, head_dim, max_position_embeddings)?;
    let windows = windows(&k, family, num_layers, &rope_of_layer)?;
    let layers = windows.into_iter().zip(rope_of_layer).map(|(window, rope)| LayerSpec { window, rope }).collect();

    let attn_scale = if t.query_pre_attn_scalar {
        let s = k.f64("query_pre_attn_scalar")?.unwrap_or(256.0);
        1.0 / s.sqrt()
    } else {
        1.0 / (head_dim as f64).sqrt()
    };
    let (attn_softcap, final_softcap) = softcaps(&k, &t, family)?;

    Ok(Architecture {
        family,
        model_type,
        hidden_size,
        intermediate_size: k.required("intermediate_size")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size: k.required("vocab_size")?,
        projections,
        biased,
        activation: activation(&k, t.activation_key, family)?,
        norm: RmsNormStyle {
            eps: k.f64("rms_norm_eps")?.unwrap_or(t.default_eps),
            unit_offset: t.gemma_norms,
            scale_in_f32: t.norm_scale_in_f32,
        },
        placement: t.placement,
        qk_norm: t.qk_norm,
        attn_scale,
        attn_softcap,
        final_softcap,
        embed_scale: t.embed_scale.then(|| (hidden_size as f64).sqrt()),
        // A checkpoint without lm_head.weight is tied whatever this says (see the loader).
        tie_word_embeddings: k.bool("tie_word_embeddings")?.unwrap_or(t.default_tie),
        ropes,
        layers,
        max_position_embeddings,
        pad_token_id: first_id(k.get("pad_token_id")),
    })
}

/// The `model_type` and the family it names; an unknown one is refused listing the supported.
fn family_of(k: &Keys) -> Result<(String, Family)> {
    let model_type = k.str("model_type")?.unwrap_or_default().to_string();
    let Some(&(_, family)) = SUPPORTED_MODEL_TYPES.iter().find(|(t, _)| *t == model_type) else {
        let hint = match model_type.as_str() {
            "gemma3" => " (the multimodal Gemma 3 checkpoint: train its text-only model, model_type gemma3_text)",
            "mpt" => " (MPT uses ALiBi attention, which dpo does not implement)",
            _ => "",
        };
        bail!(
            "unsupported model_type {model_type:?}{hint}; dpo supports {}",
            SUPPORTED_MODEL_TYPES.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ")
        );
    };
    Ok((model_type, family))
}

/// The projections that carry a bias, as the family's traits and the config's keys say.
fn biased_projections(k: &Keys, t: &Traits, projections: &[Proj]) -> Result<Vec<Proj>> {
    let on = |b: Bias| -> Result<bool> {
        Ok(match b {
            Bias::Never => false,
            Bias::Always => true,
            Bias::Key(key) => k.bool(key)?.unwrap_or(false),
        })
    };
    let (qkv_bias, o_bias, mlp_bias) = (on(t.qkv_bias)?, on(t.o_bias)?, on(t.mlp_bias)?);
    Ok(projections
        .iter()
        .copied()
        .filter(|p| match p.input() {
            ProjInput::Attention => qkv_bias,
            ProjInput::AttentionOut => o_bias,
            ProjInput::Mlp | ProjInput::MlpOut => mlp_bias,
        })
        .collect())
}

/// Attention and final logit soft-capping, where the family has them: an explicit null turns
/// one off; an absent key takes the class default (Gemma 2: 50 and 30).
fn softcaps(k: &Keys, t: &Traits, family: Family) -> Result<(Option<f64>, Option<f64>)> {
    let softcap = |enabled: bool, key: &str, default: Option<f64>| -> Result<Option<f64>> {
        if !enabled {
            return Ok(None);
        }
        Ok(if k.0.contains_key(key) { k.f64(key)? } else { default })
    };
    let (attn_default, final_default) = if family == Family::Gemma2 { (Some(50.0), Some(30.0)) } else { (None, None) };
    Ok((
        softcap(t.attn_softcap, "attn_logit_softcapping", attn_default)?,
        softcap(t.final_softcap, "final_logit_softcapping", final_default)?,
    ))
}

/// Phi-3's longrope: a short and a long factor per rotary frequency pair.
fn longrope(pk: &Keys, what: &str, rotary_dim: usize, original_max: usize) -> Result<RopeScaling> {
    let list = |key: &str| -> Result<Vec<f64>> {
        let v = pk.get(key).with_context(|| format!("{what}: longrope needs {key}"))?;
        let a = v.as_array().with_context(|| format!("{what}.{key} must be a list of numbers"))?;
        let f: Option<Vec<f64>> = a.iter().map(|x| x.as_f64()).collect();
        let f = f.with_context(|| format!("{what}.{key} must be a list of numbers"))?;
        if f.len() != rotary_dim / 2 {
            bail!("{what}.{key} has {} factors; the rotary dimension {rotary_dim} needs {}", f.len(), rotary_dim / 2);
        }
        Ok(f)
    };
    Ok(RopeScaling::LongRope {
        short: list("short_factor")?,
        long: list("long_factor")?,
        original_max,
        factor: pk.f64("factor")?,
        attention_factor: pk.f64("attention_factor")?,
    })
}

/// Keys that would change the computation in ways dpo does not implement.
fn refuse_features_outside_the_description(k: &Keys) -> Result<()> {
    for key in ["num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size"] {
        if let Some(v) = k.get(key)
            && v.as_u64() != Some(0)
        {
            bail!("{key} = {v}: mixture-of-experts layers are not supported (dense decoders only)");
        }
    }
    if let Some(v) = k.get("quantization_config") {
        let method = v.get("quant_method").and_then(|m| m.as_str()).unwrap_or("?");
        bail!("quantization_config (quant_method {method:?}) is not supported: dpo loads f32/bf16/f16 safetensors");
    }
    if k.bool("alibi")? == Some(true) || k.get("position_embedding_type").is_some_and(|v| v != "rope") {
        bail!("ALiBi / non-rotary position embeddings are not supported (RoPE only)");
    }
    for key in ["attention_dropout", "resid_pdrop", "embd_pdrop", "hidden_dropout"] {
        if let Some(p) = k.f64(key)?
            && p != 0.0
        {
            bail!(
                "{key} = {p}: dropout inside the frozen base model is not implemented (only LoRA dropout); set it to 0.0"
            );
        }
    }
    if k.bool("use_bidirectional_attention")? == Some(true) {
        bail!("use_bidirectional_attention = true: dpo trains causal language models only");
    }
    Ok(())
}

fn activation(k: &Keys, key: &str, family: Family) -> Result<Activation> {
    // Gemma 1 reads hidden_act; its legacy value "gelu" means the tanh approximation.
    let (key, name) = match k.str(key)? {
        Some(name) => (key, name),
        None => match k.str("hidden_act")? {
            Some(name) => ("hidden_act", name),
            None if matches!(family, Family::Gemma | Family::Gemma2 | Family::Gemma3) => (key, "gelu_pytorch_tanh"),
            None => (key, "silu"),
        },
    };
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
        "gelu" if family == Family::Gemma => Ok(Activation::GeluTanh),
        other => bail!("{key} = {other:?} is not supported: choose silu or gelu_pytorch_tanh"),
    }
}

/// The RoPE settings and, per layer, which one it uses (`None` for NoPE layers).
fn ropes(k: &Keys, family: Family, head_dim: usize, max_positions: usize) -> Result<(Vec<Rope>, Vec<Option<usize>>)> {
    let num_layers = k.required("num_hidden_layers")?;
    let partial = k.f64("partial_rotary_factor")?;
    if family == Family::Gemma3 {
        // transformers 5 nests rope_parameters by layer type; older files give rope_theta (full
        // layers, default 1e6), rope_local_base_freq (sliding, default 1e4) and rope_scaling
        // (full layers only).
        let nested = k.get("rope_parameters").and_then(|v| v.as_object());
        let params_for =
            |layer_type: &str, theta_key: &str, default_theta: f64, scaling: Option<&Value>| -> Result<Rope> {
                let mut p =
                    nested.and_then(|n| n.get(layer_type)).and_then(|v| v.as_object()).cloned().unwrap_or_default();
                if let Some(Value::Object(s)) = scaling {
                    for (key, v) in s {
                        p.insert(key.clone(), v.clone());
                    }
                }
                let theta = k.f64(theta_key)?.unwrap_or(default_theta);
                rope_from_params(
                    &p,
                    &format!("rope_parameters.{layer_type}"),
                    theta,
                    partial,
                    head_dim,
                    max_positions,
                    None,
                    family,
                )
            };
        let full = params_for("full_attention", "rope_theta", 1_000_000.0, k.get("rope_scaling"))?;
        let sliding = params_for("sliding_attention", "rope_local_base_freq", 10_000.0, None)?;
        let types = layer_types(k, num_layers)?.unwrap_or_else(|| {
            let pattern = k.usize("sliding_window_pattern").ok().flatten().unwrap_or(6);
            (0..num_layers)
                .map(|i| if (i + 1) % pattern != 0 { "sliding_attention".into() } else { "full_attention".into() })
                .collect()
        });
        let per_layer = types.iter().map(|t| Some(if t == "sliding_attention" { 1 } else { 0 })).collect();
        return Ok((vec![full, sliding], per_layer));
    }
    let params = match (k.get("rope_parameters"), k.get("rope_scaling")) {
        (_, Some(Value::Object(s))) => (s.clone(), "rope_scaling"),
        (Some(Value::Object(p)), _) => (p.clone(), "rope_parameters"),
        (None, None) => (Map::new(), "rope_parameters"),
        (_, Some(other)) | (Some(other), None) => {
            bail!("rope_parameters / rope_scaling must be an object, got {other}")
        }
    };
    if params.0.keys().any(|key| key == "full_attention" || key == "sliding_attention") {
        bail!("{}: RoPE nested by layer type is only read for gemma3_text", params.1);
    }
    let theta = k.f64("rope_theta")?.unwrap_or(10_000.0);
    // A top-level original_max_position_embeddings (Phi-3 keeps it there, default 4096) wins
    // over the one inside the RoPE dict.
    let top_original = match k.usize("original_max_position_embeddings")? {
        None if family == Family::Phi3 => Some(4096),
        v => v,
    };
    let rope = rope_from_params(&params.0, params.1, theta, partial, head_dim, max_positions, top_original, family)?;
    let per_layer = match family {
        Family::SmolLm3 => no_rope_layers(k, num_layers)?,
        _ => vec![Some(0); num_layers],
    };
    Ok((vec![rope], per_layer))
}

/// One RoPE setting from a `rope_parameters`-style dict (`rope_type` or the older `type`).
#[allow(clippy::too_many_arguments)]
fn rope_from_params(
    p: &Map<String, Value>,
    what: &str,
    default_theta: f64,
    top_level_partial: Option<f64>,
    head_dim: usize,
    max_positions: usize,
    top_original: Option<usize>,
    family: Family,
) -> Result<Rope> {
    let pk = Keys(p);
    let mut kind = pk.str("rope_type")?.or(pk.str("type")?).unwrap_or("default");
    if family == Family::Phi3 && matches!(kind, "su" | "yarn") {
        kind = "longrope"; // Phi-3's config class renames its early names
    }
    let theta = pk.f64("rope_theta")?.unwrap_or(default_theta);
    let partial = pk.f64("partial_rotary_factor")?.or(top_level_partial).unwrap_or(1.0);
    if partial != 1.0 && family != Family::Phi3 {
        bail!("partial_rotary_factor = {partial}: transformers' {family:?} rotates whole heads; only phi3 reads it");
    }
    if !(0.0..=1.0).contains(&partial) || partial == 0.0 {
        bail!("partial_rotary_factor = {partial} is out of (0, 1]");
    }
    if pk.get("mrope_section").is_some() {
        bail!("{what}.mrope_section: multimodal RoPE is not supported");
    }
    let rotary_dim = (head_dim as f64 * partial) as usize;
    let original = || -> Result<usize> {
        Ok(top_original.or(pk.usize("original_max_position_embeddings")?).unwrap_or(max_positions))
    };
    let factor =
        || -> Result<f64> { pk.f64("factor")?.with_context(|| format!("{what}: rope_type {kind:?} needs a factor")) };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: pk.f64("low_freq_factor")?.context("llama3 RoPE needs low_freq_factor")?,
            high_freq_factor: pk.f64("high_freq_factor")?.context("llama3 RoPE needs high_freq_factor")?,
            original_max: original()?,
        },
        "yarn" => {
            let original_max = original()?;
            RopeScaling::Yarn {
                factor: pk.f64("factor")?.unwrap_or(max_positions as f64 / original_max as f64),
                original_max,
                beta_fast: pk.f64("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
                beta_slow: pk.f64("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                attention_factor: pk.f64("attention_factor")?,
                mscale: pk.f64("mscale")?,
                mscale_all_dim: pk.f64("mscale_all_dim")?,
                truncate: pk.bool("truncate")?.unwrap_or(true),
            }
        }
        "longrope" => longrope(&pk, what, rotary_dim, original()?)?,
        other => bail!(
            "{what}.rope_type {other:?} is not supported: choose default, linear, dynamic, llama3, yarn or longrope"
        ),
    };
    Ok(Rope { theta, rotary_dim, scaling, max_position_embeddings: max_positions })
}

/// `layer_types` (transformers 5), checked.
fn layer_types(k: &Keys, num_layers: usize) -> Result<Option<Vec<String>>> {
    let Some(v) = k.get("layer_types") else { return Ok(None) };
    let list = v.as_array().context("layer_types must be a list")?;
    if list.len() != num_layers {
        bail!("layer_types has {} entries for {num_layers} layers", list.len());
    }
    list.iter()
        .map(|t| match t.as_str() {
            Some(s @ ("full_attention" | "sliding_attention")) => Ok(s.to_string()),
            _ => bail!("layer_types: {t} is not supported (full_attention or sliding_attention)"),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// SmolLM3: `no_rope_layers[i]` is 1 where layer i uses RoPE; by default every
/// `no_rope_layer_interval`-th layer (4) has none.
fn no_rope_layers(k: &Keys, num_layers: usize) -> Result<Vec<Option<usize>>> {
    let flags: Vec<bool> = match k.get("no_rope_layers") {
        Some(v) => {
            let list = v.as_array().context("no_rope_layers must be a list of 0/1")?;
            if list.len() != num_layers {
                bail!("no_rope_layers has {} entries for {num_layers} layers", list.len());
            }
            list.iter()
                .map(|x| x.as_u64().map(|f| f != 0).context("no_rope_layers must be a list of 0/1"))
                .collect::<Result<_>>()?
        }
        None => {
            let interval = k.usize("no_rope_layer_interval")?.unwrap_or(4).max(1);
            (0..num_layers).map(|i| (i + 1) % interval != 0).collect()
        }
    };
    Ok(flags.into_iter().map(|uses_rope| uses_rope.then_some(0)).collect())
}

/// Per layer, the sliding attention window, as each family's config class decides it.
fn windows(k: &Keys, family: Family, num_layers: usize, rope_of_layer: &[Option<usize>]) -> Result<Vec<Option<usize>>> {
    let window = |default: Option<usize>| -> Result<Option<usize>> {
        Ok(if k.0.contains_key("sliding_window") { k.usize("sliding_window")? } else { default })
    };
    // Checked for every family (a chunked or linear-attention layer is outside the description),
    // though Llama, Gemma, OLMo 2, Mistral and Phi-3 ignore the list as transformers does.
    layer_types(k, num_layers)?;
    let from_types = |types: &[String], w: Option<usize>| -> Vec<Option<usize>> {
        types.iter().map(|t| if t == "sliding_attention" { w } else { None }).collect()
    };
    Ok(match family {
        Family::Llama | Family::Gemma | Family::Olmo2 => vec![None; num_layers],
        // Every layer slides (Mistral ignores layer_types; Phi-3 has no window by default).
        Family::Mistral => vec![window(Some(4096))?; num_layers],
        Family::Phi3 => vec![window(None)?; num_layers],
        Family::Qwen2 | Family::Qwen3 => {
            let w = if k.bool("use_sliding_window")?.unwrap_or(false) { window(Some(4096))? } else { None };
            match layer_types(k, num_layers)? {
                Some(types) => from_types(&types, w),
                None => {
                    let from = k.usize("max_window_layers")?.unwrap_or(28);
                    (0..num_layers).map(|i| if i >= from { w } else { None }).collect()
                }
            }
        }
        Family::SmolLm3 => {
            let use_sliding = k.bool("use_sliding_window")?.unwrap_or(false);
            let w = if use_sliding { window(None)? } else { None };
            match layer_types(k, num_layers)? {
                Some(types) => from_types(&types, w),
                None => rope_of_layer.iter().map(|r| if r.is_none() { w } else { None }).collect(),
            }
        }
        Family::Gemma2 | Family::Gemma3 => {
            let w = window(Some(4096))?;
            let pattern = if family == Family::Gemma2 { 2 } else { k.usize("sliding_window_pattern")?.unwrap_or(6) };
            match layer_types(k, num_layers)? {
                Some(types) => from_types(&types, w),
                None => (0..num_layers).map(|i| if (i + 1) % pattern.max(1) != 0 { w } else { None }).collect(),
            }
        }
    })
}

/// Token ids may be a number or a list (Llama 3 lists several EOS ids); take the first.
fn first_id(v: Option<&Value>) -> Option<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| n as u32),
        Some(Value::Array(a)) => a.first().and_then(|n| n.as_u64()).map(|n| n as u32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(extra: &str) -> String {
        format!(
            r#"{{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"vocab_size":512,"rms_norm_eps":1e-6{extra}}}"#
        )
    }

    fn err(extra: &str) -> String {
        format!("{:#}", Architecture::from_json(&base(extra)).unwrap_err())
    }

    #[test]
    fn unknown_model_types_are_refused_listing_the_supported_ones() {
        let e = err(r#","model_type":"gpt_neox""#);
        assert!(
            e.contains("\"gpt_neox\"")
                && e.contains("llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, smollm3, olmo2"),
            "{e}"
        );
        assert!(err(r#","model_type":"mpt""#).contains("ALiBi"));
        assert!(err(r#","model_type":"gemma3""#).contains("gemma3_text"));
    }

    #[test]
    fn features_outside_the_description_are_named() {
        let e = err(r#","model_type":"qwen2","num_experts":60"#);
        assert!(e.contains("num_experts = 60") && e.contains("mixture-of-experts"), "{e}");
        let e = err(r#","model_type":"llama","rope_scaling":{"rope_type":"mrope_interleaved","factor":2.0}"#);
        assert!(
            e.contains("rope_scaling.rope_type \"mrope_interleaved\"")
                && e.contains("default, linear, dynamic, llama3, yarn or longrope"),
            "{e}"
        );
        assert!(err(r#","model_type":"llama","alibi":true"#).contains("ALiBi"));
        let e = err(r#","model_type":"llama","hidden_act":"relu""#);
        assert!(e.contains("hidden_act = \"relu\""), "{e}");
        let e = err(r#","model_type":"llama","partial_rotary_factor":0.5"#);
        assert!(e.contains("partial_rotary_factor = 0.5"), "{e}");
        let e = err(r#","model_type":"mistral","attention_dropout":0.1"#);
        assert!(e.contains("attention_dropout = 0.1"), "{e}");
        let e = err(r#","model_type":"llama","layer_types":["full_attention","chunked_attention"]"#);
        assert!(e.contains("chunked_attention"), "{e}");
    }

    #[test]
    fn class_defaults_fill_absent_keys() {
        let a = Architecture::from_json(&base(r#","model_type":"gemma2","head_dim":16"#)).unwrap();
        assert_eq!((a.attn_softcap, a.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(a.attn_scale, 1.0 / 16.0, "query_pre_attn_scalar defaults to 256");
        assert_eq!(a.layers.iter().map(|l| l.window).collect::<Vec<_>>(), vec![Some(4096), None]);
        assert!(a.tie_word_embeddings && a.embed_scale == Some(8.0) && a.norm.unit_offset);
        let explicit_null =
            Architecture::from_json(&base(r#","model_type":"gemma2","head_dim":16,"final_logit_softcapping":null"#))
                .unwrap();
        assert_eq!(explicit_null.final_softcap, None);
        let m = Architecture::from_json(&base(r#","model_type":"mistral""#)).unwrap();
        assert_eq!(m.layers[1].window, Some(4096), "Mistral's class default window");
        let q = Architecture::from_json(&base(r#","model_type":"qwen2","sliding_window":8"#)).unwrap();
        assert_eq!(q.layers[1].window, None, "Qwen2 slides only with use_sliding_window");
        let s = Architecture::from_json(&base(r#","model_type":"smollm3","num_hidden_layers":8"#)).unwrap();
        assert_eq!(s.layers.iter().filter(|l| l.rope.is_none()).count(), 2, "every 4th layer is NoPE by default");
    }
}
