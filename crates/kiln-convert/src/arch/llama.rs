//! Llama: Hugging Face `LlamaForCausalLM` (and `Qwen2ForCausalLM`, a Llama with q/k/v
//! biases), and llama.cpp's `llama` GGUF files.

use kiln_gguf::GgufFile;
use kiln_models::{LlamaConfig, ModelConfig, RopeScaling};
use serde::Deserialize;
use serde_json::{Value, json};

use std::collections::HashSet;

use super::{Conversion, GgufRules, Rules, check_model_type, parse};
use crate::ConvertError;
use crate::gguf::meta_u64;
use crate::onnx::{DecoderLayer, Graph, Linear, Resolved};

pub const CONVERSION: Conversion = Conversion {
    arch: "llama",
    rules: Rules {
        renames: &[(
            r"\.(input_layernorm|post_attention_layernorm|norm)\.weight$",
            ".$1.gamma",
        )],
        ignore: &[r"\.rotary_emb\.inv_freq$"],
        transpose: &[r"_proj\.weight$", r"^lm_head\.weight$"],
        export: &[(r"\.gamma$", ".weight")],
        tied: &[r"^lm_head\.weight$"],
    },
    model_types: &["llama", "qwen2"],
    from_hf: Some(from_hf),
    to_hf: Some(to_hf),
    gguf: Some(&GGUF),
    onnx: Some(resolve_onnx),
    head: None,
};

/// llama.cpp's names (`llama-arch.cpp`) -> Hugging Face's.
const GGUF: GgufRules = GgufRules {
    architectures: &["llama"],
    tensors: &[
        (r"^token_embd\.weight$", "model.embed_tokens.weight"),
        (r"^output_norm\.weight$", "model.norm.weight"),
        (r"^output\.weight$", "lm_head.weight"),
        (
            r"^blk\.(\d+)\.attn_norm\.weight$",
            "model.layers.$1.input_layernorm.weight",
        ),
        (
            r"^blk\.(\d+)\.ffn_norm\.weight$",
            "model.layers.$1.post_attention_layernorm.weight",
        ),
        (
            r"^blk\.(\d+)\.attn_q\.(weight|bias)$",
            "model.layers.$1.self_attn.q_proj.$2",
        ),
        (
            r"^blk\.(\d+)\.attn_k\.(weight|bias)$",
            "model.layers.$1.self_attn.k_proj.$2",
        ),
        (
            r"^blk\.(\d+)\.attn_v\.(weight|bias)$",
            "model.layers.$1.self_attn.v_proj.$2",
        ),
        (
            r"^blk\.(\d+)\.attn_output\.(weight|bias)$",
            "model.layers.$1.self_attn.o_proj.$2",
        ),
        (
            r"^blk\.(\d+)\.ffn_gate\.(weight|bias)$",
            "model.layers.$1.mlp.gate_proj.$2",
        ),
        (r"^blk\.(\d+)\.ffn_up\.(weight|bias)$", "model.layers.$1.mlp.up_proj.$2"),
        (
            r"^blk\.(\d+)\.ffn_down\.(weight|bias)$",
            "model.layers.$1.mlp.down_proj.$2",
        ),
    ],
    config: gguf_config,
    fix: Some(unpermute_qk),
};

/// The `rope_scaling` / `rope_parameters` object of a Hugging Face config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HfRope {
    #[serde(alias = "type")]
    rope_type: String,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    factor: Option<f64>,
    #[serde(default)]
    low_freq_factor: Option<f64>,
    #[serde(default)]
    high_freq_factor: Option<f64>,
    #[serde(default)]
    original_max_position_embeddings: Option<usize>,
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5) -> the theta it
/// carries and Kiln's scaling; an unknown type or a missing field is an error naming it.
pub(super) fn rope(json: &Value, key: &str, path: &str) -> Result<(Option<f64>, Option<RopeScaling>), ConvertError> {
    let Some(v) = json.get(key).filter(|v| !v.is_null()) else {
        return Ok((None, None));
    };
    let r: HfRope = parse(v, &format!("{path}: {key}"))?;
    let need = |f: Option<f64>, name: &str| {
        f.ok_or_else(|| ConvertError::Config(format!("{path}: {key}.{name}: missing for rope_type {:?}", r.rope_type)))
    };
    let scaling = match r.rope_type.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: need(r.factor, "factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: need(r.factor, "factor")?,
            low_freq_factor: need(r.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(r.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: r.original_max_position_embeddings.ok_or_else(|| {
                ConvertError::Config(format!(
                    "{path}: {key}.original_max_position_embeddings: missing for llama3"
                ))
            })?,
        }),
        other => {
            return Err(ConvertError::Config(format!(
                "{path}: {key}.rope_type: {other:?} is not supported (default, linear, llama3 are)"
            )));
        }
    };
    Ok((r.rope_theta, scaling))
}

/// The rotary base and scaling of a config: `rope_theta` plus `rope_scaling`, or
/// transformers 5's `rope_parameters`.
pub(super) fn rope_of(
    json: &Value,
    default_theta: f64,
    path: &str,
) -> Result<(f64, Option<RopeScaling>), ConvertError> {
    let (params_theta, params_scaling) = rope(json, "rope_parameters", path)?;
    let (_, scaling) = rope(json, "rope_scaling", path)?;
    let theta = match json.get("rope_theta") {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| ConvertError::Config(format!("{path}: rope_theta: {v} is not a number")))?,
        None => params_theta.unwrap_or(default_theta),
    };
    Ok((theta, scaling.or(params_scaling)))
}

/// The fields of a Llama `config.json` Kiln reads.
#[derive(Deserialize)]
struct HfLlama {
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    hidden_size: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    use_sliding_window: bool,
}

fn default_eps() -> f64 {
    1e-6
}

fn from_hf(json: &Value, path: &str) -> Result<ModelConfig, ConvertError> {
    let hf: HfLlama = parse(json, path)?;
    check_model_type(json, CONVERSION.model_types, "llama", path)?;
    let qwen2 = json.get("model_type").and_then(Value::as_str) == Some("qwen2");
    if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(ConvertError::Config(format!(
            "{path}: hidden_act: {act:?} is not supported (Kiln's llama MLP is SwiGLU, silu)"
        )));
    }
    if hf.use_sliding_window {
        return Err(ConvertError::Config(format!(
            "{path}: use_sliding_window: true is not supported by Kiln's llama"
        )));
    }
    let (rope_theta, rope_scaling) = rope_of(json, 10_000.0, path)?;
    let head_dim = hf.head_dim.filter(|&d| d * hf.num_attention_heads != hf.hidden_size);
    Ok(ModelConfig::Llama(LlamaConfig {
        n_layer: hf.num_hidden_layers,
        n_head: hf.num_attention_heads,
        n_kv_head: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        n_embd: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        block_size: hf.max_position_embeddings,
        vocab_size: hf.vocab_size,
        rope_theta,
        rms_norm_eps: hf.rms_norm_eps,
        head_dim,
        // transformers' default is tied for Qwen2 only when the config says so; Llama's
        // default is untied.
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        rope_scaling,
        qkv_bias: hf.attention_bias || qwen2,
        o_bias: hf.attention_bias,
        mlp_bias: hf.mlp_bias,
    }))
}

pub(super) fn rope_scaling_json(s: &Option<RopeScaling>) -> Value {
    match s {
        None => Value::Null,
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                     "high_freq_factor": high_freq_factor,
                     "original_max_position_embeddings": original_max_position_embeddings}),
    }
}

fn to_hf(model: &ModelConfig) -> Option<Value> {
    let ModelConfig::Llama(c) = model else { return None };
    if c.qkv_bias != c.o_bias {
        // Qwen2: biases on q/k/v only.
        return Some(json!({
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head, "hidden_size": c.n_embd,
            "intermediate_size": c.intermediate_size, "max_position_embeddings": c.block_size,
            "vocab_size": c.vocab_size, "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
            "hidden_act": "silu", "tie_word_embeddings": c.tie_word_embeddings,
            "rope_scaling": rope_scaling_json(&c.rope_scaling), "use_sliding_window": false,
        }));
    }
    Some(json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head, "hidden_size": c.n_embd, "head_dim": c.head_dim(),
        "intermediate_size": c.intermediate_size, "max_position_embeddings": c.block_size,
        "vocab_size": c.vocab_size, "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias,
        "rope_scaling": rope_scaling_json(&c.rope_scaling),
    }))
}

/// A Llama `config.json` from `llama.*` metadata (llama.cpp's `LLM_KV_*` names).
fn gguf_config(g: &GgufFile) -> Result<Value, ConvertError> {
    let key = |k: &str| format!("llama.{k}");
    let n_head = meta_u64(g, &key("attention.head_count"))?;
    let hidden = meta_u64(g, &key("embedding_length"))?;
    let vocab = match g.u64(&key("vocab_size"))? {
        Some(v) => v,
        None => g.strings("tokenizer.ggml.tokens")?.map_or(0, |t| t.len() as u64),
    };
    if g.tensor("rope_freqs.weight").is_some() {
        return Err(ConvertError::Config(format!(
            "{}: tensor rope_freqs.weight (Llama 3.1 rope scaling as per-frequency factors) is not supported from GGUF; convert the Hugging Face checkpoint instead",
            g.path().display()
        )));
    }
    let rope_scaling = crate::gguf::rope_scaling(g, "llama")?;
    let mut c = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": meta_u64(g, &key("block_count"))?,
        "hidden_size": hidden,
        "intermediate_size": meta_u64(g, &key("feed_forward_length"))?,
        "num_attention_heads": n_head,
        "num_key_value_heads": g.u64(&key("attention.head_count_kv"))?.unwrap_or(n_head),
        "max_position_embeddings": meta_u64(g, &key("context_length"))?,
        "rms_norm_eps": g.require(&key("attention.layer_norm_rms_epsilon"), g.f64(&key("attention.layer_norm_rms_epsilon")))?,
        "rope_theta": g.f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        "vocab_size": vocab,
        "tie_word_embeddings": g.tensor("output.weight").is_none(),
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
    });
    let head_dim = g
        .u64(&key("attention.key_length"))?
        .or(g.u64(&key("rope.dimension_count"))?);
    if let Some(d) = head_dim {
        c["head_dim"] = json!(d);
    }
    let biased = g.tensors.iter().any(|t| t.name.ends_with("attn_q.bias"));
    c["attention_bias"] = json!(biased);
    Ok(c)
}

/// llama.cpp's converter permutes the rows of each Q and K head from HF's "rotate half"
/// layout to interleaved pairs (`convert_hf_to_gguf.py`, `LlamaModel.permute`): rows
/// `[n_head, 2, D/2]` became `[n_head, D/2, 2]`. Undo it.
fn unpermute_qk(name: &str, shape: &[usize], values: &mut [f32], config: &Value) -> Result<(), String> {
    let heads = if name.contains(".self_attn.q_proj.") {
        config["num_attention_heads"].as_u64()
    } else if name.contains(".self_attn.k_proj.") {
        config["num_key_value_heads"].as_u64()
    } else {
        return Ok(());
    };
    let heads = heads.ok_or("no head count in the config")? as usize;
    let rows = shape[0];
    let cols = if shape.len() > 1 { shape[1] } else { 1 };
    if !rows.is_multiple_of(heads * 2) {
        return Err(format!("{rows} rows do not split into {heads} heads of rotary pairs"));
    }
    let half = rows / heads / 2;
    let src = values.to_vec();
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                // GGUF row (h, i, j) holds HF row (h, j, i)
                let from = (h * half + i) * 2 + j;
                let to = (h * 2 + j) * half + i;
                values[to * cols..(to + 1) * cols].copy_from_slice(&src[from * cols..(from + 1) * cols]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(extra: Value) -> Result<ModelConfig, ConvertError> {
        let mut json = json!({"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 128,
            "max_position_embeddings": 256, "vocab_size": 100});
        json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        crate::hf_config::model_config("llama", &json, "config.json")
    }

    #[test]
    fn real_checkpoint_fields_are_read() {
        let ModelConfig::Llama(c) = llama(json!({"tie_word_embeddings": true, "head_dim": 32,
            "rope_theta": 500000.0, "quantization_config": {"quant_method": "gguf"},
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
        .unwrap() else {
            panic!()
        };
        assert!(c.tie_word_embeddings);
        assert_eq!(c.head_dim, Some(32));
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor: 32.0, .. })));
        // transformers 5: rope_parameters carries the theta
        let ModelConfig::Llama(c) =
            llama(json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}})).unwrap()
        else {
            panic!()
        };
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        // Qwen2: q/k/v biases only
        let mut qwen = json!({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
            "intermediate_size": 128, "max_position_embeddings": 256, "vocab_size": 100});
        qwen["model_type"] = json!("qwen2");
        let ModelConfig::Llama(c) = crate::hf_config::model_config("llama", &qwen, "c.json").unwrap() else {
            panic!()
        };
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn unknown_values_are_refused_by_name() {
        let err = llama(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rope_scaling.rope_type") && err.contains("yarn"), "{err}");
        let err = llama(json!({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("low_freq_factor"), "{err}");
        let err = llama(json!({"hidden_act": "gelu"})).unwrap_err().to_string();
        assert!(err.contains("hidden_act") && err.contains("gelu"), "{err}");
        let err = llama(json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 3}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("beta_fast"), "{err}");
    }

    #[test]
    fn the_qk_permutation_is_undone() {
        // 2 heads of D = 4, one column: HF rows (h, j, i) = h*4 + j*2 + i.
        let hf: Vec<f32> = (0..8).map(|r| r as f32).collect();
        // llama.cpp: reshape(2, 2, 2).swapaxes(1, 2): GGUF row (h, i, j) = HF row (h, j, i)
        let mut gguf = vec![0.0; 8];
        for h in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    gguf[h * 4 + i * 2 + j] = hf[h * 4 + j * 2 + i];
                }
            }
        }
        let config = json!({"num_attention_heads": 2});
        unpermute_qk("model.layers.0.self_attn.q_proj.weight", &[8, 1], &mut gguf, &config).unwrap();
        assert_eq!(gguf, hf);
    }
}

/// Place a Llama's (or Qwen2's) weights by their role in an ONNX graph (see
/// [`crate::onnx`]): the token table (indexed by the ids input), then
/// [`Graph::decoder`]'s blocks over RMS norms: `input_layernorm`; q, k and v by where
/// they go (query and key to the two sides of the scores `MatMul`, value to the context
/// `MatMul`); `o_proj`; `post_attention_layernorm`; gate (the one through the `Sigmoid`
/// of SiLU) and up; `down_proj`; the final `norm`; `lm_head` unless it is the token
/// table transposed (tied). The config is read off the graph: sizes, heads and key-value
/// heads from the projections' `Reshape`s, the RMS epsilon, and `rope_theta` from the
/// rotary frequencies (`theta^(-2i/d)`; a scaled rope is refused, it needs the
/// `config.json`). The context length is not in a graph that computes rotary tables per
/// position: 2048 is assumed and the report says so.
pub(crate) fn resolve_onnx(g: &Graph) -> Result<Resolved, String> {
    let (linears, norms, embeds) = (g.linears(), g.rms_norms(), g.embeddings());
    let word = g.token_embedding(&embeds, "a Llama")?;
    let (vocab, c) = (word.table.shape[0], word.table.shape[1]);
    let dec = g.decoder(&word.y, &norms, &linears)?;
    let matmuls = attention_matmuls(g, &linears);
    let mut out = Resolved::default();
    out.place("model.embed_tokens.weight".into(), &word.table, false);
    let place_linear = |out: &mut Resolved, prefix: &str, l: &Linear| {
        out.place(format!("{prefix}.weight"), &l.weight, true);
        if let Some(b) = &l.bias {
            out.place(format!("{prefix}.bias"), b, false);
        }
    };
    let (mut heads, mut kv_heads, mut intermediate) = (None, None, None);
    let (mut qkv_bias, mut o_bias, mut mlp_bias) = (false, false, false);
    for (i, layer) in dec.layers.iter().enumerate() {
        layer.without_post_norms(i)?;
        let p = format!("model.layers.{i}");
        let [q, k, v] = query_key_value(g, layer, &matmuls, i)?;
        let (q_width, kv_width) = (q.weight.shape[1], k.weight.shape[1]);
        if v.weight.shape[1] != kv_width || q.weight.shape[0] != c {
            return Err(format!(
                "block {i}: q {:?}, k {:?}, v {:?} do not fit a hidden size of {c}",
                q.weight.shape, k.weight.shape, v.weight.shape
            ));
        }
        heads = heads.or_else(|| g.heads(&q.y, q_width));
        kv_heads = kv_heads.or_else(|| g.heads(&k.y, kv_width));
        qkv_bias |= q.bias.is_some();
        o_bias |= layer.attn_out.bias.is_some();
        out.place(format!("{p}.input_layernorm.weight"), &layer.attn_norm.gamma, false);
        place_linear(&mut out, &format!("{p}.self_attn.q_proj"), q);
        place_linear(&mut out, &format!("{p}.self_attn.k_proj"), k);
        place_linear(&mut out, &format!("{p}.self_attn.v_proj"), v);
        place_linear(&mut out, &format!("{p}.self_attn.o_proj"), layer.attn_out);
        out.place(
            format!("{p}.post_attention_layernorm.weight"),
            &layer.mlp_norm.gamma,
            false,
        );
        let [gate, up] = gate_up(g, layer, "Sigmoid", i)?;
        intermediate = Some(gate.weight.shape[1]);
        mlp_bias |= gate.bias.is_some();
        place_linear(&mut out, &format!("{p}.mlp.gate_proj"), gate);
        place_linear(&mut out, &format!("{p}.mlp.up_proj"), up);
        place_linear(&mut out, &format!("{p}.mlp.down_proj"), layer.mlp_out);
    }
    out.place("model.norm.weight".into(), &dec.final_norm.gamma, false);
    let head = dec.head.ok_or("no output projection after the final norm")?;
    let tied = head.is_tied_to(&word.table);
    if tied {
        out.notes.push(format!(
            "{}: the output projection, the token embedding transposed (tied)",
            head.weight.source
        ));
    } else {
        out.place("lm_head.weight".into(), &head.weight, true);
    }
    let heads = heads.ok_or("could not read the attention heads off the query's Reshape; pass --config")?;
    let kv_heads = kv_heads.ok_or("could not read the key-value heads off the key's Reshape; pass --config")?;
    let q_width = out.tensors["model.layers.0.self_attn.q_proj.weight"].0[0];
    let head_dim = q_width / heads;
    let theta = rope_theta_of(g, head_dim)?;
    out.notes.push(
        "max_position_embeddings is not in the graph (rotary tables are computed per position): 2048 assumed; \
         a config.json beside the file or --config sets it"
            .into(),
    );
    let model_type = if qkv_bias && !o_bias { "qwen2" } else { "llama" };
    out.config = json!({
        "model_type": model_type,
        "num_hidden_layers": dec.layers.len(), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "hidden_size": c, "head_dim": head_dim,
        "intermediate_size": intermediate, "max_position_embeddings": 2048,
        "vocab_size": vocab, "rope_theta": theta, "rms_norm_eps": dec.final_norm.eps,
        "hidden_act": "silu", "tie_word_embeddings": tied,
        "attention_bias": o_bias, "mlp_bias": mlp_bias,
    });
    Ok(out)
}

/// The `MatMul` nodes of two computed operands (attention's scores and context).
pub(super) fn attention_matmuls(g: &Graph, linears: &[Linear]) -> HashSet<usize> {
    let linear_nodes: HashSet<usize> = linears.iter().map(|l| l.node).collect();
    (0..g.nodes.len())
        .filter(|i| g.nodes[*i].op == "MatMul" && !linear_nodes.contains(i))
        .collect()
}

/// A block's query, key and value projections, told apart by where they go: query and
/// key to the left and right of the scores `MatMul` (the first of `matmuls` each
/// reaches), value to the context `MatMul`.
pub(super) fn query_key_value<'a>(
    g: &Graph,
    layer: &DecoderLayer<'a>,
    matmuls: &HashSet<usize>,
    i: usize,
) -> Result<[&'a Linear; 3], String> {
    let [a, b, c] = layer.attn_in[..] else {
        return Err(format!(
            "block {i}: {} projections read the attention norm (expected q, k and v)",
            layer.attn_in.len()
        ));
    };
    let first = |l: &Linear| g.reach(&l.y, matmuls, 64).into_iter().next();
    let (scores, [x, y], v) = match [a, b, c].map(first) {
        [Some(s), Some(t), Some(u)] if s == t && t != u => (s, [a, b], c),
        [Some(s), Some(t), Some(u)] if s == u && s != t => (s, [a, c], b),
        [Some(s), Some(t), Some(u)] if t == u && s != t => (t, [b, c], a),
        _ => {
            return Err(format!(
                "block {i}: could not tell query, key and value apart by the MatMuls they reach"
            ));
        }
    };
    let side = |l: &Linear| (0..2).find(|&s| g.depends_on(&g.nodes[scores].inputs[s], &l.y, 64));
    match (side(x), side(y)) {
        (Some(0), Some(1)) => Ok([x, y, v]),
        (Some(1), Some(0)) => Ok([y, x, v]),
        _ => Err(format!(
            "block {i}: no query and key on the two sides of the scores MatMul"
        )),
    }
}

/// A gated MLP's gate and up projections: the gate is the one whose way to the down
/// projection passes the activation's `act` node (SiLU's `Sigmoid`, tanh-GELU's `Tanh`).
pub(super) fn gate_up<'a>(g: &Graph, layer: &DecoderLayer<'a>, act: &str, i: usize) -> Result<[&'a Linear; 2], String> {
    let [m, n] = layer.mlp_in[..] else {
        return Err(format!(
            "block {i}: {} projections read the MLP's norm (expected gate and up)",
            layer.mlp_in.len()
        ));
    };
    let down = HashSet::from([layer.mlp_out.reader]);
    let through = |l: &Linear| g.ops_on_the_way(&l.y, &down, 16).contains(act);
    match (through(m), through(n)) {
        (true, false) => Ok([m, n]),
        (false, true) => Ok([n, m]),
        _ => Err(format!("block {i}: no single gate projection through a {act}")),
    }
}

/// The rotary base of a graph: its frequencies `theta^(-2i/d)` (`d/2` decreasing values
/// upstream of a `Cos`), checked value by value (the first must be 1).
pub(super) fn rope_theta_of(g: &Graph, head_dim: usize) -> Result<f64, String> {
    let n = head_dim / 2;
    let freqs = (0..g.nodes.len())
        .filter(|&i| g.nodes[i].op == "Cos")
        .flat_map(|i| g.upstream(&g.nodes[i].inputs[0]).float_consts)
        .find(|f| f.len() == n && n > 1 && f[0] > 0.0 && f.windows(2).all(|w| w[1] < w[0]))
        .ok_or_else(|| format!("no rotary frequencies ({n} decreasing values) upstream of a Cos"))?;
    let d = head_dim as f64;
    // From the last (smallest) frequency: theta = f[n-1]^(-d / (2 (n-1))).
    let theta = (freqs[n - 1] as f64).powf(-d / (2.0 * (n - 1) as f64));
    let theta = if (theta.round() - theta).abs() <= 1e-4 * theta {
        theta.round()
    } else {
        theta
    };
    for (i, &f) in freqs.iter().enumerate() {
        let want = theta.powf(-2.0 * i as f64 / d);
        if ((f as f64) - want).abs() > 1e-4 * want {
            return Err(format!(
                "rotary frequency {i} is {f}, not {theta}^(-2*{i}/{head_dim}) = {want} (a scaled rope?): pass --config with the model's config.json"
            ));
        }
    }
    Ok(theta)
}
