//! GGUF files in: a llama.cpp model becomes what a Hugging Face directory would hold
//! (HF tensor names and layouts, a `config.json`, a `tokenizer.json`, a
//! `tokenizer_config.json` with the chat template, a `generation_config.json`), and then
//! goes through the same conversion as one. The architecture comes from
//! `general.architecture`; its entry in [`crate::arch`] holds the tensor-name table, the
//! metadata-to-config mapping and the fix-ups undoing llama.cpp's converter (the Q/K row
//! permutation of Llama, the `+1` folded into Gemma's norms). Tensors are dequantised
//! to f32 here (block by block, from the memory-mapped file); with `keep_quantized`,
//! the blocks of every 2-D tensor in a format Kiln has kernels for (Q8_0, Q4_0, Q4_1,
//! Q5_0 as they are; Q4_K and Q6_K rewritten into 32-value blocks of the same values,
//! [`kquant`]) are kept as well, rows put in Hugging Face order ([`GgufBlocks`]), for
//! [`crate::quantize::keep_gguf_blocks`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use burn::tensor::DType;
use burn_pack::Tensor as PackTensor;
use kiln_core::layout::{GENERATION_CONFIG, HF_CONFIG, TOKENIZER, TOKENIZER_CONFIG};
use kiln_gguf::quants::GgmlType;
use kiln_gguf::{GgufError, GgufFile};
use kiln_kernels::quant::{QuantType, kquant};
use regex::Regex;
use serde_json::{Value, json};

use crate::arch::{self, GgufRules};
use crate::{ConvertError, Source};

impl From<GgufError> for ConvertError {
    fn from(e: GgufError) -> Self {
        ConvertError::Config(e.to_string())
    }
}

/// The GGUF rules of the file's `general.architecture`.
pub fn rules_for(file: &GgufFile) -> Result<(&'static str, &'static GgufRules), ConvertError> {
    let arch = file.require("general.architecture", file.str("general.architecture"))?;
    for c in arch::ALL {
        if let Some(g) = c.gguf
            && g.architectures.contains(&arch)
        {
            return Ok((c.arch, g));
        }
    }
    let known: Vec<&str> = arch::ALL
        .iter()
        .filter_map(|c| c.gguf)
        .flat_map(|g| g.architectures.iter().copied())
        .collect();
    Err(ConvertError::Config(format!(
        "{}: general.architecture is {arch:?}, an architecture Kiln does not read from GGUF (it reads: {})",
        file.path().display(),
        known.join(", ")
    )))
}

/// A GGUF tensor's blocks, kept packed: `rows` rows of `cols` values, row `j` being
/// row `j` of the Hugging Face tensor (`[out, in]`: output `j`), the bytes as the file
/// stores them (Q4_K and Q6_K: as [`kquant::from_gguf`] rewrites them).
#[derive(Debug, Clone)]
pub struct GgufBlocks {
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: Vec<u8>,
}

/// Where the rows of the Hugging Face tensor `hf` come from in the GGUF one: row `j` of
/// the fixed tensor is row `perm[j]` of the file's. Found by running the
/// architecture's fix-up on the row numbers; `None` when it does more than move rows.
fn row_permutation(rules: &GgufRules, hf: &str, rows: usize, config: &Value) -> Option<Vec<usize>> {
    let Some(fix) = rules.fix else {
        return Some((0..rows).collect());
    };
    // Row numbers are exact in f32 up to 2^24 rows.
    if rows > 1 << 24 {
        return None;
    }
    let mut index: Vec<f32> = (0..rows).map(|r| r as f32).collect();
    fix(hf, &[rows, 1], &mut index, config).ok()?;
    let perm: Vec<usize> = index.iter().map(|&v| v as usize).collect();
    let mut seen = vec![false; rows];
    for (&p, &v) in perm.iter().zip(&index) {
        if v != p as f32 || p >= rows || std::mem::replace(&mut seen[p], true) {
            return None;
        }
    }
    Some(perm)
}

/// The blocks of `info` in Hugging Face row order, or why they cannot be kept.
fn keep_blocks(
    file: &GgufFile,
    info: &kiln_gguf::TensorInfo,
    rules: &GgufRules,
    hf: &str,
    config: &Value,
) -> Result<GgufBlocks, String> {
    let ty = QuantType::from_ggml(info.ty)
        .ok_or_else(|| format!("GGUF type {} has no Kiln kernel (dequantized)", info.ty.name()))?;
    let shape = info.shape();
    let [rows, cols] = shape[..] else {
        return Err(format!("{} in {}-D, Kiln packs 2-D weights", ty.name(), shape.len()));
    };
    let perm = row_permutation(rules, hf, rows, config)
        .ok_or_else(|| "the architecture's fix-up of this tensor is not a row permutation".to_string())?;
    let data = file.data(info);
    // GGUF's row, and Kiln's (for Q4_K and Q6_K, 32-value blocks of the same values)
    let (row_bytes, kiln_row) = info
        .ty
        .bytes_for(cols)
        .filter(|_| cols.is_multiple_of(info.ty.block_size()))
        .zip(ty.bytes_for(cols))
        .ok_or_else(|| format!("rows of {cols} values are not whole {} blocks", ty.name()))?;
    if data.len() != rows * row_bytes {
        return Err(format!("{} bytes for {rows} rows of {row_bytes}", data.len()));
    }
    let mut bytes = Vec::with_capacity(rows * kiln_row);
    for &from in &perm {
        kquant::from_gguf(ty, &data[from * row_bytes..(from + 1) * row_bytes], &mut bytes)
            .map_err(|e| e.to_string())?;
    }
    Ok(GgufBlocks { ty, rows, cols, bytes })
}

/// Read a `.gguf` file as a [`Source`]: HF-named f32 tensors, the HF config, and the
/// tokenizer files in `extra_files`.
pub fn read(path: &Path) -> Result<Source, ConvertError> {
    read_with(path, false)
}

/// [`read`]; with `keep_quantized`, also each quantized 2-D tensor's blocks (or why
/// they cannot be kept) in [`Source::packed`].
pub fn read_with(path: &Path, keep_quantized: bool) -> Result<Source, ConvertError> {
    let file = GgufFile::open(path)?;
    let (_, rules) = rules_for(&file)?;
    let config = (rules.config)(&file)?;
    let names: Vec<(Regex, &str)> = rules
        .tensors
        .iter()
        .map(|(from, to)| (Regex::new(from).expect("rule tables hold valid regexes"), *to))
        .collect();
    let mut tensors = BTreeMap::new();
    let mut packed = BTreeMap::new();
    let mut unplaced = Vec::new();
    for info in &file.tensors {
        let Some((re, to)) = names.iter().find(|(re, _)| re.is_match(&info.name)) else {
            unplaced.push(format!("{} {:?} {}", info.name, info.shape(), info.ty.name()));
            continue;
        };
        let hf = re.replace(&info.name, *to).into_owned();
        let shape = info.shape();
        if keep_quantized && !matches!(info.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            packed.insert(hf.clone(), keep_blocks(&file, info, rules, &hf, &config));
        }
        let mut values = file.dequantize(info)?;
        if let Some(fix) = rules.fix {
            fix(&hf, &shape, &mut values, &config)
                .map_err(|m| ConvertError::Config(format!("{}: tensor {}: {m}", path.display(), info.name)))?;
        }
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor = PackTensor::new(
            hf.clone(),
            DType::F32,
            shape,
            None,
            burn_pack::Bytes::from_bytes_vec(bytes),
        );
        if tensors.insert(hf.clone(), tensor).is_some() {
            return Err(ConvertError::Config(format!(
                "{}: two tensors map onto {hf}",
                path.display()
            )));
        }
    }
    if !unplaced.is_empty() {
        return Err(ConvertError::Config(format!(
            "{}: {} tensors have no place in the {} model:\n  {}",
            path.display(),
            unplaced.len(),
            config["model_type"].as_str().unwrap_or("?"),
            unplaced.join("\n  ")
        )));
    }
    let tokenizer = tokenizer_files(&file)?;
    let mut config = config;
    if let Some(obj) = config.as_object_mut() {
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = tokenizer.ids.get(key) {
                obj.insert(key.into(), json!(v));
            }
        }
    }
    let mut extra_files = vec![
        (HF_CONFIG.to_string(), serde_json::to_vec_pretty(&config).expect("json")),
        (TOKENIZER.to_string(), tokenizer.tokenizer_json),
        (TOKENIZER_CONFIG.to_string(), tokenizer.tokenizer_config),
    ];
    if let Some(g) = tokenizer.generation_config {
        extra_files.push((GENERATION_CONFIG.to_string(), g));
    }
    Ok(Source {
        tensors,
        hf_config: Some((path.to_path_buf(), config)),
        tokenizer: None,
        files: vec![path.to_path_buf()],
        extra_files,
        packed,
        ..Source::default()
    })
}

/// A required integer `{arch}.{key}`.
pub fn meta_u64(file: &GgufFile, key: &str) -> Result<u64, ConvertError> {
    Ok(file.require(key, file.u64(key))?)
}

/// The Hugging Face `rope_scaling` of `{arch}.rope.scaling.*` (null when none); a type
/// Kiln lacks is an error naming the key.
pub fn rope_scaling(file: &GgufFile, arch: &str) -> Result<Value, ConvertError> {
    let (ty, factor) = (
        format!("{arch}.rope.scaling.type"),
        format!("{arch}.rope.scaling.factor"),
    );
    Ok(match file.str(&ty)? {
        None | Some("none") => Value::Null,
        Some("linear") => json!({"rope_type": "linear", "factor": file.require(&factor, file.f64(&factor))?}),
        Some(other) => {
            return Err(ConvertError::Config(format!(
                "{}: metadata {ty}: {other:?} is not supported (none, linear are)",
                file.path().display()
            )));
        }
    })
}

/// The tokenizer files built from `tokenizer.ggml.*` (and `tokenizer.chat_template`).
struct TokenizerFiles {
    tokenizer_json: Vec<u8>,
    tokenizer_config: Vec<u8>,
    generation_config: Option<Vec<u8>>,
    ids: BTreeMap<&'static str, u64>,
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The pre-tokenizer of a byte-level BPE vocabulary, by `tokenizer.ggml.pre`
/// (llama.cpp's names; the regexes are its `llm_tokenizer_bpe` ones).
fn bpe_pre_tokenizer(pre: &str, path: &Path) -> Result<Value, ConvertError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex});
    let split =
        |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        // GPT-2's own regex (ByteLevel's built-in).
        "gpt2" | "default" | "mpt" | "olmo" | "jais" => byte_level(true),
        // Digits one by one, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
        }),
        "llama3" | "llama-bpe" | "llama-v3" | "dbrx" | "smaug-bpe" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)
            ]
        }),
        "qwen2" | "deepseek-r1-qwen" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)
            ]
        }),
        other => {
            return Err(ConvertError::Config(format!(
                "{}: tokenizer.ggml.pre {other:?} is a pre-tokenizer Kiln does not know (it knows gpt2, smollm, starcoder, llama-bpe, qwen2 and their aliases)",
                path.display()
            )));
        }
    })
}

/// Merges for a SentencePiece-BPE vocabulary that has none (`tokenizer.ggml.model =
/// llama`): every split `a + b` of a token into two tokens, ranked by the token's score,
/// highest first (SentencePiece merges the best-scoring pair), ties by the pieces' scores.
fn merges_from_scores(tokens: &[&str], scores: &[f32], mergeable: &[bool]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| mergeable[*i])
        .map(|(i, t)| (*t, i))
        .collect();
    let mut merges: Vec<(f32, f32, f32, usize, &str, &str)> = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        if !mergeable[i] {
            continue;
        }
        for (at, _) in token.char_indices().skip(1) {
            let (l, r) = token.split_at(at);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((scores[i], scores[li], scores[ri], i, l, r));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(b.1.total_cmp(&a.1))
            .then(b.2.total_cmp(&a.2))
            .then(a.3.cmp(&b.3))
    });
    merges.into_iter().map(|m| (m.4.to_string(), m.5.to_string())).collect()
}

fn tokenizer_files(file: &GgufFile) -> Result<TokenizerFiles, ConvertError> {
    let path = file.path();
    let err = |key: &str, m: String| ConvertError::Config(format!("{}: {key}: {m}", path.display()));
    let model = file
        .str("tokenizer.ggml.model")?
        .ok_or_else(|| err("tokenizer.ggml.model", "missing: the file carries no tokenizer".into()))?;
    let tokens = file
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| err("tokenizer.ggml.tokens", "missing".into()))?;
    let n = tokens.len();
    let types: Vec<i64> = match file.array("tokenizer.ggml.token_type")? {
        Some(a) => {
            if a.len() != n {
                return Err(err(
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {n} tokens", a.len()),
                ));
            }
            a.iter()
                .map(|v| {
                    v.as_i64()
                        .ok_or_else(|| err("tokenizer.ggml.token_type", format!("{v:?} is not an integer")))
                })
                .collect::<Result<_, _>>()?
        }
        None => vec![1; n],
    };
    let id = |key: &str| -> Result<Option<u64>, ConvertError> {
        let v = file.u64(key)?;
        if let Some(v) = v
            && v as usize >= n
        {
            return Err(err(key, format!("token id {v} is outside the {n}-token vocabulary")));
        }
        Ok(v)
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let eot = id("tokenizer.ggml.eot_token_id")?;
    let unk = id("tokenizer.ggml.unknown_token_id")?;
    let pad = id("tokenizer.ggml.padding_token_id")?;
    let add_bos = file.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama");
    let add_eos = file.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let add_space_prefix = file
        .bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(model == "llama");

    // Control tokens are special; user-defined ones are matched whole in the raw text
    // (as llama.cpp's tokenizer does).
    let added: Vec<Value> = (0..n)
        .filter(|&i| types[i] == CONTROL || types[i] == USER_DEFINED)
        .map(|i| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == CONTROL})
        })
        .collect();
    let mut seen = HashSet::new();
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        if seen.insert(*t) {
            vocab.insert((*t).to_string(), json!(i));
        }
    }
    let token = |i: Option<u64>| i.map(|i| tokens[i as usize].to_string());
    let (model_json, normalizer, pre_tokenizer, decoder) = match model {
        "gpt2" => {
            let merges = file.strings("tokenizer.ggml.merges")?.ok_or_else(|| {
                err(
                    "tokenizer.ggml.merges",
                    "missing (a gpt2 tokenizer needs its merges)".into(),
                )
            })?;
            let merges: Vec<Value> = merges
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    m.split_once(' ')
                        .map(|(a, b)| json!([a, b]))
                        .ok_or_else(|| err("tokenizer.ggml.merges", format!("item {i} {m:?} is not two tokens")))
                })
                .collect::<Result<_, _>>()?;
            let pre = file.str("tokenizer.ggml.pre")?.unwrap_or("default");
            (
                json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                       "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                       "vocab": vocab, "merges": merges}),
                Value::Null,
                bpe_pre_tokenizer(pre, path)?,
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}),
            )
        }
        "llama" => {
            let scores: Vec<f32> = file
                .array("tokenizer.ggml.scores")?
                .ok_or_else(|| {
                    err(
                        "tokenizer.ggml.scores",
                        "missing (a SentencePiece tokenizer needs its scores)".into(),
                    )
                })?
                .iter()
                .map(|v| {
                    v.as_f64()
                        .map(|f| f as f32)
                        .ok_or_else(|| err("tokenizer.ggml.scores", format!("{v:?} is not a float")))
                })
                .collect::<Result<_, _>>()?;
            if scores.len() != n {
                return Err(err(
                    "tokenizer.ggml.scores",
                    format!("{} scores for {n} tokens", scores.len()),
                ));
            }
            // Normal tokens merge; control, user-defined, unused and byte tokens do not.
            let mergeable: Vec<bool> = types.iter().map(|&t| t == 1).collect();
            let merges: Vec<Value> = merges_from_scores(&tokens, &scores, &mergeable)
                .into_iter()
                .map(|(a, b)| json!([a, b]))
                .collect();
            let mut normalizers = vec![];
            if add_space_prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
            }
            normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            (
                json!({"type": "BPE", "dropout": null, "unk_token": token(unk), "continuing_subword_prefix": null,
                       "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                       "vocab": vocab, "merges": merges}),
                json!({"type": "Sequence", "normalizers": normalizers}),
                Value::Null,
                json!({"type": "Sequence", "decoders": decoders}),
            )
        }
        other => {
            return Err(err(
                "tokenizer.ggml.model",
                format!("{other:?} is a tokenizer model Kiln does not build (it builds gpt2 and llama)"),
            ));
        }
    };
    // BOS / EOS insertion as the GGUF asks (`add_bos_token`, `add_eos_token`).
    let mut single = vec![];
    let mut special = serde_json::Map::new();
    let mut piece = |id: Option<u64>, key: &str| -> Result<Option<Value>, ConvertError> {
        let id = id.ok_or_else(|| err(key, "missing, but the tokenizer adds it".into()))?;
        let t = tokens[id as usize];
        special.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
        Ok(Some(json!({"SpecialToken": {"id": t, "type_id": 0}})))
    };
    if add_bos {
        single.extend(piece(bos, "tokenizer.ggml.bos_token_id")?);
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if add_eos {
        single.extend(piece(eos, "tokenizer.ggml.eos_token_id")?);
    }
    let post_processor =
        json!({"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": special});
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": decoder, "model": model_json,
    });
    let tokenizer_json = serde_json::to_vec(&tokenizer).expect("json");
    // The tokenizers crate must accept what was built.
    tokenizers::Tokenizer::from_bytes(&tokenizer_json).map_err(|e| {
        err(
            "tokenizer",
            format!("the tokenizer built from the GGUF metadata is invalid: {e}"),
        )
    })?;

    let chat_template = file.str("tokenizer.chat_template")?;
    let mut config = json!({
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "bos_token": token(bos), "eos_token": token(eos), "unk_token": token(unk), "pad_token": token(pad),
        "model_max_length": null,
    });
    if let Some(t) = chat_template {
        config["chat_template"] = json!(t);
    }
    let mut ids = BTreeMap::new();
    for (key, v) in [("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)] {
        if let Some(v) = v {
            ids.insert(key, v);
        }
    }
    // Generation stops at EOS and at the end-of-turn token, when they differ.
    let stops: Vec<u64> = eos.into_iter().chain(eot.filter(|t| Some(*t) != eos)).collect();
    let generation_config = (!stops.is_empty()).then(|| {
        serde_json::to_vec_pretty(&json!({"bos_token_id": bos, "eos_token_id": stops, "pad_token_id": pad}))
            .expect("json")
    });
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: serde_json::to_vec_pretty(&config).expect("json"),
        generation_config,
        ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_come_from_scores_best_first() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
        let m = merges_from_scores(&tokens, &scores, &[true; 6]);
        assert_eq!(
            m,
            vec![
                ("a".into(), "b".into()),
                ("b".into(), "c".into()),
                ("a".into(), "bc".into()),
                ("ab".into(), "c".into()),
            ]
        );
    }

    #[test]
    fn an_unknown_pre_tokenizer_is_named() {
        let err = bpe_pre_tokenizer("tekken", Path::new("m.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.gguf") && err.contains("tekken"), "{err}");
    }
}
