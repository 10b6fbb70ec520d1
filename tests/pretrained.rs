//! Real pretrained LLMs from GGUF files (scripts/fetch-llms.sh): SmolLM2-135M-Instruct
//! (llama, Q4_1) and Gemma 3 270M (gemma3, Q4_K_M), converted by `convert`'s library and
//! run on flex, against transformers loading the same GGUF files in float32
//! (scripts/llm_reference.py writes `reference.json` beside each file):
//! - last-position logits of three prompts within 1e-4 of the largest reference logit;
//! - 64 greedy tokens identical, token for token (SmolLM2 also on ndarray, and on
//!   libtorch in the `--features tch` build);
//! - the sliding-window perplexity of a Shakespeare poem within 0.1 %;
//! - SmolLM2's GGUF-built tokenizer: transformers' ids on every line of the tokenizer
//!   corpus.

mod common;
#[path = "support/lm.rs"]
mod lm;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::prelude::*;
use kiln_convert::{Source, convert, hf_config, write_model_dir_with};
use kiln_core::layout::WhichWeights;
use kiln_infer::engine::generate;
use kiln_infer::perplexity::{PerplexityMethod, perplexity};
use kiln_infer::{LoadedModel, Model, Sampling};
use kiln_models::CausalLm;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<PromptRef>,
    perplexity: PerplexityRef,
    #[serde(default)]
    tokens: Option<Vec<Vec<u32>>>,
    #[serde(default)]
    tokens_pre: Option<Vec<Vec<u32>>>,
    #[serde(default)]
    chat: Vec<ChatRef>,
}

#[derive(Deserialize)]
struct ChatRef {
    messages: Vec<kiln_infer::chat::Message>,
    text: String,
}

#[derive(Deserialize)]
struct PromptRef {
    text: String,
    ids: Vec<u32>,
    last_logits: Vec<f32>,
    greedy: Vec<u32>,
}

#[derive(Deserialize)]
struct PerplexityRef {
    /// The ids transformers scored (its tokenizer's).
    ids: Vec<u32>,
    context: usize,
    stride: usize,
    scored: usize,
    perplexity: f64,
}

struct Case {
    dir: &'static str,
    gguf: &'static str,
    /// Whether transformers' GGUF-built tokenizer is the model's own (SmolLM2's
    /// byte-level BPE). For Gemma it is not: transformers builds a Unigram model over
    /// Gemma's BPE scores, which segments differently (docs/llm.md); Kiln's Gemma
    /// tokenizer is checked against llama.cpp's instead, and the model on the ids
    /// transformers fed.
    tokenizer_is_the_models: bool,
}

const SMOLLM2: Case = Case {
    dir: "smollm2-135m-instruct",
    gguf: "SmolLM2-135M-Instruct.Q4_1.gguf",
    tokenizer_is_the_models: true,
};
const GEMMA3: Case = Case {
    dir: "gemma-3-270m",
    gguf: "gemma-3-270m-q4_k_m.gguf",
    tokenizer_is_the_models: false,
};

fn source_dir(case: &Case) -> PathBuf {
    let dir = common::repo_root().join("datasets/pretrained").join(case.dir);
    assert!(
        dir.join(case.gguf).is_file(),
        "{} is missing: run scripts/fetch-llms.sh",
        dir.join(case.gguf).display()
    );
    assert!(
        dir.join("reference.json").is_file(),
        "{} is missing: run scripts/llm_reference.py (in the environment of scripts/setup-torch-cpu.sh)",
        dir.join("reference.json").display()
    );
    dir
}

/// The case's GGUF read (with its quantized blocks when `keep_quantized`) and converted
/// to f32 Kiln weights, as `convert` does: the source, the model, the safetensors bytes
/// and the (complete) report.
fn converted(case: &Case, keep_quantized: bool) -> (Source, kiln_models::ModelConfig, Vec<u8>, kiln_convert::Report) {
    let gguf = source_dir(case).join(case.gguf);
    let source = Source::read_with(&gguf, keep_quantized).unwrap();
    let (path, json) = source.hf_config.clone().unwrap();
    let model = hf_config::detect_model_config(&json, &path.display().to_string()).unwrap();
    let (weights, report) = convert(&source, &model, false).unwrap();
    assert!(report.is_complete(), "{}", report.details());
    (source, model, weights, report)
}

/// The GGUF converted into a Kiln model directory, once per test binary (in
/// [`common::scratch_dir`], replaced next run).
fn kiln_dir(case: &'static Case, cell: &'static OnceLock<PathBuf>) -> &'static Path {
    cell.get_or_init(|| {
        let (source, model, weights, _) = converted(case, false);
        let dir = common::scratch_dir(&format!("pretrained-{}", case.dir)).join("model");
        write_model_dir_with(
            &dir,
            &model_file(&model, None),
            &weights,
            None,
            None,
            &source.extra_files,
        )
        .unwrap();
        dir
    })
}

fn reference(case: &Case) -> Reference {
    let path = source_dir(case).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn lm(loaded: &LoadedModel) -> &dyn CausalLm {
    match &loaded.model {
        Model::CausalLm(m) => m.as_ref(),
        _ => panic!("not a language model"),
    }
}

fn check_logits_and_greedy(case: &'static Case, cell: &'static OnceLock<PathBuf>) {
    check_logits_and_greedy_on(case, cell, &Device::flex(), usize::MAX);
}

/// The logits and greedy checks on `device`, for the first `prompts` reference prompts.
fn check_logits_and_greedy_on(case: &'static Case, cell: &'static OnceLock<PathBuf>, device: &Device, prompts: usize) {
    let device = device.clone();
    let loaded = LoadedModel::open(kiln_dir(case, cell), WhichWeights::Best, &device).unwrap();
    let model = lm(&loaded);
    let tokenizer = loaded.tokenizer.as_ref().unwrap();
    for p in reference(case).prompts.into_iter().take(prompts) {
        // The prompt encodes to the ids transformers fed (BOS per the GGUF).
        if case.tokenizer_is_the_models {
            assert_eq!(tokenizer.encode_with_special(&p.text).unwrap(), p.ids, "{:?}", p.text);
        } else {
            assert_eq!(p.ids[0], tokenizer.encode_with_special("").unwrap()[0], "BOS first");
        }
        let t = p.ids.len();
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(p.ids.iter().map(|&i| i as i64).collect(), [1, t]),
            &device,
        );
        let logits: Vec<f32> = model
            .forward(ids)
            .slice(s![.., t - 1..t, ..])
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(logits.len(), p.last_logits.len());
        let scale = p.last_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = logits
            .iter()
            .zip(&p.last_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-4 * scale,
            "{}: {:?}: logits differ by {worst} (max |logit| {scale}, tolerance 1e-4 relative)",
            case.dir,
            p.text
        );
        eprintln!(
            "{}: {:?}: max |logit diff| {worst:.3e} = {:.3e} of max |logit| {scale:.2}",
            case.dir,
            p.text,
            worst / scale
        );
        let (tokens, _) = generate(model, &p.ids, 64, &Sampling::greedy(), true, &device, |_| {}).unwrap();
        assert_eq!(tokens, p.greedy, "{}: greedy continuation of {:?}", case.dir, p.text);
    }
}

fn check_perplexity(case: &'static Case, cell: &'static OnceLock<PathBuf>) {
    let device = Device::flex();
    let loaded = LoadedModel::open(kiln_dir(case, cell), WhichWeights::Best, &device).unwrap();
    let r = reference(case).perplexity;
    let got = perplexity(
        lm(&loaded),
        &r.ids,
        PerplexityMethod::Sliding {
            context: r.context,
            stride: r.stride,
        },
        None,
        &device,
    )
    .unwrap();
    assert_eq!(got.scored, r.scored, "{}: tokens scored", case.dir);
    let rel = (got.perplexity - r.perplexity).abs() / r.perplexity;
    eprintln!(
        "{}: perplexity {:.6} vs transformers' {:.6} ({:.2e} relative; {} tokens scored)",
        case.dir, got.perplexity, r.perplexity, rel, got.scored
    );
    assert!(
        rel <= 1e-3,
        "{}: perplexity {} vs transformers' {} ({:.4} % apart, tolerance 0.1 %)",
        case.dir,
        got.perplexity,
        r.perplexity,
        rel * 100.0
    );
}

static SMOLLM2_DIR: OnceLock<PathBuf> = OnceLock::new();
static GEMMA3_DIR: OnceLock<PathBuf> = OnceLock::new();

#[test]
fn smollm2_matches_transformers_logits_and_greedy_tokens() {
    check_logits_and_greedy(&SMOLLM2, &SMOLLM2_DIR);
}

#[test]
fn gemma3_matches_transformers_logits_and_greedy_tokens() {
    check_logits_and_greedy(&GEMMA3, &GEMMA3_DIR);
}

/// SmolLM2 on Burn's ops instead of flex's kernels: ndarray in the default build, and
/// libtorch in the `--features tch` build (.ci/run), one prompt each (its logits and 64
/// greedy tokens against transformers'), in the time CI has.
#[test]
fn smollm2_on_other_backends_matches_transformers() {
    use kiln_core::BackendKind;
    for kind in [BackendKind::Ndarray, BackendKind::Tch] {
        if kind.is_compiled() {
            eprintln!("smollm2 on {kind:?}");
            check_logits_and_greedy_on(&SMOLLM2, &SMOLLM2_DIR, &kind.device(0).unwrap(), 1);
        }
    }
}

#[test]
fn smollm2_perplexity_matches_transformers() {
    check_perplexity(&SMOLLM2, &SMOLLM2_DIR);
}

#[test]
fn gemma3_perplexity_matches_transformers() {
    check_perplexity(&GEMMA3, &GEMMA3_DIR);
}

/// The files of the tokenizer corpus, in the order scripts/llm_reference.py and
/// scripts/make_tokenizer_fixture.py read them.
fn corpus_files() -> Vec<PathBuf> {
    let root = common::repo_root();
    let mut files = vec![root.join("tests/fixtures/tokenizer-varied.txt")];
    for dir in ["datasets/shakespeare-poems", "datasets/shakespeare"] {
        let mut txt: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        txt.sort();
        files.extend(txt);
    }
    files
}

/// The lines of the tokenizer corpus.
fn corpus() -> Vec<String> {
    corpus_files()
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .split('\n')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// SmolLM2's tokenizer built from the GGUF gives, on every line of the corpus,
/// transformers' GGUF-built tokenizer's ids with the GGUF's pre-tokenizer (`smollm`:
/// digits one by one before GPT-2's split, as SmolLM2's own tokenizer.json and llama.cpp
/// do), and transformers' ids as they are on every line without whitespace before a
/// digit (transformers drops `tokenizer.ggml.pre`, which only changes how a run of
/// whitespace before a digit splits).
#[test]
fn smollm2_gguf_tokenizer_matches_transformers_on_every_line() {
    let dir = kiln_dir(&SMOLLM2, &SMOLLM2_DIR);
    let tokenizer = kiln_data::Tokenizer::load(&dir.join("tokenizer.json")).unwrap();
    let r = reference(&SMOLLM2);
    let (plain, with_pre) = (r.tokens.expect("tokens"), r.tokens_pre.expect("tokens_pre"));
    let lines = corpus();
    assert_eq!(lines.len(), with_pre.len(), "corpus lines");
    assert!(lines.iter().map(String::len).sum::<usize>() > 1_000_000);
    let space_digit = regex::Regex::new(r"\s\d").unwrap();
    let (mut bad, mut pre_only) = (Vec::new(), 0);
    for (i, line) in lines.iter().enumerate() {
        let got = tokenizer.encode(line).unwrap();
        if got != with_pre[i] {
            bad.push(format!("line {i} {line:?}: {got:?} vs {:?}", with_pre[i]));
        } else {
            assert_eq!(&tokenizer.decode(&got).unwrap(), line, "line {i} round trip");
        }
        if got != plain[i] {
            pre_only += 1;
            assert!(
                space_digit.is_match(line),
                "line {i} {line:?} differs from transformers' GGUF tokenizer without whitespace before a digit"
            );
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} lines differ:\n{}",
        bad.len(),
        lines.len(),
        bad[..bad.len().min(10)].join("\n")
    );
    eprintln!(
        "{} lines; {pre_only} differ from transformers' GGUF tokenizer only by its missing digit split",
        lines.len()
    );
}

/// Kiln reads a BPE `tokenizer.json` in one streaming pass (`kiln_data::bpe_json`, a
/// third of the memory): for both models' files it builds the tokenizer `tokenizers`'
/// own reader builds, the same serialized, the same ids on the corpus.
#[test]
fn the_streaming_tokenizer_reader_builds_what_tokenizers_builds() {
    let lines = corpus();
    for (case, cell) in [(&SMOLLM2, &SMOLLM2_DIR), (&GEMMA3, &GEMMA3_DIR)] {
        let text = std::fs::read_to_string(kiln_dir(case, cell).join("tokenizer.json")).unwrap();
        let ours = kiln_data::bpe_json::read(&text).expect("a BPE tokenizer.json the streaming reader knows");
        let theirs: tokenizers::Tokenizer = text.parse().unwrap();
        assert_eq!(
            ours.to_string(false).unwrap(),
            theirs.to_string(false).unwrap(),
            "{}",
            case.dir
        );
        for line in lines.iter().step_by(50) {
            let (a, b) = (
                ours.encode(line.as_str(), false).unwrap(),
                theirs.encode(line.as_str(), false).unwrap(),
            );
            assert_eq!(a.get_ids(), b.get_ids(), "{}: {line:?}", case.dir);
        }
    }
}

/// The ids llama.cpp's `llama-tokenize` gives each corpus file, as a whole
/// (scripts/make_tokenizer_fixture.py).
fn llama_cpp_tokens(name: &str) -> Vec<Vec<u32>> {
    use std::io::Read;
    let path = common::repo_root().join(format!("tests/fixtures/gguf/{name}-llama-cpp-tokens.bin.gz"));
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
        .read_to_end(&mut raw)
        .unwrap();
    let words: Vec<u32> = raw
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let mut files = Vec::new();
    let mut at = 0;
    while at < words.len() {
        let n = words[at] as usize;
        files.push(words[at + 1..at + 1 + n].to_vec());
        at += 1 + n;
    }
    files
}

fn check_against_llama_cpp(case: &'static Case, cell: &'static OnceLock<PathBuf>, name: &str) {
    let dir = kiln_dir(case, cell);
    let tokenizer = kiln_data::Tokenizer::load(&dir.join("tokenizer.json")).unwrap();
    let want = llama_cpp_tokens(name);
    let files = corpus_files();
    assert_eq!(files.len(), want.len());
    let mut total = 0;
    for (file, want) in files.iter().zip(&want) {
        let text = std::fs::read_to_string(file).unwrap();
        let got = tokenizer.encode(&text).unwrap();
        if let Some(i) = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .or((got.len() != want.len()).then(|| got.len().min(want.len())))
        {
            let lo = i.saturating_sub(5);
            panic!(
                "{}: {} differs from llama.cpp at id {i}: Kiln {:?} ({:?}) vs llama.cpp {:?} ({:?})",
                case.dir,
                file.display(),
                &got[lo..(i + 5).min(got.len())],
                tokenizer.decode(&got[lo..(i + 5).min(got.len())]).unwrap(),
                &want[lo..(i + 5).min(want.len())],
                tokenizer.decode(&want[lo..(i + 5).min(want.len())]).unwrap(),
            );
        }
        total += got.len();
    }
    eprintln!(
        "{}: {total} ids over {} files identical to llama.cpp's",
        case.dir,
        files.len()
    );
}

#[test]
fn gemma3_gguf_tokenizer_matches_llama_cpp_on_the_corpus() {
    check_against_llama_cpp(&GEMMA3, &GEMMA3_DIR, "gemma3");
}

#[test]
fn smollm2_gguf_tokenizer_matches_llama_cpp_on_the_corpus() {
    check_against_llama_cpp(&SMOLLM2, &SMOLLM2_DIR, "smollm2");
}

/// SmolLM2's chat template, kept from the GGUF, renders as transformers'
/// `apply_chat_template`; Gemma 3 270M (a base model) has none and says so.
#[test]
fn chat_templates_render_like_transformers() {
    use kiln_infer::chat::ChatTemplate;
    let dir = kiln_dir(&SMOLLM2, &SMOLLM2_DIR);
    let template = ChatTemplate::load(dir).unwrap();
    let chats = reference(&SMOLLM2).chat;
    assert_eq!(chats.len(), 2);
    for c in chats {
        assert_eq!(template.render(&c.messages, true).unwrap(), c.text);
    }
    let err = ChatTemplate::load(kiln_dir(&GEMMA3, &GEMMA3_DIR))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat_template") && err.contains("base model"), "{err}");
}

/// `convert --to hf` and back: Hugging Face names, layouts and config.json, then the
/// same Kiln tensors again, for both architectures.
#[test]
fn both_export_to_hugging_face_and_convert_back_unchanged() {
    for (case, cell) in [(&SMOLLM2, &SMOLLM2_DIR), (&GEMMA3, &GEMMA3_DIR)] {
        let dir = kiln_dir(case, cell);
        let model = kiln_core::ModelFile::load(&dir.join("config.toml")).unwrap().model;
        let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
        let hf = kiln_convert::export_hf(&weights, &model, None).unwrap();
        let config = hf_config::to_hf_json(&model).unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join("model.safetensors"), &hf).unwrap();
        std::fs::write(out.path().join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
        let names: Vec<String> = safetensors::SafeTensors::deserialize(&hf)
            .unwrap()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        assert!(
            names.iter().any(|n| n == "model.layers.0.self_attn.q_proj.weight"),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n == "lm_head.weight"), "tied: no lm_head");
        let source = Source::read(out.path()).unwrap();
        let (path, json) = source.hf_config.clone().unwrap();
        let back = hf_config::detect_model_config(&json, &path.display().to_string()).unwrap();
        assert_eq!(back, model, "{}: config round trip", case.dir);
        let (again, report) = convert(&source, &back, false).unwrap();
        assert!(report.is_complete());
        common::assert_same_tensors(&weights, &again);
    }
}

/// LoRA on a pretrained Llama, the common job: SmolLM2 (tied head) fine-tuned on the
/// Shakespeare poems with rank-8 adapters on q/v and a 64-token training window
/// (`train.context`) lowers the validation loss; the result carries the pretrained
/// directory's generation and chat files and loads for inference.
#[test]
fn lora_fine_tuning_of_pretrained_smollm2_lowers_the_loss() {
    use kiln_core::{BackendKind, Selected};
    use kiln_train::finetune::{FinetuneConfig, run_finetune};
    let base = kiln_dir(&SMOLLM2, &SMOLLM2_DIR);
    let out = tempfile::tempdir().unwrap();
    let config = format!(
        "init_from = {:?}\ntask = \"lm\"\nmethod = \"lora\"\n\n[lora]\nrank = 8\nalpha = 16.0\ntargets = [\"q_proj\", \"v_proj\"]\n\n\
         [data]\nkind = \"text\"\npath = {:?}\nval_fraction = 0.1\n\n[train]\nseed = 1337\nbatch_size = 2\ncontext = 64\n\
         max_steps = 10\neval_interval = 10\neval_iters = 4\nlog_interval = 5\n\n[optim]\nlr = 1e-3\nwarmup_steps = 2\n",
        base.display().to_string(),
        common::repo_root()
            .join("datasets/shakespeare-poems")
            .display()
            .to_string()
    );
    let path = common::write(out.path(), "lora.toml", &config);
    let cfg = FinetuneConfig::load(&path, &[]).unwrap();
    let run_dir = out.path().join("run");
    let backend = Selected::new(BackendKind::Flex, 0).unwrap();
    let options = kiln_train::training::TrainOptions {
        run_dir: run_dir.clone(),
        resume: false,
        progress: false,
    };
    let report = run_finetune(cfg, &backend, &options).unwrap();
    let before = report.initial_val_loss.expect("the base model's validation loss");
    let after = report.train.best_val_loss;
    eprintln!(
        "SmolLM2 LoRA: val loss {before:.4} -> {after:.4} in 10 steps; {} of {} parameters trained",
        report.trainable_params, report.total_params
    );
    assert!(after < before - 0.05, "val loss {before} -> {after}");
    assert!(
        report.trainable_params * 100 < report.total_params,
        "LoRA trains under 1 %"
    );
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(run_dir.join(f).is_file(), "{f} not carried over");
    }
    let loaded = LoadedModel::open(&run_dir, WhichWeights::Best, &Device::flex()).unwrap();
    assert_eq!(loaded.eos_token_ids, vec![2]);
}

/// `convert --keep-quantized`: the GGUF's own Q4_1 and Q8_0 blocks in the Kiln model
/// directory, byte for byte where llama.cpp keeps Hugging Face's row order and row for
/// row where it permuted Q and K, and run packed on flex. The only difference from the
/// dequantized model is then the kernels' 8-bit activations: perplexity within 1 % of
/// the f32 model's and the same greedy token after each reference prompt. Gemma 3's
/// Q4_K_M file keeps all of its tensors too: Q8_0 and Q5_0 byte for byte, Q4_K and Q6_K
/// as 32-value blocks that dequantize to the f32 model's weights bit for bit.
#[test]
fn gguf_blocks_are_kept_packed_byte_for_byte() {
    use kiln_convert::quantize::keep_gguf_blocks;
    use kiln_models::quant::QuantType;
    let gguf = source_dir(&SMOLLM2).join(SMOLLM2.gguf);
    let (source, model, weights, report) = converted(&SMOLLM2, true);
    let (packed, plan, q) = keep_gguf_blocks(&weights, &gguf, &model, &source.packed, &report.mapped).unwrap();
    assert!(
        q.kept.is_empty(),
        "every quantized SmolLM2 tensor is kept: {:?}",
        q.kept
    );
    assert_eq!(
        q.packed.len(),
        30 * 7 + 1,
        "seven linear layers per block and the embedding"
    );
    assert_eq!(plan.get("model.embed_tokens"), Some(QuantType::Q8_0));
    assert_eq!(plan.get("model.layers.0.self_attn.q_proj"), Some(QuantType::Q4_1));
    assert!(
        q.bytes[1] * 5 < q.bytes[0],
        "Q4_1 is under a fifth of f32: {:?}",
        q.bytes
    );

    let file = kiln_gguf::GgufFile::open(&gguf).unwrap();
    let st = safetensors::SafeTensors::deserialize(&packed).unwrap();
    let f32_st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    for (gguf_name, module) in [
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj"),
        ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj"),
        ("token_embd.weight", "model.embed_tokens"),
    ] {
        let blocks = st.tensor(&format!("{module}.packed")).unwrap();
        assert!(
            blocks.data() == file.data(file.tensor(gguf_name).unwrap()),
            "{module}: the bytes of {gguf_name}"
        );
    }
    // Q and K: the rows of the file reordered, dequantizing to exactly the f32 model's
    // weights (stored [in, out] there).
    for module in ["model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj"] {
        assert_same_values(&st, &f32_st, module, QuantType::Q4_1);
    }
    packed_matches_dequantized(
        &SMOLLM2,
        &SMOLLM2_DIR,
        (&model, &plan),
        &packed,
        &source.extra_files,
        usize::MAX,
    );

    // Gemma 3: every quantized tensor kept, Q8_0 and Q5_0 as the file's bytes, Q4_K and
    // Q6_K as Kiln's 32-value blocks of the same values.
    let gguf = source_dir(&GEMMA3).join(GEMMA3.gguf);
    let (source, model, weights, report) = converted(&GEMMA3, true);
    let (packed, plan, q) = keep_gguf_blocks(&weights, &gguf, &model, &source.packed, &report.mapped).unwrap();
    assert!(
        q.kept.is_empty(),
        "every quantized Gemma 3 tensor is kept: {:?}",
        q.kept
    );
    assert_eq!(
        plan.tensors.len(),
        18 * 7 + 1,
        "seven linear layers per block and the embedding"
    );
    let st = safetensors::SafeTensors::deserialize(&packed).unwrap();
    let f32_st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let file = kiln_gguf::GgufFile::open(&gguf).unwrap();
    for (module, ty, gguf_name) in [
        ("model.embed_tokens", QuantType::Q8_0, "token_embd.weight"),
        (
            "model.layers.0.self_attn.q_proj",
            QuantType::Q5_0,
            "blk.0.attn_q.weight",
        ),
        (
            "model.layers.0.self_attn.o_proj",
            QuantType::Q4K,
            "blk.0.attn_output.weight",
        ),
        ("model.layers.0.mlp.down_proj", QuantType::Q6K, "blk.0.ffn_down.weight"),
    ] {
        assert_eq!(plan.get(module), Some(ty), "{module}");
        let blocks = st.tensor(&format!("{module}.packed")).unwrap();
        let same_bytes = blocks.data() == file.data(file.tensor(gguf_name).unwrap());
        assert_eq!(
            same_bytes,
            ty.gguf_blocks(),
            "{module}: the bytes of {gguf_name} unless a K-quant"
        );
        if module != "model.embed_tokens" {
            assert_same_values(&st, &f32_st, module, ty);
        }
    }
    // (3 windows of its text: each scores 256 positions over 262,144 tokens, twice)
    packed_matches_dequantized(&GEMMA3, &GEMMA3_DIR, (&model, &plan), &packed, &source.extra_files, 512);
}

/// The packed `module` of `st` dequantizes to exactly the f32 model's weight (`[in,
/// out]` in `dense`).
fn assert_same_values(
    st: &safetensors::SafeTensors<'_>,
    dense: &safetensors::SafeTensors<'_>,
    module: &str,
    ty: kiln_models::quant::QuantType,
) {
    use kiln_models::quant::{Layout, PackedShape, dequantize_rows};
    let blocks = st.tensor(&format!("{module}.packed")).unwrap();
    let [rows, nb, _] = blocks.shape()[..] else {
        panic!("3-D")
    };
    let shape = PackedShape {
        ty,
        rows,
        cols: nb * 32,
        layout: Layout::Rows,
    };
    let mut rows_f32 = vec![0f32; rows * shape.cols];
    dequantize_rows(shape, blocks.data(), &mut rows_f32);
    let dense: Vec<f32> = dense
        .tensor(&format!("{module}.weight"))
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    for (j, row) in rows_f32.chunks(shape.cols).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            assert_eq!(
                v.to_bits(),
                dense[i * rows + j].to_bits(),
                "{module}: output {j}, input {i}"
            );
        }
    }
}

/// The model packed as `plan` says, on flex, against the dequantized one: perplexity
/// (over the first `tokens` of the reference text) within 1 % and the same next greedy
/// token on every reference prompt.
fn packed_matches_dequantized(
    case: &'static Case,
    cell: &'static OnceLock<PathBuf>,
    (model, plan): (&kiln_models::ModelConfig, &kiln_models::quant::Quantization),
    packed: &[u8],
    extra_files: &[(String, Vec<u8>)],
    tokens: usize,
) {
    let dir = common::scratch_dir(&format!("pretrained-{}-gguf-blocks", case.dir)).join("model");
    write_model_dir_with(&dir, &model_file(model, Some(plan)), packed, None, None, extra_files).unwrap();
    let device = Device::flex();
    let quantized = LoadedModel::open(&dir, WhichWeights::Best, &device).unwrap();
    let dense = LoadedModel::open(kiln_dir(case, cell), WhichWeights::Best, &device).unwrap();
    let r = reference(case);
    let ppl = |m: &LoadedModel| {
        let method = PerplexityMethod::Sliding {
            context: r.perplexity.context,
            stride: r.perplexity.stride,
        };
        let ids = &r.perplexity.ids[..tokens.min(r.perplexity.ids.len())];
        perplexity(lm(m), ids, method, None, &device).unwrap().perplexity
    };
    let (got, want) = (ppl(&quantized), ppl(&dense));
    eprintln!(
        "{} perplexity: GGUF blocks on flex {got:.4}, dequantized {want:.4}",
        case.dir
    );
    assert!(
        (got / want - 1.0).abs() < 0.01,
        "{}: perplexity {got} packed vs {want} dequantized",
        case.dir
    );
    for p in &r.prompts {
        let next = |m: &LoadedModel| {
            let (tokens, _) = generate(lm(m), &p.ids, 1, &Sampling::greedy(), true, &device, |_| {}).unwrap();
            tokens
        };
        assert_eq!(
            next(&quantized),
            next(&dense),
            "{}, {:?}: the next greedy token",
            case.dir,
            p.text
        );
    }
}

/// The `config.toml` of a converted LM directory (packed by `plan` when given).
fn model_file(
    model: &kiln_models::ModelConfig,
    plan: Option<&kiln_models::quant::Quantization>,
) -> kiln_core::ModelFile {
    kiln_core::ModelFile {
        model: model.clone(),
        head: None,
        quantization: plan.cloned(),
    }
}

#[derive(Deserialize)]
struct OnnxLogits {
    tokens: Vec<Vec<i64>>,
    logits: Vec<Vec<Vec<f32>>>,
}

/// SmolLM2 as model hubs ship it in ONNX (Optimum's export with the KV cache, of the
/// model transformers reads from the same GGUF; scripts/llm-onnx.sh): placed by its
/// graph as a llama, it converts to the GGUF conversion's weights bit for bit (the same
/// dequantised values, pre-transposed and renamed `onnx::MatMul_NNN` in the file), the
/// config read off the graph agrees with the config.json beside it, and the logits
/// match onnxruntime's on the same file.
#[test]
fn smollm2_onnx_export_converts_to_the_gguf_weights_and_matches_onnxruntime() {
    let dir = source_dir(&SMOLLM2).join("onnx");
    assert!(
        dir.join("model.onnx.reference.json").is_file(),
        "{} is missing: run scripts/llm-onnx.sh",
        dir.display()
    );
    let file = dir.join("model.onnx");
    let source = Source::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(source.notes[0].contains("a llama graph"), "{:?}", source.notes);
    let (path, json) = source.hf_config.clone().unwrap();
    let model = hf_config::detect_model_config(&json, &path.display().to_string()).unwrap();
    let (weights, report) = convert(&source, &model, false).unwrap();
    assert!(report.is_complete(), "{}", report.details());
    let (_, gguf_model, gguf_weights, _) = converted(&SMOLLM2, false);
    assert!(
        weights == gguf_weights,
        "the ONNX file's weights differ from the GGUF's"
    );

    // The config a graph alone gives: the same model but for the context length, which
    // the graph does not hold (its rotary tables are computed per position).
    let bare = common::scratch_dir("pretrained-smollm2-onnx-bare");
    std::fs::copy(&file, bare.join("model.onnx")).unwrap();
    let bare_source = Source::read(&bare.join("model.onnx")).unwrap();
    let (path, json) = bare_source.hf_config.clone().unwrap();
    assert!(
        path.display().to_string().contains("read off the graph"),
        "{}",
        path.display()
    );
    let mut from_graph = hf_config::detect_model_config(&json, &path.display().to_string()).unwrap();
    if let (kiln_models::ModelConfig::Llama(g), kiln_models::ModelConfig::Llama(m)) = (&mut from_graph, &gguf_model) {
        assert!(
            (g.rms_norm_eps - m.rms_norm_eps).abs() < 1e-12,
            "{} {}",
            g.rms_norm_eps,
            m.rms_norm_eps
        );
        g.block_size = m.block_size;
        g.rms_norm_eps = m.rms_norm_eps;
    }
    assert_eq!(from_graph, gguf_model);
    drop(bare_source);

    let reference: OnnxLogits =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.onnx.reference.json")).unwrap()).unwrap();
    let ours = lm::lm_logits(&model, &weights, &reference.tokens);
    let ort: Vec<f32> = reference.logits.iter().flatten().flatten().copied().collect();
    let scale = ort.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_diff = lm::max_abs_diff(&ours, &ort);
    let (b, t) = (reference.tokens.len(), reference.tokens[0].len());
    eprintln!(
        "SmolLM2 ONNX ({} x {t} tokens): max |kiln - onnxruntime| logit difference {max_diff:.2e} (largest |logit| {scale:.1})",
        b
    );
    assert!(max_diff <= 1e-4 * scale, "{max_diff} (scale {scale})");
}
