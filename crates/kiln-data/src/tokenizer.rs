//! Tokenizers: a character-level vocabulary, or a Hugging Face `tokenizer.json`
//! (through the `tokenizers` crate), optionally trained here as byte-level BPE.
//!
//! Both are stored in a run directory as `tokenizer.json`; a character tokenizer is a
//! small JSON object `{"type": "char", "chars": [...]}`, anything else is read as a
//! Hugging Face tokenizer.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::DataError;

/// What the config's `tokenizer = "..."` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSpec {
    Char,
    /// Train a byte-level BPE with this vocabulary size on the training text.
    Bpe(usize),
    /// Load a Hugging Face `tokenizer.json`.
    File(PathBuf),
}

impl TokenizerSpec {
    pub fn parse(spec: &str) -> Result<Self, String> {
        if spec == "char" {
            return Ok(Self::Char);
        }
        if let Some(n) = spec.strip_prefix("bpe:") {
            let n: usize = n
                .parse()
                .map_err(|_| format!("\"{spec}\": expected bpe:<vocab size>, e.g. bpe:512"))?;
            if n < 257 {
                return Err(format!(
                    "\"{spec}\": a byte-level BPE needs a vocabulary of at least 257"
                ));
            }
            return Ok(Self::Bpe(n));
        }
        if spec.ends_with(".json") {
            return Ok(Self::File(PathBuf::from(spec)));
        }
        Err(format!(
            "\"{spec}\": expected \"char\", \"bpe:<vocab size>\" or a path to tokenizer.json"
        ))
    }
}

#[derive(Serialize, Deserialize)]
struct CharFile {
    r#type: String,
    chars: Vec<char>,
}

/// Rows of token ids (or of attention-mask values), one per text.
pub type TokenRows = Vec<Vec<u32>>;

/// A tokenizer of either kind.
#[derive(Clone)]
pub enum Tokenizer {
    Char(CharTokenizer),
    Hf(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Char(c) => write!(f, "CharTokenizer(vocab={})", c.chars.len()),
            Tokenizer::Hf(t) => write!(f, "HfTokenizer(vocab={})", t.get_vocab_size(true)),
        }
    }
}

/// One token per distinct character of the corpus, ids in sorted character order
/// (nanoGPT's `shakespeare_char`).
#[derive(Debug, Clone)]
pub struct CharTokenizer {
    chars: Vec<char>,
    index: std::collections::HashMap<char, u32>,
}

impl CharTokenizer {
    pub fn from_text(text: &str) -> Self {
        let chars: BTreeSet<char> = text.chars().collect();
        Self::from_chars(chars.into_iter().collect())
    }

    fn from_chars(chars: Vec<char>) -> Self {
        let index = chars.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
        Self { chars, index }
    }
}

impl Tokenizer {
    /// Build the tokenizer `spec` asks for; `train_text` is what a char vocabulary or a
    /// BPE is built from.
    pub fn build(spec: &TokenizerSpec, train_text: &str) -> Result<Self, DataError> {
        match spec {
            TokenizerSpec::Char => Ok(Self::Char(CharTokenizer::from_text(train_text))),
            TokenizerSpec::Bpe(vocab) => Self::train_bpe(*vocab, train_text),
            TokenizerSpec::File(path) => Self::load(path),
        }
    }

    fn train_bpe(vocab_size: usize, text: &str) -> Result<Self, DataError> {
        let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
        // GPT-2's byte-level BPE: no prefix space, so decode(encode(text)) == text.
        let byte_level = ByteLevel::new(false, true, true);
        tokenizer.with_pre_tokenizer(Some(byte_level));
        tokenizer.with_decoder(Some(byte_level));
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        tokenizer
            .train(&mut trainer, text.lines())
            .map_err(|e| DataError::Tokenizer(format!("training BPE: {e}")))?;
        Ok(Self::Hf(Box::new(tokenizer)))
    }

    /// Read a `tokenizer.json` of either kind.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        if let Ok(file) = serde_json::from_str::<CharFile>(&text)
            && file.r#type == "char"
        {
            if file.chars.is_empty() {
                return Err(DataError::format(path, "character tokenizer with an empty vocabulary"));
            }
            return Ok(Self::Char(CharTokenizer::from_chars(file.chars)));
        }
        // A BPE file in one streaming pass (a third of the peak memory for Gemma 3's).
        if let Some(tokenizer) = crate::bpe_json::read(&text) {
            return Ok(Self::Hf(Box::new(tokenizer)));
        }
        let tokenizer = text
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| DataError::format(path, format!("not a Hugging Face tokenizer.json: {e}")))?;
        Ok(Self::Hf(Box::new(tokenizer)))
    }

    /// Write `tokenizer.json` (the caller makes it atomic).
    pub fn to_json(&self) -> Result<String, DataError> {
        match self {
            Tokenizer::Char(c) => Ok(serde_json::to_string(&CharFile {
                r#type: "char".into(),
                chars: c.chars.clone(),
            })
            .expect("char list serialises")),
            Tokenizer::Hf(t) => t
                .to_string(false)
                .map_err(|e| DataError::Tokenizer(format!("serialising: {e}"))),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(c) => c.chars.len(),
            Tokenizer::Hf(t) => t.get_vocab_size(true),
        }
    }

    /// Text -> ids. A character outside a char vocabulary is an error naming it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Char(c) => text
                .chars()
                .map(|ch| {
                    c.index
                        .get(&ch)
                        .copied()
                        .ok_or_else(|| DataError::Tokenizer(format!("character {ch:?} is not in the vocabulary")))
                })
                .collect(),
            Tokenizer::Hf(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| DataError::Tokenizer(format!("encoding: {e}"))),
        }
    }

    /// This tokenizer with its own padding and truncation (as a `tokenizer.json` may
    /// configure them) turned off, for callers that cut and pad themselves.
    pub fn unpadded(&self) -> Self {
        match self {
            Tokenizer::Char(_) => self.clone(),
            Tokenizer::Hf(t) => {
                let mut t = t.clone();
                t.with_padding(None);
                t.with_truncation(None).expect("turning truncation off cannot fail");
                Tokenizer::Hf(t)
            }
        }
    }

    /// Text -> ids with the tokenizer's special tokens (BERT's `[CLS] ... [SEP]`); a
    /// character tokenizer has none and encodes as [`encode`](Self::encode).
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Char(_) => self.encode(text),
            Tokenizer::Hf(t) => t
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| DataError::Tokenizer(format!("encoding: {e}"))),
        }
    }

    /// A batch of texts as model input: token ids (with the tokenizer's special tokens,
    /// truncation and padding) and attention masks (1 = token, 0 = padding), every row
    /// padded to the longest. Only Hugging Face tokenizers (e.g. BERT's WordPiece) do this.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<(TokenRows, TokenRows), DataError> {
        let Tokenizer::Hf(t) = self else {
            return Err(DataError::Tokenizer(
                "a character tokenizer has no special tokens or padding".into(),
            ));
        };
        let encodings = t
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| DataError::Tokenizer(format!("encoding: {e}")))?;
        let longest = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let (mut ids, mut masks) = (Vec::new(), Vec::new());
        for e in encodings {
            let mut i = e.get_ids().to_vec();
            let mut m = e.get_attention_mask().to_vec();
            i.resize(longest, 0);
            m.resize(longest, 0);
            ids.push(i);
            masks.push(m);
        }
        Ok((ids, masks))
    }

    /// Ids -> text.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        match self {
            Tokenizer::Char(c) => ids
                .iter()
                .map(|&i| {
                    c.chars
                        .get(i as usize)
                        .copied()
                        .ok_or_else(|| DataError::Tokenizer(format!("id {i} is outside the vocabulary")))
                })
                .collect(),
            Tokenizer::Hf(t) => t
                .decode(ids, false)
                .map_err(|e| DataError::Tokenizer(format!("decoding: {e}"))),
        }
    }
}

impl Tokenizer {
    /// The id of a (special) token written as text, e.g. `<|endoftext|>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Char(c) => {
                let mut chars = token.chars();
                let (first, rest) = (chars.next()?, chars.next());
                if rest.is_some() {
                    return None;
                }
                c.chars.iter().position(|&ch| ch == first).map(|i| i as u32)
            }
            Tokenizer::Hf(t) => t.token_to_id(token),
        }
    }

    /// Ids of the tokenizer's special end-of-text tokens, among the usual names
    /// (`<|endoftext|>`, `</s>`, `<eos>`, `<|im_end|>`, `<|eot_id|>`, `<|end_of_text|>`).
    pub fn end_of_text_ids(&self) -> Vec<u32> {
        if matches!(self, Tokenizer::Char(_)) {
            return Vec::new();
        }
        [
            "<|endoftext|>",
            "</s>",
            "<eos>",
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
        ]
        .iter()
        .filter_map(|t| self.token_to_id(t))
        .collect()
    }
}
