//! GPT-2: Hugging Face `GPT2LMHeadModel` / `GPT2Model`.

use kiln_models::gpt2::Gpt2Activation;
use kiln_models::{Gpt2Config, ModelConfig};
use serde::Deserialize;
use serde_json::Value;

use std::collections::HashSet;

use super::{Conversion, Rules, check_model_type, parse};
use crate::ConvertError;
use crate::onnx::{Graph, Linear, Norm, Resolved};

pub const CONVERSION: Conversion = Conversion {
    arch: "gpt2",
    rules: Rules {
        renames: &[
            // GPT2Model checkpoints have no `transformer.` prefix; GPT2LMHeadModel ones do.
            (r"^(h|wte|wpe|ln_f)\.", "transformer.$1."),
            (r"\.(ln_1|ln_2|ln_f)\.weight$", ".$1.gamma"),
            (r"\.(ln_1|ln_2|ln_f)\.bias$", ".$1.beta"),
        ],
        ignore: &[
            r"\.attn\.(bias|masked_bias)$", // causal-mask buffers
            r"^lm_head\.weight$",           // tied to transformer.wte.weight
        ],
        // GPT-2's Conv1D already stores [in, out]: no transpose (a blanket Linear
        // transpose would silently corrupt the square c_proj).
        transpose: &[],
        export: &[(r"\.gamma$", ".weight"), (r"\.beta$", ".bias")],
        tied: &[],
    },
    model_types: &["gpt2"],
    from_hf: Some(from_hf),
    to_hf: Some(to_hf),
    gguf: None,
    onnx: Some(resolve_onnx),
    head: None,
};

/// The fields of a GPT-2 `config.json` Kiln reads.
#[derive(Deserialize)]
struct HfGpt2 {
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
    n_positions: usize,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default)]
    activation_function: Option<String>,
}

fn default_eps() -> f64 {
    1e-5
}

fn from_hf(json: &Value, path: &str) -> Result<ModelConfig, ConvertError> {
    let hf: HfGpt2 = parse(json, path)?;
    let activation = match hf.activation_function.as_deref() {
        None | Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => Gpt2Activation::GeluTanh,
        Some("gelu") => Gpt2Activation::Gelu,
        Some(other) => {
            return Err(ConvertError::Config(format!(
                "{path}: activation_function = {other:?} is not supported (gelu_new or gelu)"
            )));
        }
    };
    check_model_type(json, CONVERSION.model_types, "gpt2", path)?;
    Ok(ModelConfig::Gpt2(Gpt2Config {
        n_layer: hf.n_layer,
        n_head: hf.n_head,
        n_embd: hf.n_embd,
        block_size: hf.n_positions,
        vocab_size: hf.vocab_size,
        dropout: 0.0,
        bias: true,
        layer_norm_epsilon: hf.layer_norm_epsilon,
        activation,
    }))
}

fn to_hf(model: &ModelConfig) -> Option<Value> {
    let ModelConfig::Gpt2(c) = model else { return None };
    Some(serde_json::json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
        "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "activation_function": match c.activation {
            Gpt2Activation::GeluTanh => "gelu_new",
            Gpt2Activation::Gelu => "gelu",
        },
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": true,
    }))
}

/// Place a GPT-2's weights by their role in an ONNX graph (see [`crate::onnx`]): the
/// token table (indexed by the ids input) and the position table (indexed by
/// `position_ids` or a `0, 1, 2, ...` range), their sum as the residual stream, then
/// [`Graph::decoder`]'s blocks: `ln_1`, the one fused `c_attn` projection (`[C, 3C]`,
/// Conv1D's own `[in, out]` layout), `c_proj`, `ln_2`, `c_fc`, the MLP's `c_proj`, and
/// `ln_f`. The head must be the token table transposed (GPT-2 ties them). The config
/// (sizes, heads from the query's `Reshape`, epsilon, gelu or tanh-gelu) is read off the
/// graph.
pub(crate) fn resolve_onnx(g: &Graph) -> Result<Resolved, String> {
    let (linears, norms, embeds) = (g.linears(), g.norms(), g.embeddings());
    let ids = g.ids_input()?;
    let (mut word, mut position) = (None, None);
    for e in embeds {
        let role = if g.as_input(&e.indices) == Some(ids) {
            &mut word
        } else if g.as_input(&e.indices) == Some("position_ids") || g.upstream(&e.indices).has_arange() {
            &mut position
        } else {
            return Err(format!(
                "embedding {} {:?}: its indices are neither the token ids nor positions",
                e.table.source, e.table.shape
            ));
        };
        if let Some(other) = role.replace(e) {
            return Err(format!(
                "two embedding tables play the same role: {} and {}",
                other.table.source, e.table.source
            ));
        }
    }
    let (Some(word), Some(position)) = (word, position) else {
        return Err(format!(
            "expected token and position embeddings; found {} embedding tables",
            embeds.len()
        ));
    };
    let c = word.table.shape[1];
    // The residual stream starts at the sum of the two lookups.
    let h0 = g
        .binary_with(&word.y, "Add", |o| g.uncast(o) == position.y)
        .ok_or("no Add of the token and position embeddings")?;
    let dec = g.decoder(&h0, &norms, &linears)?;
    let mut out = Resolved::default();
    out.place("transformer.wte.weight".into(), &word.table, false);
    out.place("transformer.wpe.weight".into(), &position.table, false);
    let place_norm = |out: &mut Resolved, prefix: &str, n: &Norm| -> Result<(), String> {
        let beta = n
            .beta
            .as_ref()
            .ok_or_else(|| format!("{prefix}: an RMS norm (GPT-2's have a bias)"))?;
        out.place(format!("{prefix}.weight"), &n.gamma, false);
        out.place(format!("{prefix}.bias"), beta, false);
        Ok(())
    };
    let place_linear = |out: &mut Resolved, prefix: &str, l: &Linear, shape: [usize; 2]| -> Result<(), String> {
        if l.weight.shape != shape {
            return Err(format!(
                "{prefix}: {} is {:?}, GPT-2's is {shape:?}",
                l.weight.source, l.weight.shape
            ));
        }
        let bias = l
            .bias
            .as_ref()
            .ok_or_else(|| format!("{prefix}: {} has no bias", l.weight.source))?;
        // Conv1D stores [in, out], as the graph multiplies: no transpose.
        out.place(format!("{prefix}.weight"), &l.weight, false);
        out.place(format!("{prefix}.bias"), bias, false);
        Ok(())
    };
    let mut n_head = None;
    let mut activation = None;
    for (i, layer) in dec.layers.iter().enumerate() {
        layer.without_post_norms(i)?;
        let p = format!("transformer.h.{i}");
        let ([c_attn], [c_fc]) = (&layer.attn_in[..], &layer.mlp_in[..]) else {
            return Err(format!(
                "block {i}: {} projections read ln_1 and {} read ln_2 (GPT-2 has one each: c_attn, c_fc)",
                layer.attn_in.len(),
                layer.mlp_in.len()
            ));
        };
        place_norm(&mut out, &format!("{p}.ln_1"), layer.attn_norm)?;
        place_linear(&mut out, &format!("{p}.attn.c_attn"), c_attn, [c, 3 * c])?;
        place_linear(&mut out, &format!("{p}.attn.c_proj"), layer.attn_out, [c, c])?;
        place_norm(&mut out, &format!("{p}.ln_2"), layer.mlp_norm)?;
        place_linear(&mut out, &format!("{p}.mlp.c_fc"), c_fc, [c, 4 * c])?;
        place_linear(&mut out, &format!("{p}.mlp.c_proj"), layer.mlp_out, [4 * c, c])?;
        n_head = n_head.or_else(|| g.heads(&c_attn.y, c));
        let ops = g.ops_on_the_way(&c_fc.y, &HashSet::from([layer.mlp_out.reader]), 16);
        let act = if ops.contains("Tanh") {
            "gelu_new"
        } else if ops.contains("Erf") {
            "gelu"
        } else {
            return Err(format!(
                "block {i}: the MLP's activation is neither gelu nor tanh-gelu ({ops:?})"
            ));
        };
        if activation.replace(act).is_some_and(|a| a != act) {
            return Err("the blocks' activations differ".into());
        }
    }
    place_norm(&mut out, "transformer.ln_f", dec.final_norm)?;
    if let Some(head) = dec.head {
        // GPT-2's head is the token table: the graph multiplies by its transpose.
        if !head.is_tied_to(&word.table) {
            return Err(format!(
                "the output projection {} {:?} is not the token embedding (GPT-2 ties them)",
                head.weight.source, head.weight.shape
            ));
        }
        out.notes.push(format!(
            "{}: the output projection, the token embedding transposed (tied)",
            head.weight.source
        ));
    }
    let n_head = n_head.ok_or("could not read the number of attention heads off the query's Reshape; pass --config")?;
    out.config = serde_json::json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "n_layer": dec.layers.len(), "n_head": n_head, "n_embd": c,
        "n_positions": position.table.shape[0], "n_ctx": position.table.shape[0],
        "vocab_size": word.table.shape[0], "layer_norm_epsilon": dec.final_norm.eps,
        "activation_function": activation,
    });
    Ok(out)
}
