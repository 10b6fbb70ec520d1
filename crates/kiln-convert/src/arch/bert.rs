//! BERT: Hugging Face `BertModel` (and task wrappers with a `bert.` prefix).

use std::path::Path;

use kiln_models::bert::Pooling;
use kiln_models::{BertConfig, ClassifierHead, ModelConfig, SentencePooling};
use serde::Deserialize;
use serde_json::Value;

use std::collections::HashSet;

use super::{Conversion, HeadRules, Rules, check_model_type, parse};
use crate::ConvertError;
use crate::onnx::{Graph, Resolved};

pub const CONVERSION: Conversion = Conversion {
    arch: "bert",
    rules: Rules {
        renames: &[
            (r"^bert\.", ""),
            (r"\.LayerNorm\.weight$", ".layer_norm.gamma"),
            (r"\.LayerNorm\.bias$", ".layer_norm.beta"),
            (r"\.attention\.self\.", ".attention.self_attn."),
        ],
        ignore: &[r"^embeddings\.position_ids$", r"^cls\."],
        transpose: &[r"\.(query|key|value|dense)\.weight$"],
        export: &[
            (r"\.layer_norm\.gamma$", ".LayerNorm.weight"),
            (r"\.layer_norm\.beta$", ".LayerNorm.bias"),
            (r"\.attention\.self_attn\.", ".attention.self."),
        ],
        tied: &[],
    },
    model_types: &["bert"],
    from_hf: Some(from_hf),
    to_hf: Some(to_hf),
    gguf: None,
    onnx: Some(resolve_onnx),
    head: Some(&HEAD),
};

/// `BertForSequenceClassification`: `bert.*` and `classifier` on the pooler's output.
const HEAD: HeadRules = HeadRules {
    class: "BertForSequenceClassification",
    hf_encoder: "bert.",
    tensors: &[(r"^classifier\.(weight|bias)$", "classifier.$1")],
    export: &[(r"^classifier\.(weight|bias)$", "classifier.$1")],
    transpose: &[r"^classifier\.weight$"],
};

/// The classifier of a Hugging Face config whose `architectures` name a
/// `...ForSequenceClassification`: labels from `id2label` (transformers' `LABEL_i` when
/// it has none), CLS pooling through the pooler (what `BertForSequenceClassification`
/// computes), dropout `classifier_dropout`, else `hidden_dropout_prob`.
pub(crate) fn head_from_hf(json: &Value, path: &str) -> Result<Option<ClassifierHead>, ConvertError> {
    let classifier = json.get("architectures").and_then(Value::as_array).is_some_and(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .any(|a| a.ends_with("ForSequenceClassification"))
    });
    if !classifier {
        return Ok(None);
    }
    let err = |m: String| ConvertError::Config(format!("{path}: {m}"));
    match json.get("problem_type").and_then(Value::as_str) {
        None | Some("single_label_classification") => {}
        Some(other) => {
            return Err(err(format!(
                "problem_type = {other:?}: Kiln's classifier is single-label (a softmax over the labels)"
            )));
        }
    }
    let id2label = json.get("id2label").and_then(Value::as_object);
    let n = json
        .get("num_labels")
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .or(id2label.map(|m| m.len()))
        .unwrap_or(2);
    if n < 2 {
        return Err(err(format!(
            "{n} label (a regression head): Kiln's classifier needs at least 2 labels"
        )));
    }
    let labels = (0..n)
        .map(|i| match id2label {
            None => Ok(format!("LABEL_{i}")),
            Some(m) => m
                .get(&i.to_string())
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| err(format!("id2label.{i}: missing (the head has {n} labels)"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let dropout = ["classifier_dropout", "hidden_dropout_prob"]
        .iter()
        .find_map(|k| json.get(*k).and_then(Value::as_f64))
        .unwrap_or(0.1);
    Ok(Some(ClassifierHead {
        labels,
        pooling: Pooling::Cls,
        dropout,
        max_length: None,
    }))
}

/// The `config.json` of the task model `class`: the encoder's `json` with the head's
/// labels; a mean-pooling head (Kiln's fine-tuning default) has no Hugging Face class.
pub(crate) fn head_to_hf(mut json: Value, head: &ClassifierHead, class: &str) -> Result<Value, ConvertError> {
    if head.pooling != Pooling::Cls {
        return Err(ConvertError::Config(format!(
            "[head] pooling = {:?}: Hugging Face's {class} classifies the CLS token's pooled state; a mean-pooling head has no Hugging Face class",
            head.pooling
        )));
    }
    let id2label: serde_json::Map<String, Value> = head
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), Value::from(l.as_str())))
        .collect();
    let label2id: serde_json::Map<String, Value> = head
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), Value::from(i)))
        .collect();
    json["architectures"] = serde_json::json!([class]);
    json["id2label"] = Value::Object(id2label);
    json["label2id"] = Value::Object(label2id);
    json["classifier_dropout"] = Value::from(head.dropout);
    json["problem_type"] = Value::from("single_label_classification");
    Ok(json)
}

/// The fields of a BERT (or RoBERTa) `config.json` Kiln reads.
#[derive(Deserialize)]
pub(super) struct HfBert {
    num_hidden_layers: usize,
    num_attention_heads: usize,
    hidden_size: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    pub(super) pad_token_id: Option<usize>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

impl HfBert {
    /// The Kiln config, positions starting at row `position_offset`; an activation or
    /// position embedding Kiln does not compute is an error naming the key.
    pub(super) fn config(&self, position_offset: usize, path: &str) -> Result<BertConfig, ConvertError> {
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "gelu") {
            return Err(ConvertError::Config(format!(
                "{path}: hidden_act = {act:?} is not supported (Kiln's encoder uses gelu)"
            )));
        }
        if let Some(p) = self.position_embedding_type.as_deref().filter(|p| *p != "absolute") {
            return Err(ConvertError::Config(format!(
                "{path}: position_embedding_type = {p:?} is not supported (absolute)"
            )));
        }
        Ok(BertConfig {
            n_layer: self.num_hidden_layers,
            n_head: self.num_attention_heads,
            n_embd: self.hidden_size,
            intermediate_size: self.intermediate_size,
            max_positions: self.max_position_embeddings,
            vocab_size: self.vocab_size,
            type_vocab_size: self.type_vocab_size,
            layer_norm_eps: self.layer_norm_eps,
            sentence_pooling: Default::default(),
            normalize: true,
            position_offset,
        })
    }
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

fn from_hf(json: &Value, path: &str) -> Result<ModelConfig, ConvertError> {
    let hf: HfBert = parse(json, path)?;
    check_model_type(json, CONVERSION.model_types, "bert", path)?;
    Ok(ModelConfig::Bert(hf.config(0, path)?))
}

fn to_hf(model: &ModelConfig) -> Option<Value> {
    // A BERT whose positions start past row 0 is not a Hugging Face `BertModel`.
    let ModelConfig::Bert(c) = model else { return None };
    if c.position_offset != 0 {
        return None;
    }
    Some(hf_json(c, "bert", "BertModel"))
}

/// The `config.json` of an encoder of Kiln's BERT layers (`BertModel`, `RobertaModel`).
pub(super) fn hf_json(c: &BertConfig, model_type: &str, class: &str) -> Value {
    serde_json::json!({
        "model_type": model_type, "architectures": [class],
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_positions,
        "vocab_size": c.vocab_size, "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.layer_norm_eps, "hidden_act": "gelu", "position_embedding_type": "absolute",
    })
}

/// Place a BERT encoder's weights by their role in an ONNX graph (see [`crate::onnx`]):
/// the embedding tables by what indexes them (the token ids input, a `0, 1, 2, ...`
/// position range, a zeros token-type buffer or input), then layer by layer from the
/// embedding LayerNorm's output: the three projections reading the hidden state (query
/// and key by their slots in the scores `MatMul`, value by the context `MatMul`), the
/// attention output projection reading the context, the residual LayerNorm, the
/// intermediate projection, the output projection after the activation, and the second
/// LayerNorm, whose output is the next layer's input. An optional pooler is the
/// projection followed by `Tanh`. The config (sizes, heads from the attention `Reshape`,
/// LayerNorm epsilon) is read off the same graph. A graph whose positions are counted
/// from the padding index (`cumsum(ids != pad) + pad`) is RoBERTa's, not BERT's.
pub(crate) fn resolve_onnx(g: &Graph) -> Result<Resolved, String> {
    resolve_encoder(g, false)
}

/// The positions of a RoBERTa graph: `cumsum(mask) * mask + padding_idx`, the padding
/// index read off the final `Add`.
fn counted_positions(g: &Graph, indices: &str) -> Option<i64> {
    if !g.upstream(indices).ops.contains("CumSum") {
        return None;
    }
    let add = g.producer(g.uncast(indices))?;
    if add.op != "Add" {
        return None;
    }
    add.inputs
        .iter()
        .find_map(|i| g.ints(g.uncast(i)).filter(|v| v.len() == 1).map(|v| v[0]))
}

/// [`resolve_onnx`] for BERT, or for RoBERTa (`roberta`: positions counted from the
/// padding index, which the config records as `pad_token_id`).
pub(super) fn resolve_encoder(g: &Graph, roberta: bool) -> Result<Resolved, String> {
    let linears = g.linears();
    let norms = g.norms();
    let embeds = g.embeddings();
    if embeds.is_empty() || norms.is_empty() || linears.is_empty() {
        return Err(format!(
            "not a BERT graph: {} embedding Gathers, {} layer norms, {} linear layers found",
            embeds.len(),
            norms.len(),
            linears.len()
        ));
    }
    let name = |i: usize| format!("{} ({})", g.nodes[i].name, g.nodes[i].op);
    let mut out = Resolved::default();
    let mut used_linears = HashSet::new();
    let mut used_norms = HashSet::new();

    // Embeddings, by what their indices are computed from.
    let (mut word, mut position, mut types) = (None, None, None);
    let mut padding_idx = None;
    for e in embeds {
        let role = match g.as_input(&e.indices) {
            Some("token_type_ids") => &mut types,
            Some(input) if input == "input_ids" || g.inputs.first().is_some_and(|f| f == input) => &mut word,
            Some(_) => &mut types,
            None => {
                let up = g.upstream(&e.indices);
                if let Some(pad) = counted_positions(g, &e.indices) {
                    padding_idx = Some(pad);
                    &mut position
                } else if up.has_arange() {
                    &mut position
                } else if up.has_zeros() {
                    &mut types
                } else {
                    return Err(format!(
                        "embedding {} ({:?}, {}): its indices are neither an input, a position range nor token types",
                        name(e.node),
                        e.table.shape,
                        e.table.source
                    ));
                }
            }
        };
        if let Some(other) = role.replace(e) {
            return Err(format!(
                "two embedding tables play the same role: {} and {}",
                other.table.source, e.table.source
            ));
        }
    }
    let (Some(word), Some(position), Some(types)) = (word, position, types) else {
        return Err(format!(
            "expected word, position and token-type embeddings; found {}{}{}",
            if word.is_some() { "word " } else { "" },
            if position.is_some() { "position " } else { "" },
            if types.is_some() { "token-type" } else { "" },
        ));
    };
    match (roberta, padding_idx) {
        (false, Some(pad)) => {
            return Err(format!(
                "positions are counted from padding index {pad} (a RoBERTa graph, not BERT's)"
            ));
        }
        (true, None) => return Err("positions are a 0, 1, 2, ... range (a BERT graph, not RoBERTa's)".into()),
        _ => {}
    }
    let hidden = word.table.shape[1];
    out.place("embeddings.word_embeddings.weight".into(), &word.table, false);
    out.place("embeddings.position_embeddings.weight".into(), &position.table, false);
    out.place("embeddings.token_type_embeddings.weight".into(), &types.table, false);
    // The embeddings' LayerNorm: the first norm reached from the word lookup through Adds.
    let norm_nodes: HashSet<usize> = norms.iter().map(|n| n.node).collect();
    let norm_at = |node: usize| norms.iter().find(|n| n.node == node);
    let reached = g.reach(&word.y, &norm_nodes, 6);
    let emb_norm = reached
        .iter()
        .next()
        .and_then(|&i| norm_at(i))
        .ok_or("no LayerNorm after the embeddings")?;
    used_norms.insert(emb_norm.node);
    let place_norm = |out: &mut Resolved, prefix: &str, n: &crate::onnx::Norm| {
        out.place(format!("{prefix}.LayerNorm.weight"), &n.gamma, false);
        if let Some(beta) = &n.beta {
            out.place(format!("{prefix}.LayerNorm.bias"), beta, false);
        }
    };
    place_norm(&mut out, "embeddings", emb_norm);
    let place_linear = |out: &mut Resolved, prefix: &str, l: &crate::onnx::Linear| -> Result<(), String> {
        out.place(format!("{prefix}.weight"), &l.weight, true);
        let bias = l
            .bias
            .as_ref()
            .ok_or_else(|| format!("{prefix}: {} has no bias", name(l.node)))?;
        out.place(format!("{prefix}.bias"), bias, false);
        Ok(())
    };
    // The norm whose input is the residual sum `a + b` (in either order).
    let residual_norm = |y: &str, residual: &str| -> Option<&crate::onnx::Norm> {
        g.consumers(y).iter().find_map(|&(i, _)| {
            let add = &g.nodes[i];
            (add.op == "Add" && add.inputs.iter().any(|s| s == residual))
                .then(|| norms.iter().find(|n| n.x == add.outputs[0]))
                .flatten()
        })
    };
    let linear_at = |node: usize| linears.iter().find(|l| l.reader == node);

    let mut h = emb_norm.y.clone();
    let (mut n_layer, mut n_head, mut intermediate) = (0usize, None, None);
    loop {
        let reading: Vec<&crate::onnx::Linear> = linears.iter().filter(|l| l.x == h).collect();
        if reading.is_empty() {
            break;
        }
        let layer = n_layer;
        let p = format!("encoder.layer.{layer}");
        let [a, b, c] = reading[..] else {
            return Err(format!(
                "layer {layer}: {} linear layers read the hidden state {h} (expected query, key and value)",
                reading.len()
            ));
        };
        // Where each projection goes: (node, slot) of the first MatMul of two computed inputs.
        let matmul_of = |l: &crate::onnx::Linear| {
            g.through_reshapes(&l.y)
                .0
                .into_iter()
                .find(|&(i, _)| g.nodes[i].op == "MatMul" && linear_at(i).is_none())
        };
        let targets = [a, b, c].map(|l| (l, matmul_of(l)));
        let q = targets.iter().find(|(_, t)| t.is_some_and(|(_, s)| s == 0));
        let (Some((q, Some((scores, _)))), true) = (q, true) else {
            return Err(format!(
                "layer {layer}: no projection feeds a scores MatMul as its left side"
            ));
        };
        let k = targets
            .iter()
            .find(|(_, t)| *t == Some((*scores, 1)))
            .ok_or_else(|| format!("layer {layer}: no key projection beside {}", name(*scores)))?
            .0;
        let v = targets
            .iter()
            .find(|(_, t)| t.is_some_and(|(i, s)| i != *scores && s == 1))
            .ok_or_else(|| format!("layer {layer}: no value projection"))?;
        let (v, context) = (v.0, v.1.expect("found by its target").0);
        place_linear(&mut out, &format!("{p}.attention.self.query"), q)?;
        place_linear(&mut out, &format!("{p}.attention.self.key"), k)?;
        place_linear(&mut out, &format!("{p}.attention.self.value"), v)?;
        if n_head.is_none() {
            // The heads: the query's Reshape to [.., heads, head_dim].
            n_head = g.through_reshapes(&q.y).1.iter().find_map(|&r| {
                let t = g.reshape_target(r)?;
                match t[..] {
                    [.., Some(heads), Some(dim)] if heads > 0 && dim > 0 && (heads * dim) as usize == hidden => {
                        Some(heads as usize)
                    }
                    _ => None,
                }
            });
        }
        let linear_nodes: HashSet<usize> = linears.iter().map(|l| l.reader).collect();
        let attn_out = g
            .through_reshapes(&g.nodes[context].outputs[0])
            .0
            .into_iter()
            .find_map(|(i, _)| linear_at(i))
            .ok_or_else(|| {
                format!(
                    "layer {layer}: no projection reads the attention context of {}",
                    name(context)
                )
            })?;
        place_linear(&mut out, &format!("{p}.attention.output.dense"), attn_out)?;
        let norm1 = residual_norm(&attn_out.y, &h)
            .ok_or_else(|| format!("layer {layer}: no LayerNorm of the attention output plus the residual"))?;
        place_norm(&mut out, &format!("{p}.attention.output"), norm1);
        let inter: Vec<_> = linears.iter().filter(|l| l.x == norm1.y).collect();
        let [inter] = inter[..] else {
            return Err(format!(
                "layer {layer}: {} projections read the attention block's output",
                inter.len()
            ));
        };
        place_linear(&mut out, &format!("{p}.intermediate.dense"), inter)?;
        let after = g.reach(&inter.y, &linear_nodes, 12);
        let [down] = after.iter().collect::<Vec<_>>()[..] else {
            return Err(format!(
                "layer {layer}: {} projections follow the intermediate one's activation",
                after.len()
            ));
        };
        let down = linear_at(*down).expect("a linear node");
        place_linear(&mut out, &format!("{p}.output.dense"), down)?;
        let norm2 = residual_norm(&down.y, &norm1.y)
            .ok_or_else(|| format!("layer {layer}: no LayerNorm of the feed-forward output plus the residual"))?;
        place_norm(&mut out, &format!("{p}.output"), norm2);
        intermediate = Some(inter.weight.shape[1]);
        for l in [q, k, v, attn_out, inter, down] {
            used_linears.insert(l.node);
        }
        used_norms.extend([norm1.node, norm2.node]);
        h = norm2.y.clone();
        n_layer += 1;
    }
    if n_layer == 0 {
        return Err(format!("no encoder layer reads the embeddings' LayerNorm output {h}"));
    }
    // The pooler, when the graph computes it: the remaining projection followed by Tanh.
    let pooler = linears
        .iter()
        .filter(|l| !used_linears.contains(&l.node))
        .find(|l| g.consumers(&l.y).iter().any(|&(i, _)| g.nodes[i].op == "Tanh"));
    match pooler {
        Some(l) => {
            place_linear(&mut out, "pooler.dense", l)?;
            used_linears.insert(l.node);
        }
        None => out.absent.push("pooler.".into()),
    }
    let left: Vec<String> = linears
        .iter()
        .filter(|l| !used_linears.contains(&l.node))
        .map(|l| format!("linear {} ({}, {:?})", name(l.node), l.weight.source, l.weight.shape))
        .chain(
            norms
                .iter()
                .filter(|n| !used_norms.contains(&n.node))
                .map(|n| format!("layer norm {} ({})", name(n.node), n.gamma.source)),
        )
        .collect();
    if !left.is_empty() {
        return Err(format!("could not place: {}", left.join("; ")));
    }
    let n_head = n_head.ok_or("could not read the number of attention heads off the query's Reshape; pass --config")?;
    let (model_type, class) = if roberta {
        ("roberta", "RobertaModel")
    } else {
        ("bert", "BertModel")
    };
    out.config = serde_json::json!({
        "model_type": model_type, "architectures": [class],
        "num_hidden_layers": n_layer, "num_attention_heads": n_head, "hidden_size": hidden,
        "intermediate_size": intermediate, "max_position_embeddings": position.table.shape[0],
        "vocab_size": word.table.shape[0], "type_vocab_size": types.table.shape[0],
        "layer_norm_eps": emb_norm.eps,
    });
    if let Some(pad) = padding_idx {
        out.config["pad_token_id"] = pad.into();
    }
    Ok(out)
}

/// Sentence-transformers' pooling of a model directory (`modules.json` and its Pooling
/// module's `config.json`): `None` without a `modules.json`. Modules Kiln does not
/// compute (`Dense`, ...) and pooling modes other than one of mean / CLS / max are
/// refused by name, never silently replaced by mean pooling.
pub fn sentence_pooling(dir: &Path) -> Result<Option<(SentencePooling, bool)>, ConvertError> {
    let modules = dir.join("modules.json");
    if !modules.is_file() {
        return Ok(None);
    }
    let err = |path: &Path, m: String| ConvertError::Config(format!("{}: {m}", path.display()));
    let list = crate::read_json(&modules)?;
    let list = list
        .as_array()
        .ok_or_else(|| err(&modules, "not a list of modules".into()))?;
    let (mut pooling, mut normalize) = (SentencePooling::Mean, false);
    for m in list {
        let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
        let path = m.get("path").and_then(Value::as_str).unwrap_or("");
        match ty.rsplit('.').next().unwrap_or("") {
            "Transformer" => {}
            "Normalize" => normalize = true,
            "Pooling" => {
                let file = dir.join(path).join("config.json");
                let config = crate::read_json(&file)?;
                let on = |k: &str| config.get(k).and_then(Value::as_bool).unwrap_or(false);
                let modes: Vec<&str> = config
                    .as_object()
                    .map(|o| {
                        o.keys()
                            .filter(|k| k.starts_with("pooling_mode_") && on(k))
                            .map(String::as_str)
                            .collect()
                    })
                    .unwrap_or_default();
                pooling = match modes[..] {
                    ["pooling_mode_mean_tokens"] => SentencePooling::Mean,
                    ["pooling_mode_cls_token"] => SentencePooling::Cls,
                    ["pooling_mode_max_tokens"] => SentencePooling::Max,
                    _ => {
                        return Err(err(
                            &file,
                            format!(
                                "pooling {modes:?}: Kiln pools by exactly one of pooling_mode_mean_tokens, pooling_mode_cls_token, pooling_mode_max_tokens"
                            ),
                        ));
                    }
                };
            }
            _ => {
                return Err(err(
                    &modules,
                    format!("module {ty} ({path}) is not one Kiln computes (Transformer, Pooling, Normalize)"),
                ));
            }
        }
    }
    Ok(Some((pooling, normalize)))
}
