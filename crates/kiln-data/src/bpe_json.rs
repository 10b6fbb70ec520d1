//! A Hugging Face `tokenizer.json` with a BPE model, read in one streaming pass.
//!
//! `tokenizers`' own reader first turns the whole `model` object into a
//! `serde_json::Value` (its `ModelWrapper` is tagged through a flattened `Value`), then
//! buffers the merges once more for an untagged enum: for Gemma 3's 262,144-token
//! vocabulary and 514,906 merges that was 344 MiB at the peak and 293 MiB still
//! resident after it, for a tokenizer that holds about 100 MiB. Here the same file is
//! read straight into the vocabulary map and the merge list, and the tokenizer is built
//! from them the way `tokenizers`' deserializer builds it (the same builder calls, the
//! added tokens added last against the model): the same tokenizer, which the tests check
//! by comparing both serialized.
//!
//! Anything this reader does not know (another model type, a field it has not seen) is
//! `None`: the caller then reads the file with `tokenizers` as before.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PaddingParams, PostProcessorWrapper,
    PreTokenizerWrapper, TokenizerBuilder, TruncationParams,
};

/// The top level of `tokenizer.json` (the keys `tokenizers` reads; others are ignored,
/// as it ignores them).
#[derive(Deserialize)]
struct File {
    version: Option<String>,
    truncation: Option<TruncationParams>,
    padding: Option<PaddingParams>,
    #[serde(default)]
    added_tokens: Vec<AddedTokenAt>,
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: Option<PreTokenizerWrapper>,
    post_processor: Option<PostProcessorWrapper>,
    decoder: Option<DecoderWrapper>,
    model: Bpe,
}

/// An added token with the id the file gives it (which `tokenizers` only warns about:
/// the id is the model's, the token added last).
#[derive(Deserialize)]
struct AddedTokenAt {
    #[allow(dead_code)]
    id: u32,
    #[serde(flatten)]
    token: AddedToken,
}

#[derive(Deserialize)]
enum BpeTag {
    #[serde(rename = "BPE")]
    Bpe,
}

/// The `model` object of a BPE tokenizer: every field `tokenizers` 0.22 writes, and no
/// other (an unknown one may change what the model does: `None`, read by `tokenizers`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Bpe {
    #[serde(rename = "type")]
    #[allow(dead_code)]
    tag: BpeTag,
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: Option<bool>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
    vocab: Vocab,
    merges: MergeList,
}

/// The merges in either form `tokenizers` reads: `["a", "b"]` pairs, or the legacy
/// `"a b"` lines (a `#version` line skipped, anything but two parts refused).
struct MergeList(Merges);

impl<'de> Deserialize<'de> for MergeList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct List;
        impl<'de> Visitor<'de> for List {
            type Value = MergeList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of merges")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MergeList, A::Error> {
                let mut merges = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(merge) = seq.next_element::<Merge>()? {
                    if let Some(pair) = merge.0 {
                        merges.push(pair);
                    }
                }
                Ok(MergeList(merges))
            }
        }
        deserializer.deserialize_seq(List)
    }
}

/// One merge (`None`: a legacy `#version` line).
struct Merge(Option<(String, String)>);

impl<'de> Deserialize<'de> for Merge {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct One;
        impl<'de> Visitor<'de> for One {
            type Value = Merge;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a merge: [\"a\", \"b\"] or \"a b\"")
            }
            fn visit_str<E: de::Error>(self, line: &str) -> Result<Merge, E> {
                if line.starts_with("#version") {
                    return Ok(Merge(None));
                }
                let mut parts = line.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok(Merge(Some((a.to_string(), b.to_string())))),
                    _ => Err(E::custom(format!("merge {line:?} is not two tokens"))),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merge, A::Error> {
                let a: String = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let b: String = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(Merge(Some((a, b))))
            }
        }
        deserializer.deserialize_any(One)
    }
}

/// The tokenizer of `text`, if it is a BPE `tokenizer.json` this reader knows
/// (`None` otherwise, and for any error: `tokenizers` then reads it and names the error).
pub fn read(text: &str) -> Option<tokenizers::Tokenizer> {
    let file: File = serde_json::from_str(text).ok()?;
    if file.version.as_deref().is_some_and(|v| v != "1.0") {
        return None;
    }
    let m = file.model;
    let mut bpe = BPE::builder().vocab_and_merges(m.vocab, m.merges.0);
    if let Some(dropout) = m.dropout {
        bpe = bpe.dropout(dropout);
    }
    if let Some(unk) = m.unk_token {
        bpe = bpe.unk_token(unk);
    }
    if let Some(prefix) = m.continuing_subword_prefix {
        bpe = bpe.continuing_subword_prefix(prefix);
    }
    if let Some(suffix) = m.end_of_word_suffix {
        bpe = bpe.end_of_word_suffix(suffix);
    }
    if let Some(fuse) = m.fuse_unk {
        bpe = bpe.fuse_unk(fuse);
    }
    if let Some(fallback) = m.byte_fallback {
        bpe = bpe.byte_fallback(fallback);
    }
    if let Some(ignore) = m.ignore_merges {
        bpe = bpe.ignore_merges(ignore);
    }
    let model = bpe.build().ok()?;
    let mut tokenizer = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(model.into())
    .with_normalizer(file.normalizer)
    .with_pre_tokenizer(file.pre_tokenizer)
    .with_post_processor(file.post_processor)
    .with_decoder(file.decoder)
    .with_truncation(file.truncation)
    .with_padding(file.padding)
    .build()
    .ok()?;
    let added: Vec<AddedToken> = file.added_tokens.into_iter().map(|t| t.token).collect();
    tokenizer.add_tokens(&added);
    Some(tokenizer.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(merges: &str, model_extra: &str) -> String {
        format!(
            r#"{{"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{{"id": 5, "content": "<eos>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}},
                {{"id": 6, "content": "<new>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": true, "special": false}}],
            "normalizer": null,
            "pre_tokenizer": {{"type": "Whitespace"}},
            "post_processor": null,
            "decoder": {{"type": "BPEDecoder", "suffix": "</w>"}},
            "model": {{"type": "BPE", "dropout": null, "unk_token": "c", "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": false, "ignore_merges": false,
                {model_extra}
                "vocab": {{"a": 0, "b": 1, "ab": 2, "c": 3, "abc": 4, "<eos>": 5}}, "merges": {merges}}}}}"#
        )
    }

    fn same_as_tokenizers(text: &str) {
        let ours = read(text).expect("read by the streaming reader");
        let theirs: tokenizers::Tokenizer = text.parse().unwrap();
        assert_eq!(ours.to_string(false).unwrap(), theirs.to_string(false).unwrap());
        for s in ["abc ab<eos> ba cab", "a<new>b abcabc"] {
            let (a, b) = (ours.encode(s, true).unwrap(), theirs.encode(s, true).unwrap());
            assert_eq!(a.get_ids(), b.get_ids(), "{s:?}");
        }
        assert_eq!(ours.token_to_id("<new>"), Some(6));
    }

    #[test]
    fn pairs_and_legacy_merge_lines_build_what_tokenizers_builds() {
        same_as_tokenizers(&file(r#"[["a", "b"], ["ab", "c"]]"#, ""));
        same_as_tokenizers(&file(r##"["#version: 0.2", "a b", "ab c"]"##, ""));
        same_as_tokenizers(&file(r#"[]"#, ""));
    }

    #[test]
    fn what_the_reader_does_not_know_is_left_to_tokenizers() {
        // an unknown model field, another model type, a bad merge line, another version
        assert!(read(&file(r#"[["a", "b"]]"#, r#""new_option": true,"#)).is_none());
        assert!(read(&file(r#"["a b c"]"#, "")).is_none());
        assert!(read(&file(r#"[["a", "b", "c"]]"#, "")).is_none());
        assert!(read(&file(r#"[["a", "b"]]"#, "").replace(r#""BPE""#, r#""WordPiece""#)).is_none());
        assert!(read(&file(r#"[["a", "b"]]"#, "").replace(r#""1.0""#, r#""2.0""#)).is_none());
    }
}
